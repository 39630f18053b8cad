"""Gradient averaging for runs without FSDP2/DDP (Note [Exact global loss] expects an average over all ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from longseq.mesh import Mesh


def sync_gradients(model: torch.nn.Module, mesh: Mesh) -> None:
    """Average every parameter gradient over all ranks, in one flat all-reduce per dtype."""
    if mesh.world_size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= mesh.world_size
        for g, new in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(new.view_as(g))
