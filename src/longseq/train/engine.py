"""Model, FSDP2, optimizer and schedule: each one function, composed in `build_engine` in a fixed order.

Order (torchtitan's): build the model → longseq.apply (sequence parallelism and memory features swap attention and
wrap modules, so they go first) → fully_shard each decoder layer, then the root → AdamW over the sharded parameters.
FSDP2 averages gradients over all ranks, which is what Note [Exact global loss] expects.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

import longseq
from longseq.mesh import Mesh
from longseq.models.anatomy import decoder_layers
from longseq.train.config import ConfigError, ModelSection, OptimSection, TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def model_config(section: ModelSection):
    """The model's transformers config: from model.path (or a bare model_type), with model.config applied."""
    from transformers import AutoConfig

    overrides = dict(section.config)
    if section.path is None:
        return AutoConfig.for_model(overrides.pop("model_type"), **overrides)
    return AutoConfig.from_pretrained(section.path, **overrides)


def build_model(section: ModelSection, config, seed: int, vocab_size: int):
    """from_pretrained (or random init from `config`, model_config's result) on the host, identical on every rank."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[section.dtype]
    if config.vocab_size < vocab_size:
        raise ConfigError(f"the model's vocab_size={config.vocab_size} is smaller than the tokenizer's {vocab_size}; "
                          f"set model.config.vocab_size >= {vocab_size} or pick the model's own tokenizer.")
    if section.path is None or section.random_init:
        torch.manual_seed(seed)  # every rank draws the same weights; FSDP2 then keeps each rank's shard
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=section.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(section.path, config=config, dtype=dtype,
                                                     attn_implementation=section.attn_implementation)
    return model.train()


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def apply_fsdp(model, device: torch.device, *, param_dtype: torch.dtype, cpu_offload: bool) -> None:
    """fully_shard every decoder layer, then the root, over a 1-D mesh of all ranks.

    The model may still be on the host: fully_shard moves each rank's shard to `device` (or keeps it on the host
    with cpu_offload), so the whole model never sits on one accelerator.
    """
    if cpu_offload and device.type != "cuda":
        raise ConfigError("training.cpu_offload=true needs GPUs (parameters already live in host memory on CPU); "
                          "set it to false.")
    world = dist.get_world_size()
    fsdp_mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kwargs = dict(mesh=fsdp_mesh, mp_policy=policy)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    if cpu_offload:
        longseq.memory.reserve_host_memory(model, offloaded_state_bytes(model))


def offloaded_state_bytes(model) -> int:
    """Host bytes this rank's CPU-offloaded training state adds after the first forward: a gradient and AdamW's two
    moments per local parameter element, in the parameter's dtype (the checkpoint offload leaves room for them)."""
    local = (getattr(p, "to_local", lambda: p)() for p in model.parameters() if p.requires_grad)
    return 3 * sum(t.numel() * t.element_size() for t in local)


def build_optimizer(model, section: OptimSection, steps: int):
    """AdamW with weight decay on matrices only, and linear warmup + cosine/linear/constant decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": section.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one vectorised kernel per step, on the GPU and on the host alike (the CPU-offloaded step of an 8B model's
    # 4B-parameter shard is ~6× faster than foreach's on CPU).
    optimizer = torch.optim.AdamW(groups, lr=section.lr, betas=tuple(section.betas), eps=section.eps, fused=True)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, section, steps))


def lr_factor(step: int, section: OptimSection, steps: int) -> float:
    """Multiplier of optim.lr at optimizer step `step` (0-based)."""
    if step < section.warmup_steps:
        return (step + 1) / section.warmup_steps
    if section.schedule == "constant":
        return 1.0
    progress = (step - section.warmup_steps) / max(1, steps - 1 - section.warmup_steps)
    progress = min(progress, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if section.schedule == "cosine" else 1 - progress
    return section.min_lr_ratio + (1 - section.min_lr_ratio) * shape


def build_engine(config: TrainConfig, mesh: Mesh, hf_config, vocab_size: int):
    """(model, optimizer, scheduler), ready to train on this rank; `hf_config` is model_config's result."""
    model = build_model(config.model, hf_config, config.training.seed, vocab_size)
    param_dtype = compute_dtype(config.training.mixed_precision, mesh.device)
    memory = trainer_memory(config, param_dtype)
    try:
        longseq.apply(model, mesh, memory, linear_attention=config.parallel.linear_attention)
    except ValueError as e:  # a model or attention the layout cannot run (e.g. flash kernels under ring attention)
        raise ConfigError(f"model: {e}") from e
    apply_fsdp(model, mesh.device, param_dtype=param_dtype, cpu_offload=config.training.cpu_offload)
    optimizer, scheduler = build_optimizer(model, config.optim, config.training.steps)
    return model, optimizer, scheduler


def trainer_memory(config: TrainConfig, param_dtype: torch.dtype):
    """config.memory, with `memory: auto` told what the trainer runs: full training (FSDP2, fp32 master weights,
    AdamW), training.cpu_offload as set, activations in param_dtype. The plan's host budget then counts the
    CPU-offloaded state itself (what reserve_host_memory tells an automatic budget). Without CUDA: the 'cpu' card
    with this host's memory as both budgets (the tests' and the demo's runs)."""
    memory = config.memory
    if not isinstance(memory, longseq.AutoMemory):
        return memory
    machine = memory.machine
    if machine is None and not torch.cuda.is_available():
        from longseq.memory.host_budget import host_total_gib
        from longseq.plan import machine_for

        total = host_total_gib()
        machine = machine_for("cpu", gpu_memory_gib=total, host_memory_gib=total)
    return longseq.AutoMemory(machine=machine, training="full", fsdp_cpu_offload=config.training.cpu_offload,
                              compute_dtype=param_dtype, **memory.overrides)


def clip_gradients(model, max_norm: float | None) -> float:
    """Clip to max_norm (if set) and return the global gradient norm over all shards."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm is not None else math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
