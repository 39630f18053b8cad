"""The rotary embedding with a backward that holds one gradient of q's size, not three; exact.

Note [Lean rotary backward]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
transformers' decoders rotate q and k with `x*cos + rotate_half(x)*sin`, rotate_half(x) = cat(-x[h:], x[:h]) over
the last dimension (h = head_dim/2). Autograd's backward of that builds, for a gradient g of x's size:

    g*cos                                   one x-sized tensor
    g*sin                                   one x-sized tensor
    the two slices' backwards               two x-sized zero-filled tensors, each with one half written
    their sum into the input buffer         (in place where it can)

so about 3 × x's size is alive at once beside g; for q of Llama-3-8B that is 24 KiB per token, the largest term of
the step's peak (plan/memory.py, Note [Where every byte goes]). The same gradient, element by element, is

    dx[:h] = round(g[:h]*cos[:h]) + round(g[h:]*sin[h:])
    dx[h:] = round(g[h:]*cos[h:]) - round(g[:h]*sin[:h])

and LeanRotary computes exactly that: dx = g*cos (the one x-sized tensor, which is the result), then, over chunks
of positions, t = g*sin of one half and dx's other half += t (or -= t). It is bitwise autograd's result: each
product is the same op on the same operands in the same dtype, rounded once; autograd's sum adds each product to
zeros in the other half, and x + 0 = x exactly (up to the sign of a zero, which torch.equal and every later op treat
alike), so what it computes per element is also one rounded addition of the same two rounded values (in bf16 the
same kernel: both operands widened to fp32, added, rounded), and a + (-b) = a - b exactly. No fused multiply-add is
used: addcmul would round once instead of twice and differ. The forward is built the same way, y = x*cos, then
y[:h] -= x[h:]*sin[:h] and y[h:] += x[:h]*sin[h:] by chunks: transformers' q*cos + rotate_half(q)*sin rounds the
same products (round(-a*b) = -round(a*b): rounding to nearest is symmetric) and adds them once; so the recompute's
forward also holds x's size and a chunk, not three times x's size, and y has the layout x*cos has in transformers'
expression. The gradient is contiguous like autograd's sum (whose first addend is a slice's zero-filled gradient):
what follows reduces over it in the same order (a q/k RMSNorm's weight gradient sums over positions and heads; in
another layout it would sum in another order and differ in the last bit). The transient is one chunk's half-product
(_CHUNK_BYTES), not the tensor. Only cos and sin are saved (as autograd's mul saves them; x is not).

Where cos or sin needs a gradient, their dtype differs from x's, or their width is not x's (partial rotary), the
model's own function runs: the lean one covers exactly the standard form, and install_lean_rotary checks that
form on each modeling module before replacing its `apply_rotary_pos_emb` (process-wide for that module, so it must
hold for every model of the family).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch
from transformers.models.llama.modeling_llama import rotate_half  # the rotation every standard family shares

_CHUNK_BYTES = 64 << 20  # one chunk's half-product in the backward
_installed: dict[str, Callable] = {}  # modeling module name -> its original apply_rotary_pos_emb
_checked: dict[str, bool] = {}  # modeling module name -> whether the lean function matched its own
_SIGNATURE = [("q", inspect.Parameter.empty), ("k", inspect.Parameter.empty), ("cos", inspect.Parameter.empty),
              ("sin", inspect.Parameter.empty), ("unsqueeze_dim", 1)]  # transformers' apply_rotary_pos_emb


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos) + (rotate_half(x) * sin)


class LeanRotary(torch.autograd.Function):
    """x*cos + rotate_half(x)*sin with cos and sin broadcast to x (Note [Lean rotary backward])."""

    @staticmethod
    def forward(ctx, x, cos, sin, chunk_bytes):
        ctx.save_for_backward(cos, sin)
        ctx.chunk_bytes = chunk_bytes
        return _rotate_by_chunks(x, cos, sin, chunk_bytes, sign=1)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate_by_chunks(grad, cos, sin, ctx.chunk_bytes, sign=-1), None, None, None


def _rotate_by_chunks(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunk_bytes: int,
                      sign: int) -> torch.Tensor:
    """sign=1, the rotation (forward): y = x*cos; y[:h] -= x[h:]*sin[:h]; y[h:] += x[:h]*sin[h:].
    sign=-1, its transpose (backward): y = x*cos; y[:h] += x[h:]*sin[h:]; y[h:] -= x[:h]*sin[:h]; y contiguous, as
    autograd's sum is (its first addend is a slice's zero-filled gradient).
    The products one chunk at a time along x's longest leading dimension (the sequence)."""
    half = x.shape[-1] // 2
    y = x * cos if sign == 1 else torch.mul(x, cos, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
    dim = max(range(x.dim() - 1), key=lambda d: x.shape[d])
    sin = sin.expand_as(x)
    row_bytes = x[..., :half].numel() // max(x.shape[dim], 1) * x.element_size()
    step = max(1, chunk_bytes // max(row_bytes, 1))
    for start in range(0, x.shape[dim], step):
        n = min(step, x.shape[dim] - start)
        xs, s, ys = (t.narrow(dim, start, n) for t in (x, sin, y))
        low_sin, high_sin = (s[..., :half], s[..., half:]) if sign == 1 else (s[..., half:], s[..., :half])
        ys[..., :half].add_(xs[..., half:] * low_sin, alpha=-sign)
        ys[..., half:].add_(xs[..., :half] * high_sin, alpha=sign)
    return y


def lean_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                chunk_bytes: int = _CHUNK_BYTES) -> torch.Tensor:
    """x*cos + rotate_half(x)*sin, with cos and sin of x's dtype and width, broadcastable to x, needing no gradient."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return _rotate(x, cos, sin)
    return LeanRotary.apply(x, cos, sin, chunk_bytes)


def _is_standard(q, k, cos, sin) -> bool:
    """The form lean_rotary computes: full-width rotary, one dtype, constant cos and sin."""
    width = q.shape[-1]
    return (q.dtype == k.dtype == cos.dtype == sin.dtype and width % 2 == 0
            and k.shape[-1] == cos.shape[-1] == sin.shape[-1] == width
            and not (cos.requires_grad or sin.requires_grad))


def lean_apply_rotary_pos_emb(original: Callable) -> Callable:
    """A drop-in for a modeling module's `original` apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1): the lean
    backward in the standard form, `original` otherwise."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not _is_standard(q, k, cos, sin):
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        cos = cos.unsqueeze(unsqueeze_dim)
        sin = sin.unsqueeze(unsqueeze_dim)
        return lean_rotary(q, cos, sin, _CHUNK_BYTES), lean_rotary(k, cos, sin, _CHUNK_BYTES)

    apply_rotary_pos_emb.__doc__ = original.__doc__
    return apply_rotary_pos_emb


def install_lean_rotary(model: torch.nn.Module) -> list[str]:
    """Replace `apply_rotary_pos_emb` in the modeling module of every submodule of `model` whose forward calls it,
    once per module, where the lean function matches the module's own exactly (_matches); returns the names of the
    modules that use it."""
    for cls in {type(m) for m in model.modules()}:
        code = getattr(inspect.unwrap(cls.forward), "__code__", None)  # under decorators such as deprecate_kwarg
        if "apply_rotary_pos_emb" not in getattr(code, "co_names", ()):
            continue
        name = cls.__module__
        module = sys.modules.get(name)
        original = getattr(module, "apply_rotary_pos_emb", None)
        if name in _checked or not callable(original):
            continue
        _checked[name] = _matches(original)
        if _checked[name]:
            _installed[name] = original
            module.apply_rotary_pos_emb = lean_apply_rotary_pos_emb(original)
    return sorted(name for name in _installed if _checked.get(name))


def _matches(original: Callable) -> bool:
    """Whether `original` has transformers' signature and the lean function gives its forward and q/k gradients
    exactly (torch.equal) on a small random input in fp32: batch 2, 3 query heads and 1 K/V head, 7 positions,
    chunks of 3 positions."""
    try:
        parameters = inspect.signature(original).parameters
    except (TypeError, ValueError):
        return False
    if [(p.name, p.default) for p in parameters.values()] != _SIGNATURE:
        return False
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cpu")

    q, k, cos, sin = randn(2, 3, 7, 8), randn(2, 1, 7, 8), randn(2, 7, 8), randn(2, 7, 8)
    grads = randn(2, 3, 7, 8), randn(2, 1, 7, 8)
    chunk = 3 * (2 * 3 * 4 * 4)  # 3 positions of q's half: chunks of 3, 3 and 1

    def lean(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return lean_rotary(q, cos, sin, chunk), lean_rotary(k, cos, sin, chunk)

    try:
        with torch.enable_grad():
            results = [_forward_and_grads(fn, q, k, cos, sin, grads) for fn in (original, lean)]
    except Exception:  # a different shape contract: not the standard form
        return False
    return all(torch.equal(a, b) for a, b in zip(*results))


def _forward_and_grads(fn, q, k, cos, sin, grads) -> list[torch.Tensor]:
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    outputs = fn(q, k, cos, sin)
    torch.autograd.backward(outputs, grads)
    return [*outputs, q.grad, k.grad]
