"""launch/aot_check.py, train mode: slice names, the order of candidate changes, FLOPs counted as XLA
counts a scan, the fit table's markdown against its records, and, with libtpu (the `test` extra),
cells of docs/aot_fit_table.json compiled again for their TPU topology on this CPU.

The table is a claim about the code: a change to the model, the train step or the sharding that
moves a cell's memory by more than the tolerance fails here; regenerate the table with the
command its JSON records (`meta.command`)."""

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT
from test_aot_check import AOT_CHECK, load_aot_check
from xinst_jax.config import ConfigError, load_config
from xinst_jax.train.flops import training_flops_per_step

TABLE_MD = os.path.join(REPO_ROOT, "docs", "aot_fit_table.md")
TABLE_JSON = os.path.join(REPO_ROOT, "docs", "aot_fit_table.json")
# The same libtpu compiles the same program to the same bytes; the tolerance leaves room for a
# libtpu patch release within the pinned 0.0.42.x.
GIB_TOLERANCE = 0.02  # relative


def table() -> dict:
    with open(TABLE_JSON) as f:
        return json.load(f)


def cell(model: str, slice_label: str) -> dict:
    return next(c for c in table()["cells"] if c["model"] == model and c["slice"] == slice_label)


def test_slices_by_accelerator_type_and_topology():
    aot = load_aot_check()
    assert aot.parse_slice("v5e-16") == aot.Slice("v5e-16", "v5e:4x4", "v5e", 1)
    assert aot.parse_slice("v4-8").topology == "v4:2x2x1"  # v4 and v5p count TensorCores: 4 chips
    assert aot.parse_slice("v5p-8").topology == "v5p:2x2x1"
    assert aot.parse_slice("v6e-8").topology == "v6e:2x4"
    assert aot.parse_slice("2xv5e-16") == aot.Slice("2xv5e-16", "v5e:4x4", "v5e", 2)
    assert aot.parse_slice("v5e:2x4", 2) == aot.Slice("2xv5e:2x4", "v5e:2x4", "v5e", 2)
    with pytest.raises(ConfigError, match="v5e-12"):
        aot.parse_slice("v5e-12")
    with pytest.raises(ConfigError, match="cannot read"):
        aot.parse_slice("tpu-8")


def test_multi_slice_puts_the_data_axis_across_slices():
    aot = load_aot_check()
    assert aot.slice_overrides("sft_xinst", aot.parse_slice("2xv5e-16"), []) == ["mesh.dcn_data=2"]
    assert aot.slice_overrides("sft_xinst", aot.parse_slice("v5e-16"), ["a.b=1"]) == ["a.b=1"]


def test_candidates_cheapest_first_each_keeping_the_last():
    aot = load_aot_check()
    cfg = load_config("sft_xinst", [])  # fsdp over every chip, remat full already: accumulation, then batch
    assert [aot.as_overrides(cfg, c) for c in aot.fit_candidates(cfg, 16)] == [
        ["train.grad_accum=2"], ["train.grad_accum=4"], ["train.grad_accum=8"],
        ["train.batch_size=64"], ["train.batch_size=32"], ["train.batch_size=16"]]
    cfg = load_config("sft_xinst", ["mesh.fsdp=4", "mesh.tensor=2", "model.remat=none", "train.batch_size=16"])
    assert [aot.as_overrides(cfg, c) for c in aot.fit_candidates(cfg, 8)] == [
        ["mesh.fsdp=-1", "mesh.tensor=1"],
        ["mesh.fsdp=-1", "mesh.tensor=1", "model.remat=dots_saveable"],
        ["mesh.fsdp=-1", "mesh.tensor=1", "model.remat=full"],
        ["mesh.fsdp=-1", "mesh.tensor=1", "model.remat=full", "train.grad_accum=2"],
        ["mesh.fsdp=-1", "mesh.tensor=1", "model.remat=full", "train.batch_size=8"]]


def test_flops_counted_as_xla_counts_a_scan():
    aot = load_aot_check()
    m = load_config("sft_xinst", []).model
    one_layer = dataclasses.replace(m, num_layers=1)
    assert aot.scan_flops(m, 128, 2048, 4) == training_flops_per_step(one_layer, 32, 2048)
    unrolled = dataclasses.replace(m, scan_layers=False)
    assert aot.scan_flops(unrolled, 128, 2048, 1) == training_flops_per_step(m, 128, 2048)


def test_out_of_memory_message_parsed():
    aot = load_aot_check()
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(46.16G) exceeds available HBM (15.75G).")
    assert aot._refused_temporaries(message) == int(46.16 * (1 << 30))
    assert aot._refused_temporaries("INVALID_ARGUMENT: something else") is None


def test_table_markdown_is_rendered_from_its_records():
    aot = load_aot_check()
    records = table()
    with open(TABLE_MD) as f:
        assert f.read() == aot.table_markdown(records["config"], records["cells"], records["meta"])
    models = {c["model"] for c in records["cells"]}
    slices = {c["slice"] for c in records["cells"]}
    assert models == set(aot.TABLE_MODELS) and slices == set(aot.TABLE_SLICES)
    for c in records["cells"]:
        if not c["base"]["fits"] and c["change"]:
            assert c["changed"]["fits"] and c["changed"]["per_chip_gib"] <= c["changed"]["usable_gib"]
        for fit in [c["base"], *c["tried"], *([c["changed"]] if c["changed"] else [])]:
            if fit["state_over_hbm"]:  # never compiled: nothing measured but the state
                assert not fit["compiled"] and fit["compile_s"] == 0 and not fit["xla_tflop"], fit["overrides"]


def test_dagger_marks_a_step_never_compiled_not_a_fast_refusal():
    """† (the state alone is over the HBM, nothing compiled) comes from the record's state_over_hbm,
    * from a compiler refusal, even one that took under 0.05 s (compile_s rounds to 0)."""
    aot = load_aot_check()

    def markdown(**base) -> str:
        return aot._cell_markdown({"base": {"per_chip_gib": 20.0, "usable_gib": 15.75, "compile_s": 0.0, **base},
                                   "change": None, "changed": None})

    assert markdown(fits=False, compiled=False, state_over_hbm=True) == "✗ 20.0† / 15.75; nothing searched fits"
    assert markdown(fits=False, compiled=False, state_over_hbm=False) == "✗ 20.0* / 15.75; nothing searched fits"
    assert markdown(fits=False, compiled=True, state_over_hbm=False) == "✗ 20.0 / 15.75; nothing searched fits"


def test_state_over_the_hbm_is_recorded_as_not_compiled():
    """compile_train stops before compiling when params + optimizer state alone exceed the usable
    bytes, and says so in the record (any devices: nothing is compiled)."""
    import jax

    aot = load_aot_check()
    fit = aot.compile_train("tiny_synthetic", ["train.batch_size=8", "train.seq_len=32"], jax.devices()[:1], 1)
    record = aot._fit_record(fit)
    assert (record["state_over_hbm"], record["compiled"], record["fits"]) == (True, False, False)
    assert fit.per_chip_bytes > 1 and fit.refused == "params + optimizer state alone"


def test_table_searched_the_candidates_in_order():
    """Each cell that does not fit tried fit_candidates' changes in order, stopping at the first that fits."""
    aot = load_aot_check()
    for c in table()["cells"]:
        if c["base"]["fits"]:
            assert not c["tried"] and c["change"] is None
            continue
        cfg = load_config(table()["config"], c["overrides"])
        expected = [c["overrides"] + aot.as_overrides(cfg, change) for change in aot.fit_candidates(cfg, c["chips"])]
        tried = [t["overrides"] for t in c["tried"]]
        assert tried == expected[:len(tried)], (c["model"], c["slice"])
        if tried:
            assert [t["fits"] for t in c["tried"]] == [False] * (len(tried) - 1) + [c["change"] is not None]
        assert c["change"] is not None or len(tried) == len(expected)


needs_libtpu = pytest.mark.skipif(not __import__("importlib.util").util.find_spec("libtpu"),
                                  reason="needs libtpu (the `test` extra installs it)")


def assert_same_fit(got, recorded: dict, what: str):
    aot = load_aot_check()
    command = table()["meta"]["command"]
    assert json.loads(json.dumps(got.model)) == recorded["model"], (
        f"{what}: the table was compiled for another model config; regenerate it: {command}")
    assert got.fits == recorded["fits"] and got.mesh == recorded["mesh"], (what, got, recorded)
    gib = got.per_chip_bytes / aot.GIB
    assert abs(gib - recorded["per_chip_gib"]) <= GIB_TOLERANCE * recorded["per_chip_gib"], (
        f"{what}: {gib:.3f} GiB per chip, the table says {recorded['per_chip_gib']}; regenerate it: {command}")


def refused_cell() -> dict:
    """A cell the compiler refuses as configured (a refusal takes seconds) and that a change makes fit."""
    cells = [c for c in table()["cells"]
             if c["change"] and not c["base"]["compiled"] and not c["base"]["state_over_hbm"]]
    return min(cells, key=lambda c: c["changed"]["compile_s"])


def cheapest_change() -> dict:
    """The cell whose change (a step that fits) compiled fastest when the table was made."""
    return min((c for c in table()["cells"] if c["change"]), key=lambda c: c["changed"]["compile_s"])


def compile_for(cell: dict, overrides: list[str]):
    aot = load_aot_check()
    aot.quiet_libtpu()
    tpu = aot.parse_slice(cell["slice"])
    return aot.compile_train(table()["config"], overrides, aot.slice_devices(tpu), aot.USABLE_HBM_BYTES[tpu.generation])


@needs_libtpu
def test_table_refusals_as_recorded():
    """A cell that does not fit as configured: the step as configured and every cheaper candidate that
    the compiler refused are refused again, with the memory the table records."""
    recorded = refused_cell()
    assert_same_fit(compile_for(recorded, recorded["overrides"]), recorded["base"], "as configured")
    for candidate in recorded["tried"]:
        if not candidate["compiled"]:
            assert_same_fit(compile_for(recorded, candidate["overrides"]), candidate, " ".join(candidate["overrides"]))


@pytest.mark.slow
@needs_libtpu
def test_table_change_compiles_as_recorded():
    """The change the table names for a cell compiles, fits, and needs the recorded memory and FLOPs.
    One compile of a 7-13B train step takes minutes here: CI compiles the one that took least
    (the table's script checks every cell, and the steps that compiled but came out over the HBM)."""
    recorded = cheapest_change()
    start = time.perf_counter()
    fit = compile_for(recorded, recorded["changed"]["overrides"])
    assert fit.memory is not None, fit.refused
    assert_same_fit(fit, recorded["changed"], " ".join(recorded["change"]))
    assert fit.xla_flops / 1e12 == pytest.approx(recorded["changed"]["xla_tflop"], rel=0.02)
    print(f"{recorded['model']} on {recorded['slice']} with {recorded['change']}: {time.perf_counter() - start:.0f} s")


@needs_libtpu
def test_cli_verdict_when_state_alone_exceeds_the_hbm():
    """Llama-2-13B on a v5e-8: params and fp32 Adam state alone exceed 16 GiB per chip, so no change
    searched is compiled; the exit code is 1 and the message says what would help."""
    recorded = cell("llama2_13b", "v5e-8")
    result = subprocess.run([sys.executable, AOT_CHECK, "--topology", "v5e-8", "--set", "model.preset=llama2_13b"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    assert "DOES NOT FIT" in result.stderr and "params + optimizer state alone" in result.stderr
    assert "no change searched fits" in result.stdout
    assert f"{recorded['base']['per_chip_gib']:.2f} of 15.75 GiB per chip" in result.stderr
