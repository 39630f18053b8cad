"""Ring attention over NCCL with packed rows in Note [Document placement] (bf16, varlen groups) against the whole
sequence's fp32 attention on one GPU: outputs and q/k/v gradients. Started by tests/gpu/test_varlen.py:

    torchrun --standalone --nproc-per-node 2 -m tests.gpu.ring_placement
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from longseq.parallel import varlen
from longseq.parallel.balance import document_layout, layout_order
from longseq.parallel.local import causal_attention
from longseq.parallel.ring import ring_attention

DOCUMENTS = ([1, 700, 129, 2900, 266, 100], [1500, 1, 33, 2000, 562])  # two rows of 4096 tokens


def main() -> None:
    dist.init_process_group("nccl")
    rank, ring = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.manual_seed(0)
    length, local = 4096, 4096 // ring
    q = torch.randn(2, 8, length, 128, device="cuda")
    k, v = torch.randn(2, 2, length, 128, device="cuda"), torch.randn(2, 2, length, 128, device="cuda")
    dout = torch.randn(2, 8, length, 128, device="cuda")
    boundaries = [[0, *torch.tensor(row).cumsum(0).tolist()] for row in DOCUMENTS]
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = causal_attention(*full, scale=0.088, boundaries=boundaries)
    reference.backward(dout)
    layouts = [document_layout(row, ring) for row in boundaries]
    index = torch.stack([layout_order(layout)[rank * local:(rank + 1) * local] for layout in layouts]).cuda()

    def mine(t):
        return torch.stack([row[:, i] for row, i in zip(t, index)])

    inputs = [mine(t.detach()).bfloat16().requires_grad_() for t in (q, k, v)]
    out = ring_attention(dist.group.WORLD, *inputs, scale=0.088, boundaries=boundaries, layouts=layouts)
    out.backward(mine(dout).bfloat16())
    errors = [(got.float() - mine(want)).abs().max().item() for got, want in
              zip([out] + [t.grad for t in inputs], [reference] + [t.grad for t in full])]
    worst = torch.tensor(max(errors), device="cuda")
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        status = "ok" if worst.item() <= 5e-2 and not varlen._varlen_refused else "BAD"
        print(f"ring placement {status}: max error {worst.item():.3e} (tolerance 5e-2), varlen refused: "
              f"{varlen._varlen_refused}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
