"""Packed documents: where each document starts, read from position_ids.

A new document starts wherever position_ids does not increase by exactly one (the rule transformers uses for packed
sequences), so both "restart at 0" packing and any other jump mark a boundary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def document_boundaries(position_ids: torch.Tensor) -> list[list[int]]:
    """Per batch row, the sorted token offsets where documents start, plus the row length at the end.

    A row holding one document gives [0, length]. Computed on the host once per forward pass.
    """
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must have shape (batch, sequence), got {tuple(position_ids.shape)}.")
    length = position_ids.shape[1]
    row, offset = torch.nonzero(torch.diff(position_ids, dim=1) != 1, as_tuple=True)
    starts = [[] for _ in range(position_ids.shape[0])]
    for r, o in zip(row.tolist(), (offset + 1).tolist()):
        starts[r].append(o)
    return [[0] + row_starts + [length] for row_starts in starts]


def is_single_document(boundaries: list[list[int]]) -> bool:
    """Whether every row of `boundaries` holds one document."""
    return all(len(row) == 2 for row in boundaries)


def check_equal_slices(local: torch.Tensor, group, size: int) -> None:
    """Raise on every rank of `group` (of `size` ranks) unless all hold as many tokens (dim 1) as this one: a
    collective over unequal slices would fail on one rank and hang the others."""
    # all_gather with a list: the one form that gloo, NCCL and every supported torch accept without warnings.
    lengths = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([local.shape[1]], device=local.device), group=group)
    lengths = torch.cat(lengths)
    if lengths.min() != lengths.max():
        raise ValueError(
            f"Sequence-parallel ranks hold different numbers of tokens ({lengths.tolist()}); every rank of the "
            "sp group must hold an equal slice. Use longseq.shard_batch, which pads and slices the batch."
        )
