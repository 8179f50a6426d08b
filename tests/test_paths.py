"""The path layer (xinst_jax/paths.py): the same code on local paths and on gs:// URLs.

Offline, gs:// is fsspec's in-memory filesystem behind etils.epath's own gs:// backend
(tests/memory_gcs.py): the jobs get real `gs://bucket/...` strings and reach storage only through
the layer, as on a bucket. What runs here: the layer's functions on both kinds of path, local
copies of URLs, a Hugging Face export to gs:// read back equal, training from a gs:// init_from
with a gs:// export.out, a tokenizer and the generate job's input, weights and output on gs://,
and config validation (the README's pod command validates; broken paths fail naming the key).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from data_helpers import readme_pod_commands, run_sets
from memory_gcs import memory_gcs
from xinst_jax import paths
from xinst_jax.config import ConfigError, load_config, model_preset

BUCKET = "gs://bucket"
# The README's pod command (`python launch/tpu_vm.py ... -- --config sft_xinst --set ...`), as written there.
README_POD_SETS = run_sets(readme_pod_commands()[1][0])
README_BUCKET = readme_pod_commands()[0]["BUCKET"]


@pytest.fixture
def gcs():
    with memory_gcs() as fs:
        yield fs


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path, gcs) -> str:
    return str(tmp_path / "root") if request.param == "local" else f"{BUCKET}/root"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    return str(tmp_path / "cache")


def tiny_params(seed: int = 0):
    from xinst_jax.model.llama import init_params

    cfg = model_preset("tiny")
    return cfg, init_params(cfg, jax.random.PRNGKey(seed))


def assert_trees_equal(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def upload_dir(local: str, url: str) -> None:
    for name in os.listdir(local):
        paths.copy_file(os.path.join(local, name), paths.join(url, name))


# --------------------------------------------------------------------------- the layer


def test_layer_functions_agree_on_local_and_gs(root):
    paths.makedirs(paths.join(root, "sub"))
    paths.write_atomic(paths.join(root, "a.jsonl"), b'{"id": 1}\n')
    with paths.open(paths.join(root, "sub", "b.bin"), "wb") as f:  # a numpy buffer, as the safetensors writer gives
        f.write(memoryview(np.arange(4, dtype=np.int32).view(np.uint8)))
    assert paths.exists(paths.join(root, "a.jsonl")) and not paths.exists(paths.join(root, "nope"))
    assert paths.isdir(root) and paths.isfile(paths.join(root, "a.jsonl")) and not paths.isfile(root)
    assert paths.listdir(root) == ["a.jsonl", "sub"]
    assert paths.glob(paths.join(root, "*.jsonl")) == [paths.join(root, "a.jsonl")]
    assert paths.glob(paths.join(root, "*", "*.bin")) == [paths.join(root, "sub", "b.bin")]
    assert paths.size(paths.join(root, "sub", "b.bin")) == 16
    assert np.frombuffer(paths.read_bytes(paths.join(root, "sub", "b.bin")), np.int32).tolist() == [0, 1, 2, 3]
    paths.replace(paths.join(root, "a.jsonl"), paths.join(root, "c.jsonl"))
    assert paths.read_text(paths.join(root, "c.jsonl")) == '{"id": 1}\n'
    paths.remove(paths.join(root, "c.jsonl"))
    paths.remove(paths.join(root, "c.jsonl"))  # already gone: no error
    assert paths.listdir(root) == ["sub"]
    assert paths.absolute(root) == (root if root.startswith("gs://") else os.path.realpath(root))


def test_local_copy_copies_once_and_again_when_the_remote_changes(gcs, cache, monkeypatch):
    paths.write_atomic(f"{BUCKET}/hf/config.json", b"{}")
    paths.write_atomic(f"{BUCKET}/hf/nested/x.bin", b"abc")
    copies = []
    real_copy = paths.copy_file
    monkeypatch.setattr(paths, "copy_file", lambda s, d: (copies.append(s), real_copy(s, d)))
    local = paths.local_copy(f"{BUCKET}/hf/")
    assert local.startswith(cache) and sorted(os.listdir(local)) == ["config.json", "nested"]
    assert open(os.path.join(local, "nested", "x.bin"), "rb").read() == b"abc"
    assert len(copies) == 2 and paths.local_copy(f"{BUCKET}/hf") == local and len(copies) == 2  # reused
    paths.write_atomic(f"{BUCKET}/hf/nested/x.bin", b"abcd")  # changed on the bucket: copied again
    assert paths.local_copy(f"{BUCKET}/hf") == local and len(copies) == 4
    assert open(os.path.join(local, "nested", "x.bin"), "rb").read() == b"abcd"
    one = paths.local_copy(f"{BUCKET}/hf/config.json")  # a single file
    assert os.path.isfile(one) and open(one, "rb").read() == b"{}"
    assert paths.local_copy("relative/dir") == "relative/dir"  # local paths are used in place
    with pytest.raises(ConfigError, match=r"^train.init_from: gs://bucket/missing not found"):
        paths.local_copy(f"{BUCKET}/missing", "train.init_from")


# --------------------------------------------------------------------------- jobs on gs://


def test_export_to_gs_is_the_local_export_and_reads_back_equal(tmp_path, gcs, cache):
    from xinst_jax.convert.export_job import export_hf_job
    from xinst_jax.convert.hf import export_hf, import_hf

    cfg, params = tiny_params()
    local = export_hf(params, cfg, tmp_path / "hf", dtype="float32", max_shard_bytes=200_000)
    export_hf(params, cfg, f"{BUCKET}/hf", dtype="float32", max_shard_bytes=200_000)
    names = sorted(os.listdir(local))
    assert len([n for n in names if n.endswith(".safetensors")]) > 1  # sharded, with an index
    assert paths.listdir(f"{BUCKET}/hf") == names
    for name in names:
        assert paths.read_bytes(f"{BUCKET}/hf/{name}") == (local / name).read_bytes(), name
    _, back = import_hf(f"{BUCKET}/hf", cfg)
    assert_trees_equal(back, params)

    # the export_hf job: a gs:// source re-exported to a gs:// export.out
    job = load_config("export_hf", ["model.preset=tiny", f"export.hf_source={BUCKET}/hf", "export.dtype=float32",
                                    f"export.out={BUCKET}/again", f"run_dir={tmp_path / 'run'}"])
    export_hf_job(job)
    assert paths.listdir(f"{BUCKET}/again") == ["config.json", "generation_config.json", "model.safetensors"]
    _, again = import_hf(f"{BUCKET}/again", cfg)
    assert_trees_equal(again, params)


def test_training_from_a_gs_init_from_exports_to_gs(tmp_path, gcs, cache):
    from xinst_jax.convert.hf import export_hf, import_hf
    from xinst_jax.train.loop import resolve_model, run_training

    cfg, params = tiny_params(seed=3)
    export_hf(params, cfg, f"{BUCKET}/base", dtype="float32")
    # the architecture from the bucket's config.json (model left at the defaults)
    bare = load_config("tiny_synthetic", ["model.preset=null", f"train.init_from={BUCKET}/base", "train.seq_len=32"])
    assert resolve_model(bare).model.embed_dim == cfg.embed_dim
    run = load_config("tiny_synthetic", [
        f"train.init_from={BUCKET}/base", f"export.out={BUCKET}/trained", f"run_dir={tmp_path / 'run'}",
        "train.steps=1", "train.learning_rate=0.0", "train.weight_decay=0.0", "train.seq_len=32",
        "train.batch_size=8", "checkpoint.async_save=false"])
    run_training(run)
    _, trained = import_hf(f"{BUCKET}/trained", cfg)
    assert_trees_equal(trained, params)  # learning rate 0: the gs:// weights, through and back


def test_tokenizer_from_gs_gives_the_local_ids(tmp_path, gcs, cache):
    from data_helpers import EDGE_TEXTS, train_small_tokenizer
    from xinst_jax.data.tokenizer import load_tokenizer

    local = train_small_tokenizer(tmp_path / "tok", EDGE_TEXTS * 20, vocab_size=500)
    upload_dir(str(local), f"{BUCKET}/tok")
    ref = load_tokenizer(str(local))
    for given in (f"{BUCKET}/tok", f"{BUCKET}/tok/tokenizer.json", f"{BUCKET}/tok/tokenizer.model"):
        tok = load_tokenizer(given)
        want = load_tokenizer(given.replace(f"{BUCKET}/tok", str(local)))
        assert [tok.encode(t) for t in EDGE_TEXTS] == [want.encode(t) for t in EDGE_TEXTS], given
        assert tok.sha256() == want.sha256()
    assert load_tokenizer(f"{BUCKET}/tok").describe()["files"] == ref.describe()["files"]
    with pytest.raises(ConfigError, match=r"^data.tokenizer: gs://bucket/nope does not exist"):
        load_tokenizer(f"{BUCKET}/nope")


def test_generate_reads_and_writes_gs(tmp_path, gcs, cache):
    from xinst_jax.convert.hf import export_hf
    from xinst_jax.infer.job import run_generate

    cfg, params = tiny_params(seed=1)
    export_hf(params, cfg, f"{BUCKET}/hf", dtype="float32")
    prompts = "".join(json.dumps({"id": i, "prompt": f"prompt {i}"}) + "\n" for i in range(5)).encode()
    paths.write_atomic(f"{BUCKET}/in/prompts.jsonl", prompts)
    (tmp_path / "prompts.jsonl").write_bytes(prompts)

    def job(src: str, out: str, hf: str):
        return load_config("generate_demo", [
            f"generate.input={src}", f"generate.output={out}", f"generate.hf_dir={hf}", f"run_dir={tmp_path / 'run'}",
            "generate.max_new_tokens=4", "generate.batch_size=2", "generate.shard_size=2",
            "generate.prompt_buckets=[32]", "generate.progress=false", "mesh.num_devices=1"])

    export_hf(params, cfg, tmp_path / "hf", dtype="float32")
    run_generate(job(str(tmp_path / "prompts.jsonl"), str(tmp_path / "out"), str(tmp_path / "hf")))
    report = run_generate(job(f"{BUCKET}/in/prompts.jsonl", f"{BUCKET}/out", f"{BUCKET}/hf"))
    assert report["output"] == f"{BUCKET}/out" and report["shards_generated"] == 3
    assert paths.read_bytes(f"{BUCKET}/out/output.jsonl") == (tmp_path / "out" / "output.jsonl").read_bytes()
    manifest = json.loads(paths.read_text(f"{BUCKET}/out/manifest.json"))
    assert manifest["input"] == f"{BUCKET}/in/prompts.jsonl" and manifest["model_source"] == f"hf {BUCKET}/hf"
    again = run_generate(job(f"{BUCKET}/in/prompts.jsonl", f"{BUCKET}/out", f"{BUCKET}/hf"))
    assert again["shards_reused"] == 3 and again["shards_generated"] == 0  # done-markers read back from gs://


def test_a_curation_stage_reads_and_writes_gs(tmp_path, gcs):
    """The ratings stage: seed pairs from gs://, its stage directory under a gs:// curate.out."""
    from data_helpers import cldr_pairs
    from xinst_jax.curate.ratings import run_ratings

    data = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in cldr_pairs(["fi", "th"], 8)).encode()
    paths.write_atomic(f"{BUCKET}/seed/pairs.jsonl", data)
    (tmp_path / "pairs.jsonl").write_bytes(data)

    def job(src: str, out: str):
        return load_config("evaluator_xinst", [f"run_dir={tmp_path / 'run'}", "job=ratings",
                                               f"curate.seed_pairs=[{{path: {src}}}]", f"curate.out={out}"])

    run_ratings(job(str(tmp_path / "pairs.jsonl"), str(tmp_path / "out")))
    run_ratings(job(f"{BUCKET}/seed/*.jsonl", f"{BUCKET}/curate"))
    assert paths.read_bytes(f"{BUCKET}/curate/ratings/ratings.jsonl") == \
        (tmp_path / "out" / "ratings" / "ratings.jsonl").read_bytes()
    assert paths.listdir(f"{BUCKET}/curate/ratings") == ["manifest.json", "ratings.jsonl"]


# --------------------------------------------------------------------------- config validation


def test_the_readme_pod_command_validates_without_a_bucket(monkeypatch):
    """Every key on gs:// loads and passes the jobs' checks; no bucket is contacted for it."""
    from xinst_jax.convert import export_job
    from xinst_jax.finetune import check_finetune_config
    from xinst_jax.infer.job import _validate

    def no_bucket(path):
        raise AssertionError(f"validation contacted {path}")

    cfg = load_config("sft_xinst", README_POD_SETS)
    assert (cfg.train.init_from, cfg.data.inputs[0].path, cfg.checkpoint.dir) == (
        f"{README_BUCKET}/llama3-8b-hf", f"{README_BUCKET}/xinst/*.jsonl", f"{README_BUCKET}/sft_xinst/checkpoints")
    monkeypatch.setattr(paths, "exists", no_bucket)
    monkeypatch.setattr(paths, "isdir", no_bucket)
    check_finetune_config(cfg)
    no_inputs = load_config("sft_xinst", [s for s in README_POD_SETS if not s.startswith("data.inputs")])
    check_finetune_config(no_inputs)  # gs:// prepared shards: read (and checked) by the trainer
    gen = load_config("generate_demo", [f"generate.input={BUCKET}/in.jsonl", f"generate.output={BUCKET}/out",
                                        f"generate.hf_dir={BUCKET}/hf", f"generate.tokenizer={BUCKET}/hf"])
    assert str(_validate(gen)) == f"{BUCKET}/in.jsonl"
    assert str(export_job.export_out_dir(cfg)) == f"{README_BUCKET}/sft_xinst/hf"
    curate = load_config("candidates_xinst", [f"curate.out={BUCKET}/curate",
                                              f"curate.corpus=[{{path: {BUCKET}/c/*.jsonl}}]"])
    assert curate.curate.out == f"{BUCKET}/curate"


def test_broken_paths_fail_naming_the_key(tmp_path):
    from xinst_jax.finetune import check_finetune_config

    missing = load_config("sft_xinst", [*README_POD_SETS[1:], f"train.init_from={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"sft_xinst: train.init_from: .*nope is not a directory \(not found\)"):
        check_finetune_config(missing)
    cases = {
        "train.init_from=gs:/bucket/hf": r"^--set: train.init_from: 'gs:/bucket/hf' is a local path; did you mean "
                                         r"'gs://bucket/hf'\?",
        "export.out=gs://": r"^--set: export.out: 'gs://' names no bucket",
        "data.inputs=[{path: 'gs:/b/*.jsonl'}]": r"^--set: data.inputs\[0\].path: 'gs:/b/\*.jsonl' is a local path",
        "run_dir=gs://bucket/run": r"^--set: run_dir: 'gs://bucket/run' is a URL, but run_dir must be local",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config("sft_xinst", [override])
    with pytest.raises(ConfigError, match=r"unsupported URL scheme"):
        paths.as_path("ftp://host/x")
