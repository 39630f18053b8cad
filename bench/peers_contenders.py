"""Contenders of bench.run_peers that need no DeepSpeed: plain HF and longseq (with and without an optimizer).

Each `prepare_<name>(args)` builds the model from the same seed and returns a Contender whose `step(tokens)` runs one
training step on this rank's share of the identical token ids and returns the global mean next-token loss (mean over
every valid shifted token of the sequence), as a float.
"""

from __future__ import annotations

import torch

from bench.common import build_model
from bench.peers_records import Contender


def full_batch(tokens: torch.Tensor, device: torch.device) -> dict:
    ids = tokens.to(device)
    return {"input_ids": ids, "labels": ids, "position_ids": torch.arange(ids.shape[1], device=device)[None]}


def prepare_hf(args) -> Contender:
    """transformers as shipped: sdpa, non-reentrant gradient checkpointing, its own loss; forward + backward only
    (an 8B model's AdamW state does not fit next to it on one GPU). One GPU: with more ranks it would only repeat."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ValueError("the hf contender runs on one GPU: launch it with --sp 1 and one process.")
    device = torch.device(args.device)
    model = build_model(args.shape, args.layers, args.device, seed=args.seed)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def step(tokens: torch.Tensor) -> float:
        loss = model(**full_batch(tokens, device), use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=False)  # gradient buffers stay allocated: part of the fixed memory
        return float(loss)

    return Contender(step, model.config, dict(optimizer="none", checkpointing="hf non-reentrant", attention="sdpa"))


def prepare_longseq(args, *, optimizer: bool = True, offload: bool = True, cache: bool = True) -> Contender:
    """longseq.apply with every memory feature, then the trainer's FSDP2 (train.engine.apply_fsdp: fully_shard per
    decoder layer, then the root; bf16 compute, fp32 reduce) over fp32 master weights, and the trainer's AdamW.
    offload=True: CPUOffloadPolicy (parameters, gradients and optimizer state on the host; FSDP2 cannot offload the
    optimizer alone). optimizer=False: no FSDP, every rank holds the model (as bench_sp), forward + backward only.
    cache=False: recompute attention in backward (MemoryConfig.cache_attention=False)."""
    import longseq
    from longseq.train.config import OptimSection
    from longseq.train.engine import apply_fsdp, build_optimizer

    mesh = longseq.init_mesh(sp=args.sp, ring=1)
    model = build_model(args.shape, args.layers, args.device, seed=args.seed)
    longseq.apply(model, mesh, longseq.MemoryConfig(cache_attention=cache))
    settings = dict(memory=f"MemoryConfig(cache_attention={cache}) (tiled MLP, norms and loss, offloaded checkpoints)",
                    sp=mesh.sp, dp=mesh.dp)
    opt = None
    if optimizer:
        offload = offload and mesh.device.type == "cuda"
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
        stats = longseq.memory.offload_stats(model)
        budget = stats.budget_bytes
        return dict(host_budget_gib=budget / 2**30 if budget is not None else None,
                    offload_peak_gib=stats.peak_bytes / 2**30, attention_not_kept=stats.attention_not_kept,
                    checkpoints_on_device=stats.checkpoints_on_device)

    return Contender(step, model.config, settings, observed)


CONTENDERS = {
    "hf": prepare_hf,
    "longseq": prepare_longseq,
    "longseq-nooffload": lambda args: prepare_longseq(args, offload=False),
    "longseq-nocache": lambda args: prepare_longseq(args, cache=False),
    "longseq-nooptim": lambda args: prepare_longseq(args, optimizer=False),
}


def prepare(name: str, args) -> Contender:
    """The contender's step, imported lazily (DeepSpeed only for the alst ones)."""
    if name.startswith("alst"):
        from bench.peers_alst import prepare_alst

        return prepare_alst(args, offload="arctic" if name == "alst-arctic-offload" else "deepspeed")
    if name not in CONTENDERS:
        raise ValueError(f"unknown contender {name!r}; choose among {sorted(CONTENDERS) + list(ALST)}.")
    return CONTENDERS[name](args)


ALST = ("alst", "alst-arctic-offload")
NAMES = tuple(CONTENDERS) + ALST
