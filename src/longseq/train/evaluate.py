"""Evaluation: the exact mean loss over every valid token of the eval set, computed sharded like training.

Note [Exact eval loss]
The eval rows are dealt out in rounds of batch_size × dp: in round k, dp group g takes rows
k·batch_size·dp + g·batch_size onwards, and every sp rank of the group holds its slice of them (shard_batch). Each
round's causal_lm_loss with num_tokens = 1 is the round's loss *sum* over all ranks (Note [Exact global loss]), so
    eval_loss = Σ_rounds Σ_ranks loss_sum / N,     N = the valid tokens of all eval rows
N is counted on every rank from the rows themselves (each rank can read them all), without communication. A group
left without rows in the last round runs one row whose labels are all ignored: it adds nothing, but takes part in
the collectives. The result does not depend on sp, ring or dp (tested equal to one process at sp = 1).
"""

from __future__ import annotations

import torch

import longseq
from longseq.data.packing import PackedRows
from longseq.loss import IGNORE_INDEX
from longseq.mesh import Mesh


class Evaluation:
    """The first `count` rows of an eval set, evaluated as Note [Exact eval loss] says."""

    def __init__(self, rows: PackedRows, count: int, batch_size: int):
        self.rows, self.count, self.batch_size = rows, count, batch_size
        self.valid_tokens = sum(int((rows.row(i)[1][1:] != 0).sum()) for i in range(count))  # N: all but each row's
        # last token and each document's first

    def __call__(self, model, mesh: Mesh) -> float:
        """The eval loss of `model` (collective); the model is left in training mode."""
        per_round = self.batch_size * mesh.dp
        total = torch.zeros((), device=mesh.device, dtype=torch.float64)
        one = torch.ones((), device=mesh.device)
        model.eval()
        with torch.no_grad():
            for first in range(0, self.count, per_round):
                mine = first + mesh.dp_rank * self.batch_size
                batch = (self.rows.batch(mine, min(self.batch_size, self.count - mine)) if mine < self.count
                         else _nothing(self.rows.seq_len))
                local = longseq.shard_batch({k: v.to(mesh.device) for k, v in batch.items()}, mesh)
                total += longseq.causal_lm_loss(model, local, mesh, num_tokens=one).double()
        model.train()
        return float(total) / max(self.valid_tokens, 1)


def _nothing(seq_len: int) -> dict:
    """One row that takes part in a round and contributes no loss and no tokens."""
    input_ids = torch.zeros((1, seq_len), dtype=torch.int64)
    return {"input_ids": input_ids, "position_ids": torch.arange(seq_len)[None],
            "labels": torch.full_like(input_ids, IGNORE_INDEX)}
