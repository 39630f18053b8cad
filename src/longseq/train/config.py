"""The trainer's configuration: one documented dataclass per section of the YAML file, and TrainConfig over them.

Each field's doc is the string literal under it (torchtitan style): the one source of truth for defaults, docs and
`longseq train --help`. Checks that need one section live in its `__post_init__`. Loading YAML, command-line
overrides, type conversion and the help text are in config_loader.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from longseq import AutoMemory, MemoryConfig


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
    """Attention kernel on the gathered sequence: sdpa, flex_attention, flash_attention_2/3 (flash-attn, CUDA), or
    eager (parallel.sp = 1 only)."""

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
    cache_dir: str | None = None
    """Where the documents are tokenised once and memory-mapped by every rank of a host (Note [Token cache] in
    data/cache.py); None: $LONGSEQ_CACHE_DIR, else ~/.cache/longseq/tokens."""

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
    """Keep FSDP2's sharded parameters, gradients and optimizer state in host memory (GPU only). Fixed when the model
    is sharded: `memory: auto` plans with it as set (`longseq plan` tells whether a length needs it)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name}={getattr(self, name)} must be at least 1.")
        if self.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"training.mixed_precision={self.mixed_precision!r}: choose auto, bf16 or fp32.")


@dataclass(kw_only=True)
class EvalSection:
    """Held-out documents: their exact mean loss over every token, computed sharded like training."""

    paths: list[str] = field(default_factory=list)
    """Files, directories or globs of the eval documents (empty: no evaluation); read, tokenized and packed like
    data.paths, with data's format, text_field, tokenizer and seq_len."""
    split: str = "validation"
    """The split to read when an hf_disk path holds a DatasetDict."""
    every: int = 0
    """Evaluate every this many steps, and after the last one (0: after the last step only)."""
    max_sequences: int | None = None
    """Evaluate the first this many packed sequences (None: all of them)."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every={self.every} must be >= 0 (0: after the last step only).")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise ConfigError(f"eval.max_sequences={self.max_sequences} must be at least 1 (or None: all).")


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
    memory: MemoryConfig | AutoMemory | None = field(default_factory=AutoMemory)
    """Memory features. Default `memory: auto`: the planner picks them for each batch shape (docs/plan.md), for
    full training with training.cpu_offload as set; a key below forces that one field whatever the plan picks
    (defaults shown are MemoryConfig's, used with `memory.auto: false`: exactly the keys as given, all on unless
    set off). `memory: false` switches them all off."""
    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer and schedule."""
    training: TrainingSection = field(default_factory=TrainingSection)
    """The loop."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Evaluation."""
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoints and export."""
    metrics: MetricsSection = field(default_factory=MetricsSection)
    """Outputs and feedback."""
