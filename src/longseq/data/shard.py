"""Give each sequence-parallel rank its slice of a batch.

Labels are shifted BEFORE slicing (shift_labels[t] = labels[t+1]), so the last token of a slice keeps its target,
which lives on the next rank. Rows are padded to a multiple of the number of slices with ignored labels and
positions that continue the last document (padding comes last, so causal attention never lets a real token see
it). position_ids stay global: RoPE and document boundaries need the true positions. With ring attention the
slices follow Note [Zigzag placement].
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from longseq.loss import IGNORE_INDEX
from longseq.mesh import Mesh
from longseq.parallel.balance import Layout, document_layout, layout_order, natural_order, zigzag_order
from longseq.parallel.documents import check_equal_slices, document_boundaries, is_single_document


def slices_per_row(mesh: Mesh) -> int:
    """The number of equal slices a row is cut into (ring attention needs two chunks per ring rank)."""
    return mesh.sp * (2 if mesh.ring > 1 else 1)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This rank's slice of a batch of input_ids (B, S) with optional labels, position_ids, attention_mask.

    Returns input_ids, position_ids, shift_labels (and any other (B, S, ...) tensor) for this rank; tensors of
    other shapes pass through unchanged. Where some token is padding (added here, or zero in the given
    attention_mask), also token_mask: True for the batch's own tokens (the router load-balancing loss counts only
    those). Feed the result to `longseq.causal_lm_loss` or `model(**batch)`.
    """
    if "input_ids" not in batch:
        raise ValueError("shard_batch needs 'input_ids' of shape (batch, sequence).")
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, sequence), got {tuple(input_ids.shape)}.")
    rows, length = input_ids.shape
    pieces = slices_per_row(mesh)
    if length < pieces:
        raise ValueError(
            f"A sequence of {length} tokens is too short for sp={mesh.sp} (ring={mesh.ring}): it must have at least "
            f"{pieces} tokens so that every rank holds one. Use longer sequences or a smaller sp."
        )
    full = _full_batch(batch)
    padded = -(-length // pieces) * pieces
    if padded > length and "token_mask" not in full:
        full["token_mask"] = torch.ones(rows, length, dtype=torch.bool, device=input_ids.device)
    order = zigzag_order(padded, mesh.ring, device=input_ids.device)
    local = padded // mesh.sp
    mine = order[mesh.sp_rank * local:(mesh.sp_rank + 1) * local]
    out = {}
    for key, value in full.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (rows, length):
            out[key] = _pad(key, value, padded).index_select(1, mine)
        else:
            out[key] = value
    return out


def _full_batch(batch: dict) -> dict:
    """Fill in defaults, fold an attention_mask into the labels, and shift the labels."""
    full = dict(batch)
    input_ids = full["input_ids"]
    rows, length = input_ids.shape
    labels = full.pop("labels", None)
    labels = input_ids.clone() if labels is None else labels.clone()
    mask = full.pop("attention_mask", None)
    if mask is not None and not bool(mask.all()):
        if bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError(
                "attention_mask has left padding (zeros before ones). Pad on the right, or better, pack documents "
                "into full rows with position_ids restarting per document."
            )
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        full["token_mask"] = mask != 0
    if "position_ids" not in full:
        full["position_ids"] = torch.arange(length, device=input_ids.device).expand(rows, length)
    shift = torch.full_like(labels, IGNORE_INDEX)
    shift[:, :-1] = labels[:, 1:]
    full["shift_labels"] = full.pop("shift_labels", shift)
    return full


def _pad(key: str, value: torch.Tensor, padded: int) -> torch.Tensor:
    extra = padded - value.shape[1]
    if extra == 0:
        return value
    if key == "position_ids":
        tail = value[:, -1:] + torch.arange(1, extra + 1, device=value.device)
    else:
        fill = IGNORE_INDEX if key == "shift_labels" else 0
        tail = value.new_full((value.shape[0], extra, *value.shape[2:]), fill)
    return torch.cat([value, tail], dim=1)


def shard_loader(loader, mesh: Mesh):
    """Wrap an iterable of batches so each yields this rank's slice (see shard_batch)."""
    return _ShardedLoader(loader, mesh)


class _ShardedLoader:
    def __init__(self, loader, mesh: Mesh):
        self.loader, self.mesh = loader, mesh

    def __iter__(self):
        for batch in self.loader:
            yield shard_batch(batch, self.mesh)

    def __len__(self):
        return len(self.loader)


def gather_sequence(local: torch.Tensor, mesh: Mesh, length: int | None = None) -> torch.Tensor:
    """Reassemble (B, s, ...) slices from every sp rank into (B, S, ...) in the user's token order (no gradient).

    `length` trims the padding shard_batch added.
    """
    if mesh.sp == 1:
        return local if length is None else local[:, :length]
    local = local.detach().contiguous()
    pieces = [torch.empty_like(local) for _ in range(mesh.sp)]
    dist.all_gather(pieces, local, group=mesh.sp_group)
    permuted = torch.cat(pieces, dim=1)
    natural = natural_order(permuted, mesh.ring)
    return natural if length is None else natural[:, :length]


def place_documents(tokens: list[torch.Tensor], mesh: Mesh) -> tuple[list, list[list[int]], list[Layout] | None]:
    """Move this rank's (B, s) token tensors from zigzag to Note [Document placement] (balance.py).

    tokens: this rank's slices from shard_batch, position_ids first. Returns the same tensors holding this rank's
    tokens of the new placement (same shapes), the rows' document boundaries, and their layouts (None: every row is
    one document, zigzag already balances it, and nothing moved).
    """
    check_equal_slices(tokens[0], mesh.sp_group, mesh.sp)
    positions = gather_sequence(tokens[0], mesh)
    boundaries = document_boundaries(positions)
    if mesh.ring == 1 or is_single_document(boundaries):
        return tokens, boundaries, None
    layouts = [document_layout(row, mesh.ring) for row in boundaries]
    s = tokens[0].shape[1]
    first = mesh.ring_rank * s * mesh.ulysses + mesh.ulysses_rank * s
    index = torch.stack([layout_order(layout)[first:first + s] for layout in layouts]).to(positions.device)
    full = [positions] + [_gathered(t, mesh) for t in tokens[1:]]
    return [t.gather(1, index) for t in full], boundaries, layouts


def _gathered(local: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """gather_sequence, with bool tensors (token_mask) travelling as bytes: not every backend gathers bool."""
    if local.dtype == torch.bool:
        return gather_sequence(local.view(torch.uint8), mesh).view(torch.bool)
    return gather_sequence(local, mesh)
