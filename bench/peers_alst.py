"""DeepSpeed ALST (Arctic Long Sequence Training) as its tutorial and ArcticTraining's recipes set it up, for
bench.run_peers. DeepSpeed, Liger and arctic_training are imported here only, when an alst contender runs.

Checked against deepspeed 0.19.8 and liger-kernel 0.8.5 (the wheels in /work/shared/wheels):
- UlyssesSPAttentionHF.register_with_transformers(model_name_or_path=model, core_attn_implementation="sdpa", ...):
  it accepts any registered attention except "eager"; it returns None (nothing to do) at sequence_parallel_size=1.
- UlyssesSPDataLoaderAdapter(dl, sp_rank, sp_group, sp_world_size, device): shards input_ids/position_ids and turns
  labels into pre-shifted shift_labels (padded with -100), contiguous chunks per rank.
- TiledMLP.apply(fn, mlp, x, shards, compute_params) with shards = ceil(seqlen / hidden), max over ranks
  (ArcticTraining's tiled_mlp_forward_common); TiledFusedLogitsLoss.apply(fn, model, hidden, shift_labels, None,
  shards, [lm_head.weight], "sum") with ~1 GiB fp32 logits per shard (ArcticTraining's SFTTrainer.loss).
- Liger: apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=False, cross_entropy=False,
  fused_linear_cross_entropy=False, model=model) patches the built model in place (weights untouched).
- Checkpoint offload, two flavours: "deepspeed" = runtime.activation_checkpointing.offload_activations.
  get_checkpoint_hidden_states_offloading_ctx_manager() around forward AND backward, with non-reentrant checkpointing;
  "arctic" = arctic_training.monkey_patches.monkey_patch_checkpoint_function_with_cpu_offload() (patches
  torch.utils.checkpoint.CheckpointFunction, so it needs use_reentrant=True).
- ZeRO-3, bf16, AdamW; sequence_parallel_size and seq_parallel_communication_data_type=bf16 as in the recipes. The
  training state is placed as --placement says (the driver tries gpu, then optimizer, then all, and moves on only
  after an out-of-memory): gpu = nothing offloaded, "torch_adam": true (torch's AdamW on the GPU; DeepSpeed's
  FusedAdam would need a CUDA JIT build); optimizer = offload_optimizer=cpu (DeepSpeedCPUAdam), the recipes' sp > 1
  config; all = offload_param=cpu too, the recipes' one-GPU config (which offloads the parameters even where they
  fit: issue 15 measured 30.6 s against 20.7 s with them on the GPU, Llama-3.2-1B shape at 128K).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import types
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import build_model
from bench.peers_records import Contender, missing, require

IGNORE_INDEX = -100


def ds_config(sp: int, placement: str) -> dict:
    """The DeepSpeed config of one run: ZeRO-3, bf16, AdamW, Ulysses over sp ranks, the state placed per `placement`."""
    zero = {"stage": 3}
    adamw = {"lr": 1e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}
    if placement in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if placement == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if placement == "gpu":
        adamw["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": adamw},
        "sequence_parallel_size": sp,
        "seq_parallel_communication_data_type": "bf16",
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def tiled_mlp_forward(self, x):
    """ArcticTraining's tiled_mlp_forward_common: one shard per `hidden` positions, the same count on every rank."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    seqlen, hidden = x.shape[-2:]
    shards = torch.tensor(math.ceil(seqlen / hidden), device=x.device)
    if dist.is_initialized():
        dist.all_reduce(shards, op=dist.ReduceOp.MAX)

    def mlp_forward(mlp, x):
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))

    params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]
    return TiledMLP.apply(mlp_forward, self, x, int(shards.item()), params)


def tiled_loss_sum(model, hidden: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of this rank's tokens, ArcticTraining's way (TiledFusedLogitsLoss, ~1 GiB fp32 logits per
    shard; a shard without valid labels contributes 0 with gradients)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    vocab = model.config.vocab_size
    shards = max(1, math.ceil(shift_labels.numel() * vocab * 4 / 2**30))

    def loss_fn(model, hidden, labels):
        logits = model.lm_head(hidden)
        valid = (labels != IGNORE_INDEX).sum()
        if int(valid) == 0:
            return (logits.sum() * 0.0).float()
        mean = model.loss_function(logits=logits, labels=None, vocab_size=vocab, shift_labels=labels)
        return mean * valid

    return TiledFusedLogitsLoss.apply(loss_fn, model, hidden, shift_labels, None, shards, [model.lm_head.weight], "sum")


def arctic_offload_patch():
    """arctic_training.monkey_patches, loaded as a file: the package's __init__ pulls in its whole trainer stack."""
    spec = importlib.util.find_spec("arctic_training")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("alst-arctic-offload needs the arctic-training wheel installed (pip install --no-deps).")
    path = Path(list(spec.submodule_search_locations)[0]) / "monkey_patches.py"
    module_spec = importlib.util.spec_from_file_location("arctic_monkey_patches", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.monkey_patch_checkpoint_function_with_cpu_offload


def shard_for_rank(tokens: torch.Tensor, sp: int, device: torch.device) -> dict:
    """This rank's micro-batch: UlyssesSPDataLoaderAdapter over sp>1 ranks (every rank offers the same sample), the
    same pre-shifted labels by hand at sp=1."""
    position_ids = torch.arange(tokens.shape[1])[None]
    batch = {"input_ids": tokens.clone(), "position_ids": position_ids, "labels": tokens.clone()}
    if sp == 1:
        labels = torch.nn.functional.pad(batch.pop("labels"), (0, 1), value=IGNORE_INDEX)
        batch["shift_labels"] = labels[..., 1:].contiguous()
    else:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter
        from deepspeed.utils import groups

        adapter = UlyssesSPDataLoaderAdapter([batch], sp_rank=groups._get_sequence_parallel_rank(),
                                             sp_group=groups._get_sequence_parallel_group(),
                                             sp_world_size=groups._get_sequence_parallel_world_size(), device=device)
        batch = next(adapter)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def global_mean(loss_sum: torch.Tensor, shift_labels: torch.Tensor, sp: int) -> torch.Tensor:
    """The tutorial's differentiable weighted average over the sp ranks (mean over every valid token)."""
    good = (shift_labels != IGNORE_INDEX).sum()
    loss = loss_sum / good.clamp(min=1)
    if sp == 1:
        return loss
    from deepspeed.utils import groups

    group = groups._get_sequence_parallel_group()
    losses = torch.distributed.nn.functional.all_gather(loss, group=group)
    goods = torch.distributed.nn.functional.all_gather(good, group=group)
    return sum(l * g for l, g in zip(losses, goods)) / sum(goods).clamp(min=1)


def alst_unavailable(args) -> list[str]:
    cuda = [] if args.device == "cuda" else ["it needs CUDA (ZeRO-3 on NCCL, Liger's Triton kernels); "
                                             "`python -m bench.run_peers check-alst` runs its code path on a CPU"]
    optimizer = [] if args.optimizer == "adamw" else ["DeepSpeed's engine steps its optimizer every step: run it "
                                                      "with --optimizer adamw"]
    return missing("deepspeed", "liger_kernel") + cuda + optimizer


def prepare_alst(args, offload: str = "deepspeed") -> Contender:
    import deepspeed
    import transformers
    from deepspeed.runtime.activation_checkpointing.offload_activations import (
        get_checkpoint_hidden_states_offloading_ctx_manager,
    )
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    deepspeed.init_distributed(dist_backend="nccl")
    sp = args.sp
    reentrant = offload == "arctic"
    if reentrant:
        arctic_offload_patch()()
    model = build_model(args.shape, args.layers, "cuda", seed=args.seed)
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=False, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)
    for layer in model.model.layers:
        layer.mlp.forward = types.MethodType(tiled_mlp_forward, layer.mlp)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=sp, micro_batch_size=1,
        seq_length_is_variable=True)
    if sp > 1:  # as ArcticTraining: no [seq, seq] mask from transformers; Ulysses' sdpa runs is_causal on the gather
        transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS.register("sdpa", lambda *a, **k: None)
    config = ds_config(sp, args.placement)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config, mpu=mpu)
    manager = None if reentrant else get_checkpoint_hidden_states_offloading_ctx_manager()
    cache = {}

    def step(tokens: torch.Tensor) -> float:
        key = tokens.shape[1]
        if key not in cache:
            cache.clear()
            cache[key] = shard_for_rank(tokens, sp, engine.device)
        batch = cache[key]
        with manager if manager is not None else contextlib.nullcontext():  # open until backward has finished
            hidden = engine.module.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                         use_cache=False).last_hidden_state
            loss = global_mean(tiled_loss_sum(engine.module, hidden, batch["shift_labels"]), batch["shift_labels"], sp)
            engine.backward(loss)
        engine.step()
        return float(loss)

    optimizer = "torch AdamW on the GPU" if args.placement == "gpu" else "DeepSpeedCPUAdam (AdamW mode)"
    settings = dict(zero=config["zero_optimization"], optimizer=optimizer,
                    checkpoint_offload=offload, checkpointing="reentrant" if reentrant else "non-reentrant",
                    liger="rope+rms_norm", tiled_mlp=True, tiled_loss="TiledFusedLogitsLoss", attention="sdpa",
                    deepspeed=deepspeed.__version__)
    return Contender(step, model.config, settings)


def self_check() -> dict:
    """What runs on a CPU: every name used above imports, the config parses, and the tiled MLP and loss match the
    plain computation (value and input gradient) on a tiny Llama. No ZeRO, no Liger kernels (Triton needs a GPU)."""
    require("check-alst", missing("deepspeed"))
    import deepspeed
    from deepspeed.runtime.activation_checkpointing.offload_activations import (  # noqa: F401
        get_checkpoint_hidden_states_offloading_ctx_manager,
    )
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.sequence_parallel.ulysses_sp import (  # noqa: F401
        TiledFusedLogitsLoss, TiledMLP, UlyssesSPAttentionHF, UlyssesSPDataLoaderAdapter,
    )
    from deepspeed.utils import groups  # noqa: F401

    report = {"deepspeed": deepspeed.__version__}
    if importlib.util.find_spec("triton") is not None:
        from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: F401

        report["liger"] = "imported"
    else:
        report["liger"] = "not imported: needs triton (GPU machines have it)"
    for placement in ("gpu", "optimizer", "all"):
        DeepSpeedConfig(ds_config(1, placement))
    report["config"] = "sp=1 configs parsed (placements gpu, optimizer, all)"
    report["arctic_offload"] = "ok" if _try(arctic_offload_patch) else "arctic_training not installed"
    model = build_model("llama-1b", layers=1, device="cpu", seed=0).float()
    x = torch.randn(1, 300, model.config.hidden_size, requires_grad=True)
    mlp = model.model.layers[0].mlp
    reference = mlp(x)
    (gx_ref,) = torch.autograd.grad(reference.square().sum(), x)
    tiled = tiled_mlp_forward(mlp, x)
    (gx,) = torch.autograd.grad(tiled.square().sum(), x)
    torch.testing.assert_close(tiled, reference)
    torch.testing.assert_close(gx, gx_ref)
    labels = torch.randint(0, model.config.vocab_size, (1, 300))
    labels[0, -7:] = IGNORE_INDEX
    h = torch.randn(1, 300, model.config.hidden_size, requires_grad=True)
    reference = torch.nn.functional.cross_entropy(model.lm_head(h)[0], labels[0], reduction="sum")
    (gh_ref,) = torch.autograd.grad(reference, h)
    loss = tiled_loss_sum(model, h, labels)
    (gh,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(gh, gh_ref)
    report["tiled_mlp"] = report["tiled_loss"] = "matches plain"
    with get_checkpoint_hidden_states_offloading_ctx_manager():
        tiled_mlp_forward(mlp, x).sum().backward()
    report["offload_ctx"] = "entered and exited on CPU (no copies there)"
    return report


def _try(fn) -> bool:
    try:
        fn()
        return True
    except ImportError:
        return False
