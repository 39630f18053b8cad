"""The depthwise causal convolution of linear-attention layers, over packed documents and with halos.

Token t's output reads tokens t − kernel + 1 .. t of its own document. All rows, runs and documents go into one
flat stream in which every run is preceded by its halo (kernel − 1 tokens: the end of the run before it on another
rank, zeroed where not of the same document, or zeros at the start of the sequence) and every document that starts
inside a run by kernel − 1 zeros. One ordinary convolution without padding over the stream then computes every
token exactly, without masks:

    row 0:  [h h h | a a a a 0 0 0 b b b]   row 1:  [h h h | c c 0 0 0 d d d d d]      (kernel 4)
             halo    run, documents a, b              halo    run, documents c, d

The convolution runs in the weight's dtype and the activation follows, as in transformers' `causal_conv1d_fn`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN


@dataclass(frozen=True, kw_only=True)
class ConvPlan:
    """Where each local token and each halo token sits in the stream."""

    length: int
    """Stream length."""
    token_dest: torch.Tensor
    """(rows · local length,) the stream slot of each local token, row-major."""
    halo_dest: torch.Tensor
    """(rows · halo tokens,) the stream slot of each halo token, row-major, runs in local order."""


def conv_plan(rows: list[list[tuple[int, int, list[int]]]], local_length: int, kernel: int, device=None) -> ConvPlan:
    """rows[b]: this rank's runs in local order as (local offset, length, inner document starts as offsets into the
    run). Every run gets kernel − 1 halo slots in front, every inner document start kernel − 1 zeros."""
    width = kernel - 1
    token_dest = torch.empty(len(rows) * local_length, dtype=torch.long)
    halo_dest = []
    used = 0
    for b, runs in enumerate(rows):
        for offset, length, starts in runs:
            halo_dest += range(used, used + width)
            used += width
            cuts = [0] + starts + [length]
            for piece, (begin, end) in enumerate(zip(cuts[:-1], cuts[1:])):
                used += width if piece else 0
                source = b * local_length + offset + begin
                token_dest[source:source + end - begin] = torch.arange(used, used + end - begin)
                used += end - begin
    return ConvPlan(length=used, token_dest=token_dest.to(device),
                    halo_dest=torch.tensor(halo_dest, dtype=torch.long, device=device))


def causal_conv(x: torch.Tensor, halo: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                activation: str | None, plan: ConvPlan) -> torch.Tensor:
    """x (B, L, C) local tokens; halo (B, halo tokens, C) or None (zeros); weight (C, kernel) → (B, L, C)."""
    rows, length, channels = x.shape
    kernel = weight.shape[-1]
    source, dest = x.flatten(0, 1), plan.token_dest
    if halo is not None and halo.shape[1]:
        source, dest = torch.cat([source, halo.flatten(0, 1)]), torch.cat([dest, plan.halo_dest])
    stream = source.new_zeros(plan.length, channels).index_put((dest,), source)  # keeps no copy of x for backward
    out = F.conv1d(stream.t().unsqueeze(0).to(weight.dtype), weight.unsqueeze(1), bias, groups=channels)[0]
    if activation is not None:
        out = ACT2FN[activation](out)
    out = out.index_select(1, plan.token_dest - (kernel - 1)).t()
    return out.reshape(rows, length, channels).to(x.dtype)
