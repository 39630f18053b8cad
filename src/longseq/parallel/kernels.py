"""Block attention kernels that return the log-sum-exp, and their backward given a (merged) output and log-sum-exp.

    block_forward(q, k, v, *, causal, scale, kernel, groups)                      -> (out, lse)
    block_backward(dout, q, k, v, out, lse, *, causal, scale, kernel, groups)     -> (dq, dk, dv)

q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) with Hq % Hkv == 0. `causal` is only used on square blocks (Lq == Lk), where
the top-left alignment of the aten ops is the usual causal mask. `out` is in q's dtype, `lse` (B, Hq, Lq) in fp32
(fp64 for fp64 inputs). The backward returns gradients in that same accumulation dtype, dk and dv with Hkv heads.

The backward is the flash-attention one: it recomputes the block's probabilities as exp(q·kᵀ·scale − lse) and uses
rowsum(dout · out), so given the FINAL output and log-sum-exp of a row over all blocks, the gradients of the blocks add
up to the exact gradient (see Note [Ring attention] in ring.py).

kernel="sdpa" (default): on CPU aten._scaled_dot_product_flash_attention_for_cpu and its backward; on CUDA the cuDNN
and flash SDPA ops, in the order of CUDA_BACKENDS; the one that last worked for a (direction, dtype) is tried first,
the other when it refuses. Calls take groups of heads (Note [Attention head groups], head_groups.py), the K/V heads
expanded for GQA one call at a time.

kernel="flex": FlexAttention (compiled on CUDA; CPU runs its eager forward only). Flex has no public backward that
takes a given output and log-sum-exp, so its backward recomputes the block under autograd and feeds the block's share
of the merged gradient through it (recompute_backward): exact, at the cost of one more block forward per block.
"""

from __future__ import annotations

import functools

import torch

from longseq.parallel.head_groups import ALL_HEADS, HeadCall, HeadGroups, KVGradients, fold_heads
from longseq.parallel.local import expand_kv_to
from longseq.parallel.merge import accumulation_dtype

aten = torch.ops.aten

# The memory-efficient SDPA op is left out: given an output and log-sum-exp its backward returned wrong gradients
# (bench/check_gpu.py, H200, torch 2.11), and on Hopper it is far slower than cuDNN anyway (causal bf16 forward +
# backward on an H200 with torch 2.11: ~145 TFLOP/s against cuDNN's ~575; measured 2026-11/12).
CUDA_BACKENDS = ("cudnn", "flash")
CUDA_DTYPES = (torch.bfloat16, torch.float16)  # what both take (cuDNN returned NaN for fp32 instead of refusing)
_chosen: dict[tuple[str, torch.dtype], str] = {}


KERNELS = ("sdpa", "flex")


def block_forward(q, k, v, *, causal: bool, scale: float, kernel: str = "sdpa",
                  groups: HeadGroups = ALL_HEADS) -> tuple[torch.Tensor, torch.Tensor]:
    """groups: how many heads one kernel call takes (Note [Attention head groups])."""
    if kernel == "flex":
        return flex_forward(q, k, v, causal, scale)
    calls = groups.calls(q, k)
    if len(calls) == 1:
        return _sdpa("forward", q, *expand_kv_to(q, k, v), causal, scale)
    out, lse = torch.empty_like(q), None
    for call in calls:
        lse = _forward_call(call, q, k, v, causal, scale, out, lse)
    return out, lse


def _forward_call(call: HeadCall, q, k, v, causal: bool, scale: float, out: torch.Tensor, lse):
    """One call's heads of out and lse (lse made at the first call, in the dtype the op returns). A function of its
    own, so that the call's buffers are freed before the next call makes its own."""
    call_out, call_lse = _sdpa("forward", q[:, call.q], *call.expand(k, v), causal, scale)
    if lse is None:
        lse = call_lse.new_empty(q.shape[:3])
    out[:, call.q], lse[:, call.q] = call_out, call_lse
    return lse


def block_backward(dout, q, k, v, out, lse, *, causal: bool, scale: float, kernel: str = "sdpa", grad_dtype=None,
                   groups: HeadGroups = ALL_HEADS):
    """grad_dtype: the gradients' dtype; by default the accumulation dtype (fp32 for half precision inputs).
    groups: how many heads one kernel call takes (Note [Attention head groups])."""
    acc = grad_dtype or accumulation_dtype(q.dtype)
    if kernel == "flex":
        return [g.to(acc) for g in recompute_backward(flex_forward, dout, q, k, v, out, lse, causal, scale)]
    calls = groups.calls(q, k)
    if len(calls) == 1:
        dq, dk, dv = _sdpa("backward", dout, q, *expand_kv_to(q, k, v), out, lse, causal, scale)
        return dq.to(acc), fold_heads(dk, k.shape[1], acc), fold_heads(dv, k.shape[1], acc)
    dq, kv_grads = torch.empty_like(q, dtype=acc), KVGradients(k, v, acc)
    for call in calls:
        _backward_call(call, dout, q, k, v, out, lse, causal, scale, dq, kv_grads)
    return dq, kv_grads.dk, kv_grads.dv


def _backward_call(call: HeadCall, dout, q, k, v, out, lse, causal: bool, scale: float, dq: torch.Tensor,
                   kv_grads: KVGradients) -> None:
    """One call's heads of dq, dk, dv (a function of its own: the call's buffers go before the next call's)."""
    heads = (slice(None), call.q)
    call_dq, call_dk, call_dv = _sdpa("backward", dout[heads], q[heads], *call.expand(k, v), out[heads], lse[heads],
                                      causal, scale)
    dq[heads] = call_dq
    kv_grads.add(call, call_dk, call_dv)


def _sdpa(direction: str, *args):
    """One call of the SDPA op for `direction` on (dout,) q, k, v (, out, lse), causal, scale.

    The ops read strided tensors whose last dimension is dense: the (B, S, H, D) layout HF's q/k/v and the kernels'
    own outputs have, and head or position slices of it (CPU: checked by tests/test_head_groups.py; CUDA: cuDNN >=
    9.5.1 builds its graph from each tensor's strides, the flash op transposes to (B, S, H, D) and checks only the
    last stride; tests/gpu/test_memory_gpu.py compares against dense copies). So only what breaks that is
    copied, and the log-sum-exp always: a strided lse gave wrong gradients on some ops.
    """
    *tensors, causal, scale = args
    tensors = [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]
    if direction == "backward":
        tensors[-1] = tensors[-1].contiguous()
    q = tensors[1] if direction == "backward" else tensors[0]
    if q.is_cuda:
        return _cuda(direction, q.dtype, *tensors, causal, scale)
    if direction == "forward":
        return aten._scaled_dot_product_flash_attention_for_cpu(*tensors, 0.0, causal, scale=scale)[:2]
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(*tensors, 0.0, causal, scale=scale)


def _cuda(direction: str, dtype: torch.dtype, *args):
    """The backend that worked last time first, then the others (cuDNN refuses some shapes, e.g. 1-token blocks)."""
    if dtype not in CUDA_DTYPES:
        raise ValueError(
            f"Ring attention on CUDA runs the cuDNN and flash kernels, which take bf16 or fp16, not {dtype}. Load "
            "the model in bf16 (dtype=torch.bfloat16; the trainer's bf16 mode does), or use pure Ulysses "
            "(longseq.init_mesh(sp=..., ring=1)), whose SDPA path takes any dtype."
        )
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


def recompute_backward(forward, dout, q, k, v, out, lse, causal: bool, scale: float):
    """q/k/v gradients (in their own dtypes) of one block through a differentiable
    `forward(q, k, v, causal, scale) -> (o_b, lse_b)`.

    The merged output is O = Σ_b w_b·o_b with w_b = exp(lse_b − L) (merge.py), so the block receives
    dO·w_b on o_b and w_b·rowsum(dO·(o_b − O)) on lse_b; through the block's own softmax this gives the flash
    gradient P·(dO·v − rowsum(dO·O)) with the global P = exp(s − L).
    """
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        block_out, block_lse = forward(*inputs, causal, scale)
    acc = accumulation_dtype(q.dtype)
    weight = torch.exp(block_lse.to(acc) - lse.to(acc))
    dout_acc = dout.to(acc)
    grad_out = (weight.unsqueeze(-1) * dout_acc).to(block_out.dtype)
    grad_lse = (weight * (dout_acc * (block_out.to(acc) - out.to(acc))).sum(-1)).to(block_lse.dtype)
    return torch.autograd.grad((block_out, block_lse), inputs, (grad_out, grad_lse))


def flex_forward(q, k, v, causal: bool, scale: float):
    """FlexAttention with GQA (no KV expansion) and a causal BlockMask on square blocks; returns (out, lse)."""
    from torch.nn.attention.flex_attention import AuxRequest

    mask = _causal_block_mask(q.shape[2], q.device) if causal else None
    out, aux = _flex(q.device)(q, k, v, block_mask=mask, scale=scale, enable_gqa=True,
                               return_aux=AuxRequest(lse=True))
    return out, aux.lse


@functools.cache
def _flex(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex materialises the whole score matrix; compiled it is a fused kernel (CPU tests use the former).
    # Dynamic shapes: packed documents give many block shapes, which would exhaust dynamo's recompile limit and drop
    # to the uncompiled kernel (seen on H200, bench/check_gpu.py).
    return torch.compile(flex_attention, dynamic=True) if device.type == "cuda" else flex_attention


@functools.cache
def _causal_block_mask(length: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    # Compiled on CUDA: uncompiled, create_block_mask evaluates the whole length × length mask at once (at 512K
    # tokens on 2 GPUs it asked for 128 GiB).
    return create_block_mask(lambda b, h, q, k: k <= q, None, None, length, length, device=device,
                             _compile=device.type == "cuda")
