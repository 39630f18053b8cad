"""The loss's largest moment: the final norm, lm_head and cross-entropy, tiled or not. Part of Note [Where every
byte goes] (memory.py).

Note [The loss in the plan]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
Beside every layer's kept tensors, per token of the rank (e the compute dtype's bytes, H hidden, V vocab) and per
tile of T tokens, the loss holds the final norm's kept input (untiled: its fp32 copy and normed output) and:

Untiled (loss.cross_entropy_sum): the logits are cast to fp32 and log_softmax keeps its output. The largest moment
is log_softmax's backward: its output, nll_loss's gradient and its own (3·4·V). The hidden-state gradient is not
made yet (lm_head's backward makes it once two of those three are freed), and the final hidden states are alive
only as lm_head's saved input for its weight gradient (a frozen lm_head, 'lora', saves none).

Tiled (Note [Tiled loss], memory/tiled_loss.py): the final hidden states are the loss's input, the hidden-state
gradient is made whole before the first tile, and so is the fp32 weight-gradient accumulator (V·H·4, a trained
lm_head). The fp32 logits' gradient is made in place of them (one fp32 (T × V) tensor, not two), and a tile's
largest moment is one of:

    upcast    the logits in the compute dtype beside their fp32 copy, and from the second tile on the previous
              tile's gradient in the compute dtype (the loop's variable until this tile's replaces it); later
              the gradient's cast back beside the fp32 tile          T·V·(4 + e) + T·V·e   (fp32: T·V·(4 + 4))
    dh        the gradient in the compute dtype, and grad @ W before it is copied into dh's tile   T·V·e + T·H·e
    dW        the gradient, and one vocabulary chunk's product (fp32 accumulation over a lower-precision
              product; in fp32 addmm_ adds in place)                             T·V·e + min(8192, V)·H·e

and after the last tile the accumulator's cast to the weight's dtype, saved for backward, beside it (V·H·e, below
fp32). Under 'full' training that cast becomes FSDP2's unsharded lm_head gradient, which state.training_state
counts from the final norm's backward on; no decoder layer's unsharded gradient exists at either moment.

The final norm's backward comes next, with every layer's kept tensors still alive (without checkpointing, all their
activations): the norm's kept input, the hidden-state gradient and, tiled, the input gradient being filled and one
tile's recompute and gradients; untiled, autograd's backward of the RMSNorm holds five fp32 (s × H) tensors at once
(the gradients of its fp32 product, of the mean and pow's three) beside its fp32 input copy and normed output.
Each was seen alive with plan/live_bytes.py (tests/test_plan_measured.py runs fp32 and bf16 on CPU).
"""

from __future__ import annotations

from longseq.plan.choice import Choice
from longseq.plan.memory import Widths, norm_tile_positions
from longseq.plan.problem import Problem
from longseq.plan.terms import Term

_MIB = 2**20
_VOCAB_CHUNK = 8192  # memory/tiled_loss: the weight gradient's products are added per vocabulary chunk
_G = "loss"


def loss_tile_tokens(problem: Problem, choice: Choice) -> int:
    """memory/tiled_loss.loss_tile_tokens: the tokens whose fp32 logits and their gradient fit tile_memory_mib."""
    return max(1, choice.tile_memory_mib * _MIB // (problem.shape.vocab * 8))


def loss_terms(problem: Problem, choice: Choice, w: Widths) -> list[Term]:
    """What the loss holds at its largest moment (Note [The loss in the plan])."""
    shape, e = problem.shape, problem.dtype_bytes
    trains_head = problem.workload.training != "lora"
    if choice.tiled_norms:
        terms = [Term("final norm input", _G, w.hidden)]
    else:
        terms = [Term("final RMSNorm: fp32 input copy and normed output", _G, shape.hidden * (4 + e))]
    if not choice.tiled_loss:
        if trains_head:
            terms.append(Term("final hidden states (lm_head's input, saved for its weight gradient)", _G, w.hidden))
        return terms + [Term("log-softmax output, nll_loss's gradient and log-softmax's (fp32)", _G, w.vocab * 3 * 4)]
    terms += [Term("final hidden states", _G, w.hidden), Term("hidden-state gradient", _G, w.hidden)]
    if trains_head:
        terms.append(Term("lm_head gradient accumulator (fp32)", _G, fixed=shape.vocab * shape.hidden * 4))
    return terms + max(_tiled_moments(problem, choice, trains_head), key=lambda m: sum(t.fixed for t in m))


def _tiled_moments(problem: Problem, choice: Choice, trains_head: bool) -> list[list[Term]]:
    """The tiled loss's moments beyond what it holds throughout: within the first tile and the second (upcast, dh,
    dW) and after the last (the accumulator's cast)."""
    shape, e = problem.shape, problem.dtype_bytes
    tile = loss_tile_tokens(problem, choice)
    first, second = min(tile, problem.tokens), min(tile, problem.tokens - tile)
    lower = e < 4  # the compute dtype is narrower than fp32: the casts make copies
    fp32 = Term("logits tile (fp32; its gradient made in place)", _G, fixed=first * shape.vocab * 4)
    grad = Term("logits' gradient tile in the compute dtype", _G, fixed=first * shape.vocab * e)
    cast = Term("logits tile in the compute dtype, or the gradient's cast, beside the fp32 tile", _G,
                fixed=first * shape.vocab * e)
    moments = [[fp32, cast] if lower else [fp32],
               [grad, Term("grad @ W of the tile (before its copy into dh)", _G, fixed=first * shape.hidden * e)]]
    if second > 0:
        later = second * shape.vocab * (4 + e * lower)
        moments.append([Term("the second logits tile: fp32 (and in the compute dtype)", _G, fixed=later),
                        Term("the first tile's gradient in the compute dtype (still bound)", _G, fixed=grad.fixed)])
    if trains_head and lower:
        chunk = min(_VOCAB_CHUNK, shape.vocab) * shape.hidden * e
        moments += [[grad, Term("lm_head gradient: one vocabulary chunk's product", _G, fixed=chunk)],
                    [Term("lm_head gradient cast for backward", _G, fixed=shape.vocab * shape.hidden * e)]]
    return moments


def final_norm_backward(problem: Problem, choice: Choice, w: Widths) -> list[Term]:
    """The final norm's backward after the loss (Note [The loss in the plan]): a tile of the tiled norm (memory/
    tiled.py) holds, per position, five fp32 tensors (the gradients of x·rsqrt, of the mean, and pow's three
    products), its fp32 input copy below fp32, its output and, from the second tile on, the previous tile's input
    gradient; the largest of the first two tiles."""
    g, shape, e = "final norm backward", problem.shape, problem.dtype_bytes
    terms = [Term("hidden-state gradient", g, w.hidden)]
    if not choice.tiled_norms:
        return terms + [Term("final RMSNorm: fp32 input copy and normed output", g, shape.hidden * (4 + e)),
                        Term("RMSNorm backward: five fp32 (s × H) tensors", g, 5 * 4 * shape.hidden)]
    terms += [Term("final norm input", g, w.hidden), Term("final norm's input gradient", g, w.hidden)]
    positions, tile = problem.tokens // problem.workload.batch, norm_tile_positions(problem, choice)
    per_row = [(20 + 4 * (e < 4) + e) * shape.hidden, (20 + 4 * (e < 4) + 2 * e) * shape.hidden]
    sizes = [min(tile, positions), min(tile, positions - tile)]
    largest = max(size * problem.workload.batch * row for size, row in zip(sizes, per_row))
    return terms + [Term("a norm tile's recompute and gradients", g, fixed=largest)]
