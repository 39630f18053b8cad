"""Block attention kernels that return the log-sum-exp, and their backward given a (merged) output and log-sum-exp.

    block_forward(q, k, v, *, causal, scale)                      -> (out, lse)
    block_backward(dout, q, k, v, out, lse, *, causal, scale)     -> (dq, dk, dv)

q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) with Hq % Hkv == 0. `causal` is only used on square blocks (Lq == Lk), where
the top-left alignment of the aten ops is the usual causal mask. `out` is in q's dtype, `lse` (B, Hq, Lq) in fp32
(fp64 for fp64 inputs). The backward returns gradients in that same accumulation dtype, dk and dv with Hkv heads.

The backward is the flash-attention one: it recomputes the block's probabilities as exp(q·kᵀ·scale − lse) and uses
rowsum(dout · out), so given the FINAL output and log-sum-exp of a row over all blocks, the gradients of the blocks add
up to the exact gradient (see Note [Ring attention] in ring.py).

CPU: aten._scaled_dot_product_flash_attention_for_cpu and its backward. CUDA: the cuDNN and flash SDPA ops, in the
order of CUDA_BACKENDS; the one that last worked for a (direction, dtype) is tried first, the other when it refuses.
"""

from __future__ import annotations

import torch

from longseq.parallel.local import expand_kv
from longseq.parallel.merge import accumulation_dtype

aten = torch.ops.aten

# The memory-efficient SDPA op is left out: given an output and log-sum-exp its backward returned wrong gradients
# (bench/check_gpu.py, H200, torch 2.11), and on Hopper it is ~3× slower than cuDNN anyway (shared/GPU.md).
CUDA_BACKENDS = ("cudnn", "flash")
_chosen: dict[tuple[str, torch.dtype], str] = {}


def block_forward(q, k, v, *, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = expand_kv(k, q.shape[1] // k.shape[1]), expand_kv(v, q.shape[1] // v.shape[1])
    if q.is_cuda:
        return _cuda("forward", q.dtype, q, k, v, causal, scale)
    return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def block_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float):
    kv_heads = k.shape[1]
    k, v = expand_kv(k, q.shape[1] // k.shape[1]), expand_kv(v, q.shape[1] // v.shape[1])
    # Slices of larger tensors: the kernels expect dense inputs (a strided lse gives wrong gradients on some ops).
    args = [t.contiguous() for t in (dout, q, k, v, out, lse)]
    if q.is_cuda:
        dq, dk, dv = _cuda("backward", q.dtype, *args, causal, scale)
    else:
        dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(*args, 0.0, causal, scale=scale)
    acc = accumulation_dtype(q.dtype)
    return dq.to(acc), _fold_heads(dk, kv_heads, acc), _fold_heads(dv, kv_heads, acc)


def _fold_heads(grad: torch.Tensor, kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum the gradients of the g copies of each kv head (the adjoint of expand_kv), in the accumulation dtype."""
    b, heads, length, dim = grad.shape
    return grad.to(dtype).view(b, kv_heads, heads // kv_heads, length, dim).sum(2)


def _cuda(direction: str, dtype: torch.dtype, *args):
    """The backend that worked last time first, then the others (cuDNN refuses some shapes, e.g. 1-token blocks)."""
    key = (direction, dtype)
    names = sorted(CUDA_BACKENDS, key=lambda name: name != _chosen.get(key))
    errors = []
    for name in names:
        try:
            result = _CUDA_OPS[name][direction](*args)
        except RuntimeError as error:
            errors.append(f"{name}: {error}")
            continue
        _chosen[key] = name
        return result
    raise RuntimeError(
        f"No CUDA attention kernel ran the {direction} pass for {dtype}:\n  " + "\n  ".join(errors)
        + "\nRing attention on CUDA needs bf16 or fp16 inputs and a head dimension the cuDNN or flash kernels accept."
    )


def _no_dropout_rng(q: torch.Tensor) -> torch.Tensor:
    # Seed and offset are only read with dropout; cuDNN's forward returns zeros of this shape.
    return torch.zeros(1, dtype=torch.int64, device=q.device)


def _cudnn_forward(q, k, v, causal, scale):
    out, lse, *_ = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out, lse.reshape(q.shape[:3])  # cuDNN keeps a trailing 1: (B, H, L, 1)


def _cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    rng = _no_dropout_rng(q)
    return aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.unsqueeze(-1), rng, rng, None, None, None, q.shape[2], k.shape[2], 0.0, causal,
        scale=scale,
    )


def _flash_forward(q, k, v, causal, scale):
    out, lse, *_ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return out, lse


def _flash_backward(dout, q, k, v, out, lse, causal, scale):
    rng = _no_dropout_rng(q)
    # cum_seq_q/k = None (undefined) selects the dense, not the varlen, kernel.
    return aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, rng, rng, scale=scale,
    )


_CUDA_OPS = {
    "cudnn": {"forward": _cudnn_forward, "backward": _cudnn_backward},
    "flash": {"forward": _flash_forward, "backward": _flash_backward},
}
