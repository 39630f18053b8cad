"""accelerate's context parallelism as a bench.run_peers contender (accelerate-cp), the sp > 1 peer a transformers
Trainer user reaches first: ParallelismConfig(cp_size=sp) with the torch backend, FSDP2 over the same ranks, and
torch's context_parallel (ring attention inside F.scaled_dot_product_attention), on hf-offload's model
(transformers' activation checkpointing with offload=True, Liger's kernels with the fused linear cross-entropy).

Checked against accelerate 1.15 (installed on the GPU machines; its Trainer path in transformers 5.x does the same):
- Accelerator(parallelism_config=ParallelismConfig(cp_size=sp, dp_shard_size=1), fsdp_plugin=
  FullyShardedDataParallelPlugin(fsdp_version=2, ...), mixed_precision="bf16"): FSDP2 over the cp ranks, parameters
  upcast to fp32 by accelerate (bf16 compute), and `_attach_context_parallel_hooks` drops the attention mask in
  favour of is_causal=True.
- `accelerator.maybe_context_parallel(buffers, buffer_seq_dims, no_restore_buffers)` shards input_ids, position_ids and
  the pre-shifted labels in place (load-balanced for causal attention), per step.
- The loss is the Trainer's: each rank's Liger loss over its tokens with num_items_in_batch = valid tokens / cp, so
  FSDP's gradient average over the cp ranks gives the gradient of the global mean; the reported loss is the sum of
  the ranks' losses / cp.
Untested on GPUs by the helper who wrote it (no CUDA there): its first device run is its check.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.common import build_model
from bench.peers_contenders import enable_checkpointing
from bench.peers_records import Contender, missing

IGNORE_INDEX = -100


def accelerate_cp_unavailable(args) -> list[str]:
    reasons = missing("accelerate", "liger_kernel")
    reasons += [] if args.device == "cuda" else ["it needs CUDA (torch's context_parallel has no CPU path)"]
    reasons += [] if args.sp > 1 else ["it is context parallelism over sp ranks: run it with --sp 2 or more"]
    reasons += [] if args.optimizer == "adamw" else ["accelerate's FSDP2 prepares a model with its optimizer: run it "
                                                     "with --optimizer adamw"]
    return reasons


def prepare_accelerate_cp(args) -> Contender:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, ParallelismConfig
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = build_model(args.shape, args.layers, "cuda", seed=args.seed)
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True, model=model)
    enable_checkpointing(model, offload=True)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True, cpu_offload=args.placement == "all",
        mixed_precision_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    accelerator = Accelerator(parallelism_config=ParallelismConfig(cp_size=args.sp, dp_shard_size=1),
                              fsdp_plugin=plugin, mixed_precision="bf16")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    cp_group = accelerator.torch_device_mesh["cp"].get_group()

    def step(tokens: torch.Tensor) -> float:
        ids = tokens.to(accelerator.device, copy=True)  # the buffers are sharded in place: each its own storage
        positions = torch.arange(ids.shape[1], device=ids.device)[None].clone()
        shift_labels = F.pad(ids, (0, 1), value=IGNORE_INDEX)[:, 1:].clone()
        per_rank_items = (shift_labels != IGNORE_INDEX).sum() / args.sp
        buffers = [ids, positions, shift_labels]
        with accelerator.maybe_context_parallel(buffers=buffers, buffer_seq_dims=[1, 1, 1],
                                                no_restore_buffers=set(buffers)):
            loss = model(input_ids=ids, position_ids=positions, shift_labels=shift_labels,
                         num_items_in_batch=per_rank_items, use_cache=False).loss
            accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total, group=cp_group)
        return float(total) / args.sp

    settings = dict(parallelism=f"ParallelismConfig(cp_size={args.sp}), torch backend, allgather rotation",
                    fsdp="FSDP2 via accelerate (LlamaDecoderLayer + root), bf16 compute, fp32 reduce and master",
                    cpu_offload="params+grads+optimizer" if args.placement == "all" else "none",
                    checkpointing="transformers, non-reentrant, offload=True (pinned host)", attention="sdpa (ring)",
                    liger="rope+rms_norm+swiglu+fused_linear_cross_entropy", optimizer="torch AdamW (fused)")
    return Contender(step, model.config, settings)
