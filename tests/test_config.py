"""The config loader: `base:` inheritance, `--set` overrides, presets, and one-line errors that
name the key and the file (or `--set`) it came from."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from xinst_jax import config as config_mod
from xinst_jax.config import (
    Config,
    ConfigError,
    ExportConfig,
    ModelConfig,
    RopeScalingConfig,
    architecture_is_default,
    available_configs,
    check_same_architecture,
    dump_yaml,
    from_dict,
    load_config,
    load_model_preset,
    model_preset,
    model_presets,
    resolve_config_path,
    save_resolved,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load(path: Path, *overrides: str) -> Config:
    return load_config(str(path), list(overrides))


def error_of(path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, *overrides)
    message = str(info.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    return message


# --------------------------------------------------------------------------- base inheritance


def test_multi_level_base_with_relative_paths(tmp_path, monkeypatch):
    write(tmp_path / "shared" / "root.yaml", """
        seed: 1
        run_dir: from_root
        model:
          embed_dim: 32
          num_layers: 3
          rope_scaling:
            factor: 2.0
    """)
    write(tmp_path / "shared" / "mid" / "mid.yaml", """
        base: ../root.yaml
        model:
          num_layers: 4
          rope_scaling:
            low_freq_factor: 0.5
    """)
    top = write(tmp_path / "exp" / "top.yaml", """
        base: ../shared/mid/mid.yaml
        seed: 7
    """)
    monkeypatch.chdir(tmp_path / "shared")  # bases resolve against the file, not the cwd
    cfg = load(top)
    assert cfg.seed == 7  # top wins
    assert cfg.run_dir == "from_root"  # inherited through two levels
    assert cfg.model.num_layers == 4  # mid wins over root
    assert cfg.model.embed_dim == 32  # a deep merge: mid's model: does not drop root's keys
    assert cfg.model.rope_scaling.factor == 2.0 and cfg.model.rope_scaling.low_freq_factor == 0.5
    assert cfg.model.num_heads == ModelConfig().num_heads  # untouched keys keep schema defaults
    assert cfg.name == "top"


def test_list_of_bases_later_wins(tmp_path):
    write(tmp_path / "a.yaml", "seed: 1\nrun_dir: a\n")
    write(tmp_path / "b.yaml", "seed: 2\n")
    cfg = load(write(tmp_path / "c.yaml", "base: [a.yaml, b.yaml]\n"))
    assert (cfg.seed, cfg.run_dir) == (2, "a")


def test_missing_base_names_file_and_parent(tmp_path):
    child = write(tmp_path / "child.yaml", "base: nowhere/gone.yaml\nseed: 1\n")
    msg = error_of(child)
    assert "gone.yaml" in msg and "child.yaml" in msg


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "sub" / "a.yaml", "base: ../b.yaml\n")
    b = write(tmp_path / "b.yaml", "base: sub/../sub/a.yaml\n")  # the same file spelt differently
    assert "cycle" in error_of(b)


def test_base_must_be_names(tmp_path):
    msg = error_of(write(tmp_path / "c.yaml", "base: 3\n"))
    assert "c.yaml" in msg and "base" in msg


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no_such_config"):
        load_config("no_such_config")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(str(tmp_path / "missing.yaml"))


def test_top_level_must_be_a_mapping(tmp_path):
    msg = error_of(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    assert "list.yaml" in msg and "mapping" in msg


# --------------------------------------------------------------------------- --set


def test_set_overrides_types(tmp_path):
    path = write(tmp_path / "c.yaml", """
        seed: 1
        model:
          embed_dim: 32
          pad_token_id: 0
    """)
    cfg = load(path, "seed=5", "model.norm_eps=1e-6", "model.rope_theta=500000", "model.tie_embeddings=true",
               "run_dir=/tmp/x y", "model.pad_token_id=null", "model.rope_scaling.type=llama3",
               "model.rope_scaling.factor=4", "export.max_shard_bytes=2_000_000")
    assert cfg.seed == 5 and type(cfg.seed) is int
    assert cfg.model.norm_eps == 1e-6 and type(cfg.model.norm_eps) is float  # `1e-6` is a float, not a str
    assert cfg.model.rope_theta == 500000.0 and type(cfg.model.rope_theta) is float  # int widens to float
    assert cfg.model.tie_embeddings is True
    assert cfg.run_dir == "/tmp/x y"
    assert cfg.model.pad_token_id is None
    assert cfg.model.rope_scaling == RopeScalingConfig(type="llama3", factor=4.0)
    assert cfg.export.max_shard_bytes == 2_000_000
    assert cfg.model.embed_dim == 32  # a nested --set merges, it does not replace model:


def test_set_is_repeatable_and_later_wins(tmp_path):
    path = write(tmp_path / "c.yaml", "seed: 1\n")
    assert load(path, "seed=2", "seed=3").seed == 3
    assert load(path, "model.num_layers=6", "model.embed_dim=48", "model.num_layers=8").model.num_layers == 8


def test_set_strings_stay_strings(tmp_path):
    # YAML 1.1 would turn `no` (Norwegian) into False and `1e-3`-like names into floats.
    path = write(tmp_path / "c.yaml", "run_dir: no\n")
    assert load(path).run_dir == "no"
    assert load(path, "run_dir=off").run_dir == "off"
    assert load(path, "export.out=123").export.out == "123"


def test_set_without_equals(tmp_path):
    with pytest.raises(ConfigError, match="--set"):
        load(write(tmp_path / "c.yaml", "seed: 1\n"), "model.num_layers")


def test_yaml_scientific_floats(tmp_path):
    cfg = load(write(tmp_path / "c.yaml", "model:\n  norm_eps: 1e-5\n  init_std: 2E-2\n"))
    assert cfg.model.norm_eps == 1e-5 and cfg.model.init_std == 0.02


# --------------------------------------------------------------------------- presets


# The published checkpoints' config.json numbers: (vocab, hidden, layers, heads, kv heads, head dim,
# intermediate, rope theta, max positions, tied, bos, eos).
PUBLISHED = {
    "smollm2_135m": (49152, 576, 30, 9, 3, 64, 1536, 100000.0, 8192, True, 1, 2),
    "llama2_7b": (32000, 4096, 32, 32, 32, 128, 11008, 10000.0, 4096, False, 1, 2),
    "llama2_13b": (32000, 5120, 40, 40, 40, 128, 13824, 10000.0, 4096, False, 1, 2),
    "llama3_8b": (128256, 4096, 32, 32, 8, 128, 14336, 500000.0, 8192, False, 128000, 128001),
    "llama3_2_1b": (128256, 2048, 16, 32, 8, 64, 8192, 500000.0, 131072, True, 128000, 128001),
}
ROPE_SCALED = {"llama3_2_1b": ("llama3", 32.0, 1.0, 4.0, 8192)}  # meta-llama/Llama-3.2-1B config.json


def test_preset_files_hold_the_published_numbers():
    assert set(model_presets()) == {"tiny", *PUBLISHED}
    fields = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
              "rope_theta", "max_seq_len", "tie_embeddings", "bos_token_id", "eos_token_id")
    for name, numbers in PUBLISHED.items():
        model = model_preset(name)
        assert tuple(getattr(model, f) for f in fields) == numbers, name
        rope = model.rope_scaling
        scaling = (rope.type, rope.factor, rope.low_freq_factor, rope.high_freq_factor,
                   rope.original_max_position_embeddings)
        assert (scaling if rope.type != "none" else None) == ROPE_SCALED.get(name) and model.preset == name
    assert model_preset("tiny", num_layers=1).num_layers == 1


def test_config_module_does_not_import_the_model():
    import subprocess
    import sys

    code = ("import sys, xinst_jax.config; "
            "print(sorted(m for m in sys.modules if m.startswith(('xinst_jax.model', 'jax'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=config_mod.CONFIG_DIR.parent).stdout
    assert out.strip() == "[]", out


def test_preset_values_and_explicit_keys_win(tmp_path):
    tiny = load_model_preset("tiny")
    path = write(tmp_path / "c.yaml", f"""
        model:
          preset: tiny
          num_layers: {tiny["num_layers"] + 3}
    """)
    cfg = load(path)
    assert cfg.model.preset == "tiny"
    assert cfg.model.num_layers == tiny["num_layers"] + 3  # explicit file key beats the preset
    for key, value in tiny.items():
        if key != "num_layers":
            assert getattr(cfg.model, key) == value, key
    # --set beats both the file and the preset
    cfg = load(path, f"model.vocab_size={tiny['vocab_size'] * 2}", "model.num_layers=1")
    assert cfg.model.vocab_size == tiny["vocab_size"] * 2 and cfg.model.num_layers == 1


def test_preset_from_base_and_switch_by_set(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  preset: tiny\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\n")
    assert load(child).model.embed_dim == load_model_preset("tiny")["embed_dim"]
    big = load(child, "model.preset=llama2_7b").model
    assert (big.embed_dim, big.num_layers, big.vocab_size) == (4096, 32, 32000)
    plain = load(child, "model.preset=null").model  # back to the schema defaults
    assert plain.preset is None and plain.embed_dim == ModelConfig().embed_dim


def test_unknown_preset_names_key_and_file(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  preset: tinyy\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nseed: 1\n")
    msg = error_of(child)
    assert "model.preset" in msg and "base.yaml" in msg and "tinyy" in msg
    assert "known: llama2_13b, llama2_7b, llama3_2_1b, llama3_8b, smollm2_135m, tiny" in msg
    msg = error_of(child, "model.preset=gpt5")
    assert "model.preset" in msg and "--set" in msg and "gpt5" in msg
    msg = error_of(child, "model.preset=../demo")  # a name, never a path out of configs/models
    assert "unknown preset '../demo'" in msg


def test_preset_file_errors_name_the_preset_file(tmp_path, monkeypatch):
    monkeypatch.setattr(config_mod, "MODELS_DIR", tmp_path / "models")
    write(tmp_path / "models" / "typo.yaml", "embed_dimm: 40\n")
    write(tmp_path / "models" / "typed.yaml", "num_layers: two\n")
    path = write(tmp_path / "c.yaml", "model:\n  preset: typo\n")
    msg = error_of(path)
    assert "models/typo.yaml" in msg and "model.embed_dimm" in msg
    msg = error_of(path, "model.preset=typed")
    assert "models/typed.yaml" in msg and "model.num_layers" in msg and "int" in msg


def test_preset_with_nested_values(tmp_path, monkeypatch):
    monkeypatch.setattr(config_mod, "MODELS_DIR", tmp_path / "models")
    write(tmp_path / "models" / "nested.yaml", "embed_dim: 40\nrope_scaling:\n  type: llama3\n  factor: 8.0\n")
    path = write(tmp_path / "c.yaml", "model:\n  preset: nested\n")
    assert load(path, "model.rope_scaling.factor=2").model.rope_scaling.factor == 2.0  # merged into, not replaced
    again = load(path).model
    assert again.rope_scaling.factor == 8.0 and again.rope_scaling.type == "llama3" and again.embed_dim == 40


def test_preset_wrong_type(tmp_path):
    msg = error_of(write(tmp_path / "c.yaml", "model:\n  preset: [tiny]\n"))
    assert "model.preset" in msg and "c.yaml" in msg


# --------------------------------------------------------------------------- cross-key checks


def test_seq_len_above_max_seq_len_names_both(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  preset: tiny\ntrain:\n  seq_len: 600\n")
    msg = error_of(path)
    assert "c.yaml" in msg and "train.seq_len=600" in msg and "model.max_seq_len=512" in msg
    assert "models/tiny.yaml" in msg
    assert load(path, "model.max_seq_len=600").train.seq_len == 600
    msg = error_of(write(tmp_path / "d.yaml", "seed: 1\n"), "train.seq_len=4096")  # no preset: schema default
    assert "--set" in msg and "model.max_seq_len=2048" in msg
    # left to a HF checkpoint's config.json: the trainer checks once it has read it
    assert load(tmp_path / "d.yaml", "train.seq_len=4096", "train.init_from=/hf").train.seq_len == 4096


# --------------------------------------------------------------------------- architecture


def test_architecture_is_default():
    assert architecture_is_default(ModelConfig())
    assert architecture_is_default(ModelConfig(dtype="bfloat16", remat="full"))  # compute settings
    assert not architecture_is_default(ModelConfig(preset="tiny"))
    assert not architecture_is_default(ModelConfig(rope_theta=5e5))
    assert not architecture_is_default(ModelConfig(eos_token_id=7))


def test_check_same_architecture(caplog):
    tiny = model_preset("tiny")
    check_same_architecture(tiny, dataclasses.replace(tiny, dtype="bfloat16", remat="full"), "ckpt")
    for saved in (dataclasses.replace(tiny, mlp_dim=192), {"mlp_dim": 192}):  # a dataclass or a saved dict
        with pytest.raises(ConfigError) as e:
            check_same_architecture(tiny, saved, "/ckpt/3")
        msg = str(e.value)
        assert msg.startswith("/ckpt/3: ") and "model.mlp_dim is 192 in the checkpoint but 176" in msg, msg
    with caplog.at_level("WARNING"):  # the weights load; the numbers they were trained with differ
        saved = {**dataclasses.asdict(tiny), "rope_theta": 5e5, "eos_token_id": 9}
        check_same_architecture(tiny, saved, "hf/config.json")
    assert "hf/config.json" in caplog.text and "model.rope_theta 500000.0 -> 10000.0" in caplog.text
    assert "model.eos_token_id 9 -> 2" in caplog.text


# --------------------------------------------------------------------------- errors


def test_unknown_key_names_key_and_file(tmp_path):
    msg = error_of(write(tmp_path / "c.yaml", "seed: 1\nsede: 2\n"))
    assert "'sede'" in msg and "c.yaml" in msg


def test_unknown_nested_key_in_base_names_the_base(tmp_path):
    write(tmp_path / "parent.yaml", "model:\n  rope_scaling:\n    factr: 2\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\nseed: 1\n")
    msg = error_of(child)
    assert "model.rope_scaling.factr" in msg and "parent.yaml" in msg and "child.yaml" not in msg


def test_unknown_key_via_set(tmp_path):
    path = write(tmp_path / "c.yaml", "seed: 1\n")
    msg = error_of(path, "model.num_layerz=3")
    assert "model.num_layerz" in msg and "--set" in msg
    msg = error_of(path, "nosuch.section.key=1")
    assert "nosuch" in msg and "--set" in msg


def test_wrong_type_names_key_type_and_file(tmp_path):
    msg = error_of(write(tmp_path / "typed.yaml", "model:\n  num_layers: four\n"))
    assert "model.num_layers" in msg and "int" in msg and "typed.yaml" in msg and "four" in msg
    msg = error_of(write(tmp_path / "b.yaml", "model:\n  num_layers: true\n"))  # a bool is not an int
    assert "model.num_layers" in msg and "int" in msg
    msg = error_of(write(tmp_path / "f.yaml", "model:\n  norm_eps: small\n"))
    assert "model.norm_eps" in msg and "float" in msg
    msg = error_of(write(tmp_path / "s.yaml", "model: 5\n"))  # a section given a scalar
    assert "model" in msg and "ModelConfig" in msg
    msg = error_of(write(tmp_path / "ok.yaml", "seed: 1\n"), "model.tie_embeddings=maybe")
    assert "model.tie_embeddings" in msg and "bool" in msg and "--set" in msg


def test_optional_int(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  pad_token_id: 3\n")
    assert load(path).model.pad_token_id == 3
    msg = error_of(path, "model.pad_token_id=x")
    assert "model.pad_token_id" in msg and "int" in msg and "null" in msg


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", """
        seed: 1
        model:
          embed_dim: [32
          num_layers: 2
    """)
    with pytest.raises(ConfigError) as info:
        load(path)
    msg = str(info.value)
    assert "broken.yaml:" in msg and "invalid YAML" in msg
    line = int(msg.split("broken.yaml:")[1].split(":")[0])
    assert 3 <= line <= 5  # the unclosed bracket on line 3, reported where the parser notices


@pytest.mark.parametrize("key,bad", [("model.dtype", "float16"), ("model.param_dtype", "fp32"),
                                     ("model.remat", "sometimes"), ("export.dtype", "int8"),
                                     ("model.rope_scaling.type", "yarn")])
def test_literal_fields_reject_bad_values(tmp_path, key, bad):
    section, _, leaf = key.rpartition(".")
    lines, indent = [], ""
    for part in section.split("."):
        lines.append(f"{indent}{part}:")
        indent += "  "
    path = write(tmp_path / "lit.yaml", "\n".join(lines + [f"{indent}{leaf}: {bad}"]) + "\n")
    msg = error_of(path)
    assert key in msg and "lit.yaml" in msg and bad in msg
    msg = error_of(write(tmp_path / "ok.yaml", "seed: 1\n"), f"{key}={bad}")
    assert key in msg and "--set" in msg


def test_literal_fields_accept_good_values(tmp_path):
    cfg = load(write(tmp_path / "c.yaml", "seed: 1\n"), "model.dtype=bfloat16", "model.remat=full",
               "export.dtype=float32")
    assert (cfg.model.dtype, cfg.model.remat, cfg.export.dtype) == ("bfloat16", "full", "float32")


# --------------------------------------------------------------------------- API


def test_from_dict_validates():
    cfg = from_dict(ExportConfig, {"dtype": "float32", "max_shard_bytes": 10})
    assert cfg == ExportConfig(dtype="float32", max_shard_bytes=10)
    with pytest.raises(ConfigError, match="bogus"):
        from_dict(ModelConfig, {"bogus": 1})
    with pytest.raises(ConfigError, match="embed_dim"):
        from_dict(ModelConfig, {"embed_dim": "wide"})


def test_resolved_config_round_trips(tmp_path):
    path = write(tmp_path / "c.yaml", "model:\n  preset: tiny\n  norm_eps: 1e-6\nseed: 4\n")
    cfg = load(path, "run_dir=" + str(tmp_path / "run"), "model.rope_scaling.type=llama3")
    saved = save_resolved(cfg)
    assert saved == tmp_path / "run" / "config.yaml"
    assert load(saved) == cfg  # the resolved file reloads to the same config
    assert "norm_eps: 1.0e-06" in dump_yaml(cfg) or "norm_eps: 1e-06" in dump_yaml(cfg)


def test_run_dir_default(tmp_path):
    cfg = load(write(tmp_path / "myexp.yaml", "seed: 1\n"))
    assert cfg.resolved_run_dir() == Path("runs") / "myexp"


def test_shipped_configs_load():
    names = available_configs()
    assert {"base", "export_hf"} <= set(names)
    assert resolve_config_path("export_hf") == config_mod.CONFIG_DIR / "export_hf.yaml"
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name and isinstance(cfg, Config)
    export = load_config("export_hf")
    assert export.job == "export_hf"
    assert dataclasses.asdict(export.model) == dataclasses.asdict(load_config("base").model)
