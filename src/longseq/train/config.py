"""The trainer's configuration: a tree of documented dataclasses, loaded from YAML with `--section.key=value` overrides.

Each field's doc is the string literal under it (torchtitan style); `field_docs` reads those with `ast`, so the
dataclasses are the one source of truth for defaults, docs, `longseq train --help` and validation.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml

from longseq.memory.config import MemoryConfig


class ConfigError(ValueError):
    """A configuration mistake; the message names the field and the fix."""


@dataclass(kw_only=True)
class ModelSection:
    """Which model to train and how to build it."""

    path: str | None = None
    """Hugging Face model id or local directory (from_pretrained); with random_init only its config is read."""
    random_init: bool = False
    """Initialise the weights randomly from the config (benchmarks, tests) instead of loading them."""
    config: dict = field(default_factory=dict)
    """Overrides of the model config's fields; without a path it must name model_type (e.g. llama)."""
    dtype: str = "float32"
    """dtype of the trained (master) weights and optimizer state: float32 or bfloat16; compute dtype: training.mixed_precision."""
    attn_implementation: str = "sdpa"
    """Attention kernel on the gathered sequence: sdpa, flash_attention_2, eager, ..."""

    def __post_init__(self) -> None:
        if self.path is None and "model_type" not in self.config:
            raise ConfigError("model.path is not set: give a model id/directory, or model.config with a model_type "
                              "(e.g. {model_type: llama, hidden_size: 256}) for a randomly initialised model.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model.dtype={self.dtype!r}: choose float32 or bfloat16.")


@dataclass(kw_only=True)
class DataSection:
    """Where the documents come from and how they become sequences."""

    paths: list[str] = field(default_factory=list)
    """Files, directories or globs: .jsonl, .parquet, .txt/.md/.py (one document per file), or an HF dataset saved with save_to_disk."""
    format: str = "auto"
    """auto (by extension), jsonl, parquet, text or hf_disk."""
    text_field: str = "text"
    """The column/key holding each document's text (jsonl, parquet, hf_disk)."""
    split: str = "train"
    """The split to read when an hf_disk path holds a DatasetDict."""
    tokenizer: str = "byte"
    """'byte' (built-in: 256 byte values + BOS/EOS/PAD) or a local Hugging Face tokenizer directory."""
    seq_len: int = 4096
    """Tokens per packed sequence; documents are concatenated and cut to this length."""
    shuffle: bool = True
    """Shuffle documents before packing and the packed sequences every epoch (seeded by training.seed)."""
    max_documents: int | None = None
    """Read at most this many documents (None: all)."""

    def __post_init__(self) -> None:
        if not self.paths:
            raise ConfigError("data.paths is empty: list the files, directories or globs to train on.")
        if self.format not in ("auto", "jsonl", "parquet", "text", "hf_disk"):
            raise ConfigError(f"data.format={self.format!r}: choose auto, jsonl, parquet, text or hf_disk.")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be at least 2 tokens.")


@dataclass(kw_only=True)
class ParallelSection:
    """How the ranks split the work: sequence parallelism (sp = ulysses × ring) and data parallelism (dp)."""

    sp: int | None = None
    """Sequence-parallel degree (None: all ranks, or world_size // dp)."""
    dp: int | None = None
    """Data-parallel degree (None: world_size // sp)."""
    ring: int | None = None
    """Ring-attention degree inside sp (None: Ulysses as wide as the heads allow, ring for the rest)."""
    linear_attention: str = "auto"
    """Gated DeltaNet layers (Qwen3-Next, Qwen3.5, OLMo-Hybrid): heads (Ulysses), state (state passing) or auto."""

    def __post_init__(self) -> None:
        for name in ("sp", "dp", "ring"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"parallel.{name}={value} must be a positive integer (or unset).")
        if self.linear_attention not in ("auto", "heads", "state"):
            raise ConfigError(f"parallel.linear_attention={self.linear_attention!r}: choose auto, heads or state.")


@dataclass(kw_only=True)
class OptimSection:
    """AdamW and its learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many steps."""
    schedule: str = "cosine"
    """Decay after warmup: cosine, linear or constant."""
    min_lr_ratio: float = 0.1
    """The learning rate at the last step, as a fraction of lr."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value (None: no clipping)."""

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optim.schedule={self.schedule!r}: choose cosine, linear or constant.")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas={self.betas} must be two numbers, e.g. [0.9, 0.95].")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim: lr must be > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1.")


@dataclass(kw_only=True)
class TrainingSection:
    """The loop: steps, batch, precision, sharding."""

    steps: int = 1000
    """Optimizer steps to train for."""
    batch_size: int = 1
    """Sequences per micro-step per data-parallel rank (all sp ranks of a dp group share them)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step; the loss is the exact mean over all of them."""
    seed: int = 0
    """Seed for random init, data order and per-step randomness."""
    mixed_precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), bf16 (compute in bf16, reduce gradients in fp32) or fp32."""
    cpu_offload: bool = False
    """Keep FSDP2's sharded parameters, gradients and optimizer state in host memory (GPU only)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name}={getattr(self, name)} must be at least 1.")
        if self.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"training.mixed_precision={self.mixed_precision!r}: choose auto, bf16 or fp32.")


@dataclass(kw_only=True)
class CheckpointSection:
    """torch.distributed.checkpoint snapshots and the final Hugging Face export."""

    every: int = 500
    """Save a checkpoint every this many steps (0: only at the end); one is always saved at the end and on Ctrl-C."""
    resume: bool = True
    """Continue from the latest checkpoint in the run directory if there is one."""
    resume_from: str | None = None
    """Start from this checkpoint directory instead (e.g. another run's checkpoints/step_000100)."""
    keep: int | None = 2
    """Keep only the newest this many checkpoints (None: keep all)."""
    export_hf: bool = True
    """At the end, write the model in Hugging Face format (safetensors + config) to <run_dir>/hf."""

    def __post_init__(self) -> None:
        if self.every < 0 or (self.keep is not None and self.keep < 1):
            raise ConfigError("checkpoint: every must be >= 0 and keep >= 1 (or None).")


@dataclass(kw_only=True)
class MetricsSection:
    """Where the run writes and what it shows."""

    run_dir: str = "runs/longseq"
    """Directory for the resolved config, metrics.jsonl, TensorBoard events, checkpoints and the export."""
    log_every: int = 1
    """Write metrics every this many steps."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    tensorboard: bool = True
    """Also write TensorBoard events (needs the tensorboard package; skipped with a message if missing)."""
    peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s of one accelerator, for MFU (None: known GPUs are looked up, else no MFU)."""

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ConfigError(f"metrics.log_every={self.log_every} must be at least 1.")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything `longseq train` needs."""

    model: ModelSection
    """The model."""
    data: DataSection
    """The data."""
    parallel: ParallelSection = field(default_factory=ParallelSection)
    """Sequence and data parallelism."""
    memory: MemoryConfig | None = None
    """Memory features (None: off; setting any memory.* key turns them on with MemoryConfig's defaults)."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer and schedule."""
    training: TrainingSection = field(default_factory=TrainingSection)
    """The loop."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoints and export."""
    metrics: MetricsSection = field(default_factory=MetricsSection)
    """Outputs and feedback."""


def sections() -> dict[str, type]:
    """Section name -> dataclass, in the order of TrainConfig."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: _dataclass_of(hints[f.name]) for f in dataclasses.fields(TrainConfig)}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) \
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """Build a TrainConfig from `base`, then a YAML file, then `section.key=value` overrides (later wins)."""
    raw = copy.deepcopy(base or {})
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read the config file {path}: {e.strerror}.") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model:, data:, ...).")
        raw = _merge(raw, loaded)
    for item in overrides:
        key, value = _split_override(item)
        _set_dotted(raw, key, value)
    return from_dict(raw)


def from_dict(raw: dict) -> TrainConfig:
    known = sections()
    for name in raw:
        if name not in known:
            raise ConfigError(f"unknown section {name!r}{_suggest(name, known)}")
    values = {}
    for name, cls in known.items():
        section = raw.get(name)
        if section is None:
            if name in ("model", "data"):
                raise ConfigError(f"the config has no {name}: section; see `longseq train --help`.")
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: must be a mapping of keys, got {section!r}.")
        values[name] = _build(cls, section, name)
    return TrainConfig(**values)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def _build(cls: type, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key {prefix}.{key}{_suggest(key, names, prefix + '.')}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix}: {e}") from e


def _coerce(value, hint, name: str):
    """Check `value` against the annotation, converting strings from the command line."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in options:
            return None
        raise ConfigError(f"{name} cannot be empty; give a value of type {_type_name(hint)}.")
    for option in options:
        if option is type(None):
            continue
        converted = _convert(value, option)
        if converted is not _NO:
            return converted
    raise ConfigError(f"{name}={value!r} is not a valid {_type_name(hint)}.")


_NO = object()


def _convert(value, option):
    origin = typing.get_origin(option) or option
    if origin is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        return {"true": True, "false": False, "1": True, "0": False}.get(text, _NO)
    if origin in (int, float):
        if isinstance(value, bool):
            return _NO
        try:
            number = origin(value) if isinstance(value, str) or origin is float else value
        except ValueError:
            return _NO
        return number if isinstance(number, origin) else _NO
    if origin is str:
        return value if isinstance(value, str) else _NO
    if origin is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            return _NO
        (item_type,) = typing.get_args(option) or (str,)
        converted = [_convert(v, item_type) for v in items]
        return _NO if _NO in converted else converted
    if origin is dict:
        return value if isinstance(value, dict) else _NO
    return _NO


def _dataclass_of(hint) -> type:
    return next(a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a))


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _suggest(name: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {prefix + close[0]!r}?" if close else f"; known: {', '.join(choices)}."


def _split_override(item: str) -> tuple[str, object]:
    text = item[2:] if item.startswith("--") else item
    if "=" not in text:
        raise ConfigError(f"override {item!r} must look like --section.key=value.")
    key, value = text.split("=", 1)
    return key, yaml.safe_load(value) if value else ""


def _set_dotted(raw: dict, key: str, value) -> None:
    parts = key.split(".")
    if parts == ["memory"] and value in (None, False):  # --memory=null switches the features off
        raw["memory"] = None
        return
    if len(parts) != 2:
        raise ConfigError(f"override key {key!r} must be section.key, e.g. training.steps; see --help.")
    section = raw.setdefault(parts[0], {})
    if section is None:  # memory: null, then a memory key switches the features on
        section = raw[parts[0]] = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{parts[0]} is {section!r}, not a section; cannot set {key}.")
    section[parts[1]] = value


def _merge(into: dict, new: dict) -> dict:
    out = dict(into)
    for key, value in new.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def help_text() -> str:
    """Every field with its default and doc line, for `longseq train --help`."""
    lines = []
    for name, cls in sections().items():
        doc = field_docs(TrainConfig)[name]
        lines.append(f"\n{name}: {doc}")
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  --{name}.{f.name}={default!r}\n      {field_docs(cls).get(f.name, '')}")
    return "\n".join(lines)
