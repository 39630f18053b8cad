"""GPU and host bytes of one rank in one training step, term by term, from each mechanism's cost per token.

Note [Where every byte goes]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Per rank, with s tokens held (batch × length / sp), e bytes per bf16 element, H hidden, a = heads × head_dim,
k = the K (or V) width a rank holds per token (max(kv_heads, ulysses) × head_dim), I the MLP width, V the vocab:

GPU peak = fixed (weights, gradients, optimizer shards, FSDP2's unsharded layer, buffers)
         + what layers keep from their forward until their backward (checkpoints kept on the GPU: H·e per token;
           kept attention outputs: a·e + lse; layers without checkpoints: their whole saved set)
         + the working set of the moment: one layer's backward, or the loss.

A layer's backward has three large moments; for Llama-3.1-8B on one GPU at 128K with the defaults (the attention
cache on the host, norms fused into their readers, attention kernels on 4 of the 32 heads per call), KiB per token:

                                                       attention backward   after it (rotary backward)
    residual-stream gradient                    H·e            8                    8
    layer input (the restored checkpoint)       H·e            8                    8
    q; k and v (saved by the attention)         a·e + 2k·e     8 + 4                –
    attention output; log-sum-exp (restored)    a·e + heads·4  8.1                  8.1 (still held)
    gradient of the attention output            a·e            8                    –
    dq, dk, dv of all heads, filled by calls    a·e + 2k·e     12                   –
    one call: K/V expanded, dq/dk/dv, workspace (2 + 3 + 2)·a·e/8  7                –
    q/k/v projections' outputs                  a·e + 2k·e     –                    12 (still held)
    rotary backward of q: its gradient          a·e            –                    8 (+ a 64 MiB chunk)
    normed input (made for the fused readers)   H·e            –                    8 (still held)
    rotary cos/sin, ids                         2·d·e + 24     0.5                  0.5
                                                               ─────                ─────
                                                               63.6                 52.6

(At 256K the kernel calls take 2 heads each: 60.1 at the attention backward, less than the recompute's MLP forward:
the layer's saved tensors, the norm's output and the MLP's output buffer, 60.6, and one tile; mlp_recompute.)
Autograd's own rotary backward held three q-sized products there (3·a·e, 24: 68.6, the step's peak, which device
call 22 measured); longseq's makes the gradient alone, a chunk's product beside it (Note [Lean rotary backward],
memory/rotary.py).

The tensors marked "still held" were seen alive there in real steps on CPU (plan/live_bytes.py,
tests/test_plan_measured.py); so were, under Ulysses, the recompute's all-to-all buffers beside q, k, v on both
sides of it. A layer keeping its attention output on the GPU holds nothing of its recompute after its backward
(Note [Kept pairs hold no graph], memory/attention_cache.py; tests/test_plan_measured.py checks it over steps). Without the cache the one-GPU path is the model's own SDPA (flash, for GQA: dk/dv per query head
inside the kernel, and the checkpoint of the layer below already back): 96.6. Before issue 13 (dense copies of
dout, q and out, all heads in one call, norm outputs kept, the previous checkpoint back one layer ahead) the same
terms gave 148.8 and 104.6 against the 149 and 105 measured (GPU.md; commit b0d5f37). What changes under Ulysses,
ring (fp32 accumulators for dq and the dk/dv travelling with K/V), packed documents (calls per document), untiled
MLP (four I-wide intermediates kept, two more at its backward's peak), untiled norms (fp32 copies of their inputs)
and the loss (Note [The loss in the plan], loss.py) is in the functions below and those files; each term
names the tensor it counts.

Host per rank = the process itself + FSDP2's CPU-offloaded parameters, gradients and AdamW state (16 bytes per
parameter on its shard) + the offloader's arena (Note [Host arena]), which holds the offloaded checkpoints (H·e per
token per offloaded layer, one per layers_per_checkpoint) and kept attention outputs (a·e + heads·4 per token per
layer) in pages and grows by 1 GiB chunks within its budget.

Layers differ in mixture-of-experts and hybrid models: each layer's kind (plan/families.py) picks its mixer's terms
(attention as above; Gated DeltaNet: Note [Linear attention in the plan], linear.py; sliding windows: attention.py)
and its feed-forward block's (dense as above; experts: Note [Expert blocks in the plan], experts.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from longseq.plan import experts, linear
from longseq.plan.attention import windowed
from longseq.plan.choice import Choice
from longseq.plan.families import DENSE, LayerKind
from longseq.plan.problem import Problem
from longseq.plan.terms import Term

_MIB = 2**20
_ROTARY_CHUNK = 64 << 20  # memory/rotary._CHUNK_BYTES: one chunk's half-product in the rotary backward



@dataclass(frozen=True)
class Widths:
    """Bytes per token (of the tokens a rank holds) of the tensors the terms are made of."""

    hidden: float
    q: float
    kv: float
    lse: float
    inter: float
    vocab: int
    workspace: float
    expand: bool
    path: str
    ulysses: int
    ring: int
    lse_dense: bool
    head_dim_bytes: float
    fp32: float
    """fp32 bytes per element over the compute dtype's (accumulators)."""


def mlp_tile_positions(problem: Problem, choice: Choice) -> int:
    """memory/tiled.py's tile: the most positions whose three (batch·t × I) intermediates fit tile_memory_mib."""
    per_position = problem.workload.batch * problem.shape.intermediate * 3 * problem.dtype_bytes
    return max(1, choice.tile_memory_mib * _MIB // per_position)


def norm_tile_positions(problem: Problem, choice: Choice) -> int:
    """memory/tiled.py's norm tile: the most positions whose three fp32 (batch·t × H) tensors fit tile_memory_mib."""
    return max(1, choice.tile_memory_mib * _MIB // (problem.workload.batch * problem.shape.hidden * 3 * 4))


def ffn_tiled(problem: Problem, choice: Choice, kind: LayerKind) -> bool:
    """Whether the feed-forward block of a layer of `kind` runs over sequence tiles: tiled_mlp on and the sequence
    longer than one of its tiles (expert blocks: see experts.runs_tiled)."""
    if kind.ffn == "experts":
        return experts.runs_tiled(problem, choice)
    return choice.tiled_mlp and problem.tokens // problem.workload.batch > mlp_tile_positions(problem, choice)


def effective(problem: Problem, choice: Choice) -> Choice:
    """The choice as it runs (memory/tiled.py): tiled_mlp off when no layer's feed-forward block runs tiled (each
    fits in one tile), and norms fused into their readers only when tiled and longer than a norm tile."""
    positions = problem.tokens // problem.workload.batch
    if choice.tiled_mlp and not any(ffn_tiled(problem, choice, kind) for kind in set(problem.shape.kinds)):
        choice = replace(choice, tiled_mlp=False)
    if choice.fuse_norms and not (choice.tiled_norms and positions > norm_tile_positions(problem, choice)):
        choice = replace(choice, fuse_norms=False)
    return choice


def widths(problem: Problem, choice: Choice) -> Widths:
    shape, layout, e = problem.shape, problem.layout, problem.dtype_bytes
    path = "block" if layout.sp > 1 or (choice.checkpointing and choice.cache_attention) else "sdpa"
    return Widths(
        hidden=shape.hidden * e, q=shape.attention_width * e,
        kv=max(shape.kv_heads, layout.ulysses) * shape.head_dim * e, lse=shape.heads * 4.0,
        inter=shape.intermediate * e, vocab=shape.vocab,
        workspace=problem.machine.card.attention_workspace_bytes * shape.attention_width,
        expand=shape.heads > max(shape.kv_heads, layout.ulysses), path=path, ulysses=layout.ulysses,
        ring=layout.ring, lse_dense=problem.machine.card.attention_lse_dense, head_dim_bytes=shape.head_dim * e,
        fp32=max(4, e) / e,
    )


def layer_saved(problem: Problem, choice: Choice, w: Widths, kind: LayerKind = DENSE) -> tuple[list[Term], list[Term]]:
    """What one layer's graph keeps for its backward (recomputed under checkpointing, kept without): (the tensors
    alive through the attention backward, those the MLP, post-attention norm and o_proj backward free before it).

    A tiled norm keeps its bf16 input (the layer input, the residual after attention); an untiled RMSNorm keeps an
    fp32 copy of it and its normed bf16 output instead."""
    g = "layer saved tensors"
    if choice.tiled_norms:
        norm_in, norm_mid = [Term("layer input", g, w.hidden)], [Term("residual after attention", g, w.hidden)]
    else:
        copy = problem.shape.hidden * (4 + problem.dtype_bytes)
        norm_in = [Term("input RMSNorm: fp32 input copy and normed output", g, copy)]
        norm_mid = [Term("post-attention RMSNorm: fp32 input copy and normed output", g, copy)]
    # Norms fused into their readers (q/k/v projections, the tiled MLP) keep no normed output: the readers keep the
    # norm's input, which is the layer input or the residual, kept anyway.
    fused = choice.tiled_norms and choice.fuse_norms
    tiled = ffn_tiled(problem, choice, kind)
    # Only a dense MLP reads its norm fused; an expert block keeps its normed input (its tiles' input).
    before = norm_mid + ([] if fused and tiled and kind.ffn == "dense" else [Term("MLP input (normed)", g, w.hidden)])
    if kind.mixer == "linear":
        mixer, freed = linear.saved(problem, g)
        through = norm_in + mixer
        before += freed
    else:
        normed = [] if fused else [Term("normed input (q/k/v projections' input)", g, w.hidden)]
        through = norm_in + normed + attention_saved(problem, w, g, kind)
        copies = w.ulysses > 1 or w.ring > 1 or problem.shape.sinks or windowed(problem, kind) == "chunks"
        if copies:  # the output comes back in another layout than o_proj's (after an exchange, a merge, chunks)
            before.append(Term("o_proj input (a copy of the attention output)", g, w.q))
    if kind.ffn == "experts" and not tiled:
        before += experts.saved(problem, g)
    elif not tiled:
        before.append(Term("MLP intermediates (gate, up, act, product)", g, 4 * w.inter))
    return through, before


def attention_saved(problem: Problem, w: Widths, g: str, kind: LayerKind = DENSE) -> list[Term]:
    """What an attention layer's mixer keeps: q, k, v (as the attention saves them), its output and log-sum-exp,
    the q/k norms' fp32 copies, and a gated output's gate (Qwen3-Next, Qwen3.5: the gate, its sigmoid and the
    gated output, which o_proj keeps). A window run as SDPA chunks (parallel/local.py) keeps K and V expanded to the
    query heads and each chunk's additive window mask (2·window elements per token)."""
    shape, e = problem.shape, problem.dtype_bytes
    kv = [Term("k and v", g, 2 * w.kv)]
    if windowed(problem, kind) == "chunks":
        kv = [Term("K and V expanded to the query heads", g, 2 * (w.q if w.expand else w.kv)),
              Term("window masks of the SDPA chunks", g, 2 * shape.sliding_window * e)]
    terms = [Term("q", g, w.q), *kv, Term("attention output", g, w.q), Term("attention log-sum-exp", g, w.lse)]
    if shape.qk_norm:
        width = (shape.heads + shape.kv_heads) * shape.head_dim
        rows = 2 if shape.qk_norm_full_width else shape.heads + shape.kv_heads  # one fp32 rsqrt per norm row
        terms.append(Term("q/k RMSNorm fp32 copies, rsqrt and outputs", g, width * (4 + e) + rows * 4))
    if shape.attention_gate:
        terms.append(Term("attention output gate: the gate, its sigmoid, the gated output", g, 3 * w.q))
    return terms


# what the attention backward releases of its saved tensors
ATTENTION_SAVED = ("q", "k and v", "K and V expanded to the query heads", "window masks of the SDPA chunks")


def after_attention(problem: Problem, choice: Choice, w: Widths) -> list[Term]:
    """Once the attention backward is done, in the rotary embedding's backward: the attention output and lse are
    still held, so are the q/k/v projections' outputs and the normed input (even with norms fused), and the
    gradient of q is made as one q-sized tensor, with one chunk's half-product beside it (Note [Lean rotary
    backward]; autograd's own backward made three q-sized products). Seen with plan/live_bytes.py; the
    attention's own input gradients are gone by then."""
    g = "after the attention backward"
    terms = [Term("q/k/v projections' outputs", g, w.q + 2 * w.kv), *rotary_backward(problem, w, g)]
    if choice.tiled_norms and choice.fuse_norms:
        terms.append(Term("normed input (made for the fused projections)", g, w.hidden))
    return terms


def rotary_backward(problem: Problem, w: Widths, group: str) -> list[Term]:
    """q's gradient made as one q-sized tensor with one chunk's half-product beside it (memory/rotary.py); the
    model's own rotary (GPT-OSS's, a partial one) holds autograd's three q-sized products."""
    if not problem.shape.lean_rotary:
        return [Term("rotary backward of q (the model's own: three q-sized products)", group, 3 * w.q)]
    chunk = min(_ROTARY_CHUNK, problem.tokens * w.q / 2)
    return [Term("rotary backward of q: its gradient", group, w.q),
            Term("rotary backward of q: one chunk's half-product", group, fixed=chunk)]


def ulysses_recompute(problem: Problem, choice: Choice, w: Widths) -> list[Term]:
    """A layer's recompute under Ulysses, at its all-to-all (Note [Ulysses all-to-all]): q, k, v before the exchange,
    its send and receive buffers and the dense q, k, v after it, beside the normed input and the layer's own kept
    attention output brought back (seen with plan/live_bytes.py)."""
    g, qkv = "Ulysses exchange in the recompute", w.q + 2 * w.kv
    terms = [Term("q, k, v before the exchange", g, qkv), Term("all-to-all send buffer", g, qkv),
             Term("all-to-all receive buffer", g, qkv), Term("q, k, v after the exchange", g, qkv),
             Term("normed input", g, w.hidden)]
    if choice.cache_attention:
        terms.append(Term("this layer's kept attention output, brought back", g, w.q + w.lse))
    return terms


def mlp_backward(problem: Problem, choice: Choice, w: Widths, kind: LayerKind = DENSE) -> list[Term]:
    """The MLP's (or expert block's) backward, on top of all the layer's saved tensors."""
    g = "MLP backward"
    shape, trains = problem.shape, problem.workload.training != "lora"
    if kind.ffn == "experts":
        return experts.backward(problem, choice, ffn_tiled(problem, choice, kind))
    # At the MLP backward's peak six I-wide tensors live: gate, act and up (saved), the gradient of down_proj's
    # input, then those of act and up; the product (down_proj's saved input) is freed by then, and no gradient has
    # reached the MLP's input yet (seen with plan/live_bytes.py).
    if not ffn_tiled(problem, choice, kind):
        return [Term("MLP backward: three gradients, less the freed product", g, 2 * w.inter)]
    fused = choice.tiled_norms and choice.fuse_norms  # the tile recomputes the post-attention norm
    tiles = [_mlp_tile(problem, w, mlp_tile_positions(problem, choice), k, fused, trains) for k in range(3)]
    return [Term("MLP input gradient", g, w.hidden)] + max(tiles, key=lambda t: sum(x.fixed for x in t))


def _mlp_tile(problem: Problem, w: Widths, tile: int, k: int, fused: bool, trains: bool) -> list[Term]:
    """Tile k's backward (memory/tiled.py, Note [Tiled compute]) at its peak, the backward of act * up: the
    recompute's gate, up and act, the product's gradient and those of act and up (six I-wide: the product, down's
    saved input, is freed by then, as without tiles), the recomputed output and, from the second tile on, the
    previous tile's input gradient (still bound while the next tile runs); fused, the norm's recompute beside them
    (its fp32 input copy below fp32, its normed output and the weight's product). Weight gradients: down's of this
    tile; from the second tile the fp32 sums, and the previous tile's, which in fp32 are the sums themselves until
    the third (the first tile's gradients become the sums: a no-op cast). Seen with plan/live_bytes.py."""
    g, shape, e = "MLP backward", problem.shape, problem.dtype_bytes
    positions = problem.tokens // problem.workload.batch
    rows = min(tile, positions - k * tile) * problem.workload.batch
    if rows <= 0:
        return []
    per_row = 6 * w.inter + (2 if k else 1) * w.hidden + ((4 * (e < 4) + 2 * e) * shape.hidden if fused else 0)
    terms = [Term("MLP tile: six I-wide recomputes and gradients, the output (and the previous input gradient)", g,
                  fixed=rows * per_row)]
    if not trains:
        return terms
    weight = shape.hidden * shape.intermediate * e
    terms.append(Term("MLP tile: down_proj's weight gradient", g, fixed=weight))
    if k:
        terms.append(Term("MLP weight gradients summed over tiles (fp32)", g, fixed=3 * weight * max(4, e) / e))
    if k > 1 or (k == 1 and e < 4):
        terms.append(Term("MLP weight gradients of the previous tile", g, fixed=3 * weight))
    return terms


def mlp_recompute(problem: Problem, choice: Choice, w: Widths) -> list[Term]:
    """A checkpointed layer's recompute runs its tiled MLP's forward whole (the MLP's saved tensors are packed only
    when it returns), beside the layer's recomputed saved tensors: the norm's output (the decoder layer's variable
    while the MLP runs; fused, not among the saved), the MLP's output buffer, and one tile's forward without grad:
    up, act and their product, the previous tile's output and, fused, the norm's output tile. Seen with
    plan/live_bytes.py, at the peak of the model's own SDPA path with 1 MiB tiles."""
    g, fused = "MLP forward in the recompute", choice.tiled_norms and choice.fuse_norms
    rows = min(mlp_tile_positions(problem, choice), problem.tokens // problem.workload.batch) * problem.workload.batch
    terms = [Term("MLP output buffer", g, w.hidden),
             Term("MLP tile forward: up, act, their product, the previous tile's output (and the norm's)", g,
                  fixed=rows * (3 * w.inter + (2 if fused else 1) * w.hidden))]
    return ([Term("post-attention norm output", g, w.hidden)] if fused else []) + terms


def global_terms(problem: Problem, w: Widths) -> list[Term]:
    width = problem.shape.rotary_width or problem.shape.head_dim
    return [Term("rotary cos and sin", "buffers", 2 * width * problem.dtype_bytes),
            Term("token ids, positions, labels", "buffers", 3 * 8.0)]
