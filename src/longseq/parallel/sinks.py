r"""Note [Attention sinks]

GPT-OSS gives each head h a learned logit s_h (`module.sinks`, passed to the attention function as `s_aux`) that
joins every row's softmax as one more key with value 0 (transformers' eager attention: the sink's column is
concatenated to the scores, softmaxed with them, and dropped):

    out_i = Σ_j exp(q_i·k_j·scale − L'_i) v_j,      L'_i = log(Σ_j exp(q_i·k_j·scale) + exp(s_h))

So the sink is a key like any other, and it merges through the log-sum-exp (merge.py) like one more block whose
output is 0 and whose log-sum-exp is s_h. With the keys' merged (o, L):

    L' = logaddexp(L, s_h),      out = o · exp(L − L') = o · σ(L − s_h)

Backward. The flash backward of every key block, given the FINAL (out, L') (kernels.py, window.py), is already exact:
the sink only enters through L' and rowsum(dO ⊙ out), both final. The sink itself is a key with value 0, so its
score gradient is P_sink · (dO·0 − rowsum(dO ⊙ out)):

    ∂loss/∂s_h = − Σ_{rows i of head h} exp(s_h − L'_i) · rowsum(dO_i ⊙ out_i)

Each rank holds the rows of its own queries (ring) and its own heads (Ulysses), so its share of ∂loss/∂s is a sum
over those rows, and the gradient average over ranks adds the shares up (Note [Exact global loss]). The reference is
transformers' eager GPT-OSS attention (tests/test_moe.py).
"""

from __future__ import annotations

import torch


def merge_sink(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) over the keys, with the sink merged in: out (B, H, L, D) keeps its dtype, lse (B, H, L) its own.

    sinks: (H,) one logit per head of `out`.
    """
    merged = torch.logaddexp(lse, sinks.detach().to(lse.dtype).view(1, -1, 1))
    scaled = out.to(lse.dtype) * torch.exp(lse - merged).unsqueeze(-1)
    return scaled.to(out.dtype), merged


def sink_gradient(dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """∂loss/∂sinks (H,) from the final output and log-sum-exp (Note [Attention sinks]), in the sinks' dtype."""
    acc = lse.dtype
    row_dot = (dout.to(acc) * out.to(acc)).sum(-1)
    sink_probability = torch.exp(sinks.detach().to(acc).view(1, -1, 1) - lse)
    return -(sink_probability * row_dot).sum((0, 2)).to(sinks.dtype)
