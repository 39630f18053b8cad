"""Contenders of bench.run_peers built from transformers alone: plain HF, HF with host offload + Liger, and longseq;
and the pieces the other contender modules share (the batch, transformers' checkpointing, Liger's kernels).

Each `prepare_<name>(args)` builds the model from the same seed and returns a Contender whose `step(tokens)` runs one
training step on this rank's share of the identical token ids and returns the global mean next-token loss (mean over
every valid shifted token of the sequence), as a float. With --optimizer adamw the step ends with an AdamW update,
with --optimizer none it is forward + backward only. Each `<name>_unavailable(args)` lists why the contender cannot run
here (a package or CUDA missing, a layout it does not take): the driver asks before it launches a run, and the
registry before it builds one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect

import torch
import transformers
import yaml

from bench.common import build_model
from bench.peers_records import Contender, ContenderUnavailable, missing


def full_batch(tokens: torch.Tensor, device: torch.device) -> dict:
    ids = tokens.to(device)
    return {"input_ids": ids, "labels": ids, "position_ids": torch.arange(ids.shape[1], device=device)[None]}


def enable_checkpointing(model, *, offload: bool) -> None:
    """transformers' own activation checkpointing of every decoder layer (non-reentrant), holding the checkpoints in
    pinned host memory with offload=True (transformers >= 5.17; `activation_checkpointing_enable` from 5.2x on,
    `gradient_checkpointing_enable` before)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    params = inspect.signature(enable).parameters
    if offload and "offload" not in params:
        raise ContenderUnavailable(f"transformers {transformers.__version__} has no offload= in {enable.__name__}; "
                                   "hf-offload needs transformers >= 5.17.")
    kwargs_name = next(n for n in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs") if n in params)
    enable(**{kwargs_name: {"use_reentrant": False}}, **({"offload": True} if offload else {}))


def gpu_adamw(model, args):
    """What a transformers Trainer / TRL user gets for a bf16 model: torch's fused AdamW over the bf16 parameters,
    its state on the GPU in bf16 (None with --optimizer none)."""
    if args.optimizer == "none":
        return None
    return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=args.device == "cuda")


def hf_step(model, optimizer, device: torch.device):
    def step(tokens: torch.Tensor) -> float:
        loss = model(**full_batch(tokens, device), use_cache=False).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=False)  # gradient buffers stay allocated: part of the fixed memory
        return float(loss)

    return step


def hf_unavailable(args) -> list[str]:
    return ["it runs on one GPU (more ranks would only repeat it): run it with --sp 1"] if args.sp > 1 else []


def hf_offload_unavailable(args) -> list[str]:
    cuda = [] if args.device == "cuda" else ["it needs CUDA (Liger's Triton kernels; transformers' offload=True pins "
                                             "host memory, which a CPU-only machine cannot)"]
    return hf_unavailable(args) + missing("liger_kernel") + cuda


def prepare_hf(args) -> Contender:
    """transformers as shipped: sdpa, non-reentrant activation checkpointing, its own loss. One GPU."""
    device = torch.device(args.device)
    model = build_model(args.shape, args.layers, args.device, seed=args.seed)
    enable_checkpointing(model, offload=False)
    optimizer = gpu_adamw(model, args)
    settings = dict(checkpointing="transformers, non-reentrant", attention="sdpa", loss="transformers",
                    optimizer="torch AdamW (fused), bf16 state on the GPU" if optimizer else "none")
    return Contender(hf_step(model, optimizer, device), model.config, settings)


def prepare_hf_offload(args) -> Contender:
    """What TRL's activation offloading + use_liger_kernel give a transformers user, with transformers' own pieces:
    activation checkpointing with offload=True (checkpoints in pinned host memory), and Liger's kernels as
    `use_liger_kernel` applies them to Llama (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy: no logits). One GPU."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    device = torch.device(args.device)
    model = build_model(args.shape, args.layers, args.device, seed=args.seed)
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=model)
    enable_checkpointing(model, offload=True)
    optimizer = gpu_adamw(model, args)
    settings = dict(checkpointing="transformers, non-reentrant, offload=True (pinned host)", attention="sdpa",
                    liger="rope+rms_norm+swiglu+fused_linear_cross_entropy",
                    optimizer="torch AdamW (fused), bf16 state on the GPU" if optimizer else "none")
    return Contender(hf_step(model, optimizer, device), model.config, settings)


def memory_fields(pairs: list[str]) -> dict:
    """--memory-field NAME=VALUE ... -> MemoryConfig keyword arguments (VALUE read as YAML: true, 4096, null)."""
    import longseq

    names = {f.name for f in dataclasses.fields(longseq.MemoryConfig)}
    fields = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in names:
            raise ValueError(f"--memory-field {pair!r}: expected NAME=VALUE with NAME one of {sorted(names)}.")
        fields[name] = yaml.safe_load(value)
    return fields


def longseq_unavailable(args) -> list[str]:
    """--memory auto needs the planner (issue 14): this hook turns on once longseq.plan exists."""
    if args.memory == "auto" and importlib.util.find_spec("longseq.plan") is None:
        return ["--memory auto needs longseq's planner (longseq.plan), which this tree does not have yet: use "
                "--memory default, with --memory-field NAME=VALUE to change it"]
    return []


def longseq_memory(args, fixed: dict):
    """The memory of a longseq run: --memory default gives MemoryConfig(**--memory-field, **fixed); --memory auto an
    AutoMemory (the planner's choice per length, those fields forced) for what this run trains: the trainer's FSDP2
    and AdamW ('full', CPU offload with --placement all) or forward + backward only (--optimizer none), bf16
    activations; on CUDA for this machine, without it for the 'cpu' card with this host's memory."""
    import longseq

    fields = {**memory_fields(args.memory_field), **fixed}
    if args.memory != "auto":
        return longseq.MemoryConfig(**fields)
    from longseq.memory.host_budget import host_total_gib
    from longseq.plan import machine_for

    machine = None if torch.cuda.is_available() else machine_for("cpu", gpu_memory_gib=host_total_gib(),
                                                                  host_memory_gib=host_total_gib())
    training = "full" if args.optimizer == "adamw" else "forward-backward"
    return longseq.AutoMemory(machine=machine, training=training, fsdp_cpu_offload=args.placement == "all",
                              compute_dtype=torch.bfloat16, **fields)


def prepare_longseq(args, **fixed) -> Contender:
    """longseq.apply (MemoryConfig per --memory), then the trainer's FSDP2 (train.engine.apply_fsdp: fully_shard per
    decoder layer, then the root; bf16 compute, fp32 reduce) over fp32 master weights, and the trainer's AdamW
    (fused). --placement all: CPUOffloadPolicy (parameters, gradients and optimizer state on the host; FSDP2 cannot
    offload the optimizer alone). --optimizer none: no FSDP, every rank holds the model, forward + backward only."""
    import longseq
    from longseq.train.config import OptimSection
    from longseq.train.engine import apply_fsdp, build_optimizer

    memory = longseq_memory(args, fixed)
    mesh = longseq.init_mesh(sp=args.sp, ring=1)
    model = build_model(args.shape, args.layers, args.device, seed=args.seed)
    longseq.apply(model, mesh, memory)
    auto = isinstance(memory, longseq.AutoMemory)
    settings = dict(memory=f"auto, forced: {memory.overrides}" if auto else repr(memory), sp=mesh.sp, dp=mesh.dp)
    opt = None
    if args.optimizer == "adamw":
        offload = args.placement == "all"
        model.float()  # fp32 master weights = the bf16 init upcast, like DeepSpeed's bf16 mode; compute stays bf16
        apply_fsdp(model, mesh.device, param_dtype=torch.bfloat16, cpu_offload=offload)
        section = OptimSection(lr=1e-5, weight_decay=0.0, warmup_steps=0, schedule="constant", grad_clip=None)
        opt, _ = build_optimizer(model, section, steps=1000)
        settings.update(optimizer="torch AdamW (fused), fp32 states", fsdp="FSDP2 fully_shard per layer + root",
                        cpu_offload="params+grads+optimizer" if offload else "none")
    else:
        settings.update(optimizer="none", fsdp="none (model replicated)")

    def step(tokens: torch.Tensor) -> float:
        local = longseq.shard_batch(full_batch(tokens, mesh.device), mesh)
        loss = longseq.causal_lm_loss(model, local, mesh)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=False)
        return float(loss)

    def observed() -> dict:
        in_use = longseq.memory_config_in_use(model)
        chosen = {} if in_use is None else dict(memory_in_use=dataclasses.asdict(in_use))
        try:
            stats = longseq.memory.offload_stats(model)
        except ValueError:  # no checkpoint offload in this MemoryConfig: nothing to report
            return chosen
        budget = stats.budget_bytes
        return dict(**chosen, host_budget_gib=budget / 2**30 if budget is not None else None,
                    offload_peak_gib=stats.peak_bytes / 2**30, attention_not_kept=stats.attention_not_kept,
                    checkpoints_on_device=stats.checkpoints_on_device)

    return Contender(step, model.config, settings, observed)
