"""GPU and host bytes of one rank in one training step, term by term, from each mechanism's cost per token.

Note [Where every byte goes]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Per rank, with s tokens held (batch × length / sp), e bytes per bf16 element, H hidden, a = heads × head_dim,
k = the K (or V) width a rank holds per token (max(kv_heads, ulysses) × head_dim), I the MLP width, V the vocab:

GPU peak = fixed (weights, gradients, optimizer shards, FSDP2's unsharded layer, buffers)
         + what layers keep from their forward until their backward (checkpoints kept on the GPU: H·e per token;
           kept attention outputs: a·e + lse; layers without checkpoints: their whole saved set)
         + the working set of the moment: one layer's backward, or the loss.

The working set of a layer's backward is largest inside the attention kernel's backward (figures: Llama-3.1-8B,
one GPU, longseq's block kernels with the attention cache, KiB per token):

    residual-stream gradient                            H·e                 8
    the layer's saved tensors, recomputed:
      layer input (the restored checkpoint)             H·e                 8
      normed input (q/k/v projections keep it)          H·e                 8
      q; contiguous k and v                             a·e + 2k·e          8 + 4
      attention output; log-sum-exp (fp32)              a·e + heads·4       8 + 0.125
    prefetched for the next layer back: its checkpoint, its kept output      H·e + a·e + heads·4   16.1
    gradient of the attention output (o_proj's input gradient)              a·e                 8
    block_backward's dense copies: dout, q, out (cuDNN output has q's layout, which is the projection's)  3·a·e  24
    K and V expanded to the query heads (GQA)            2·a·e              16
    the kernel's dq, dk, dv (expanded)                   3·a·e              24
    the kernel's workspace (fp32 dq accumulator)         4·a                16
    rotary cos/sin, ids                                  2·head_dim·e + 24  0.5
                                                                            ─────
                                                                            148.8   (measured: 149)

Without the cache the one-GPU path is the model's own SDPA (flash, for GQA): no copies, no expansion of K and V,
the kernel's dk/dv built per query head then summed, no prefetched output: 104.6 (measured: 105). What changes
under Ulysses (q, k, v and the output arrive as dense exchange buffers, the o_proj input is a copy), ring (fp32
accumulators for dq and the dk/dv travelling with K/V), packed documents (the kernel's buffers follow the
longest document), untiled MLP (four I-wide intermediates kept, two more at its backward's peak), untiled norms (fp32
copies of their inputs) and the loss (tile × V fp32 logits, or all of them untiled) is in the functions below;
each term names the tensor it counts.

Host per rank = the process itself + FSDP2's CPU-offloaded parameters, gradients and AdamW state (16 bytes per
parameter on its shard) + offloaded checkpoints (H·e per token per offloaded layer) + kept attention outputs on
the host (a·e + heads·4 per token per layer). CUDA's caching host allocator rounds each pinned block up to a power
of two, so each offloaded tensor counts at its rounded size (the host budget counts it unrounded).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from longseq.plan.choice import Choice
from longseq.plan.problem import Problem
from longseq.plan.terms import Term

_MIB = 2**20
_VOCAB_CHUNK = 8192  # memory/tiled_loss: fp32 weight-gradient products per vocabulary chunk



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
    out_dense: bool
    lse_dense: bool
    document_share: float
    head_dim_bytes: float
    fp32: float
    """fp32 bytes per element over the compute dtype's (accumulators)."""


def mlp_tile_positions(problem: Problem, choice: Choice) -> int:
    """memory/tiled.py's tile: the most positions whose three (batch·t × I) intermediates fit tile_memory_mib."""
    per_position = problem.workload.batch * problem.shape.intermediate * 3 * problem.dtype_bytes
    return max(1, choice.tile_memory_mib * _MIB // per_position)


def effective(problem: Problem, choice: Choice) -> Choice:
    """The choice as it runs: a tiled MLP whose sequence fits in one tile runs untiled (memory/tiled.py)."""
    if choice.tiled_mlp and problem.tokens // problem.workload.batch <= mlp_tile_positions(problem, choice):
        return replace(choice, tiled_mlp=False)
    return choice


def widths(problem: Problem, choice: Choice) -> Widths:
    shape, layout, e = problem.shape, problem.layout, problem.dtype_bytes
    path = "block" if layout.sp > 1 or (choice.checkpointing and choice.cache_attention) else "sdpa"
    like_q = problem.machine.card.attention_output_layout == "like_q"
    # The block kernels' output is dense (B, H, S, D) when cuDNN follows a dense q (Ulysses' exchange buffers) or the
    # ring accumulators produced it; otherwise it has the projections' (B, S, H, D) layout.
    out_dense = layout.ring > 1 or (like_q and layout.ulysses > 1)
    return Widths(
        hidden=shape.hidden * e, q=shape.attention_width * e,
        kv=max(shape.kv_heads, layout.ulysses) * shape.head_dim * e, lse=shape.heads * 4.0,
        inter=shape.intermediate * e, vocab=shape.vocab,
        workspace=problem.machine.card.attention_workspace_bytes * shape.attention_width,
        expand=shape.heads > max(shape.kv_heads, layout.ulysses), path=path, ulysses=layout.ulysses,
        ring=layout.ring, out_dense=out_dense, lse_dense=problem.machine.card.attention_lse_dense,
        document_share=problem.workload.document / problem.workload.length,
        head_dim_bytes=shape.head_dim * e, fp32=max(4, e) / e,
    )


def layer_saved(problem: Problem, choice: Choice, w: Widths) -> tuple[list[Term], list[Term]]:
    """What one layer's graph keeps for its backward (recomputed under checkpointing, kept without): (the tensors
    alive through the attention backward, those the MLP, post-attention norm and o_proj backward free before it).

    A tiled norm keeps its bf16 input (the layer input, the residual after attention); an untiled RMSNorm keeps an
    fp32 copy of it and its normed bf16 output instead."""
    shape, g, e = problem.shape, "layer saved tensors", problem.dtype_bytes
    if choice.tiled_norms:
        norm_in, norm_mid = [Term("layer input", g, w.hidden)], [Term("residual after attention", g, w.hidden)]
    else:
        copy = shape.hidden * (4 + e)
        norm_in = [Term("input RMSNorm: fp32 input copy and normed output", g, copy)]
        norm_mid = [Term("post-attention RMSNorm: fp32 input copy and normed output", g, copy)]
    through = norm_in + [Term("normed input (q/k/v projections' input)", g, w.hidden), Term("q", g, w.q),
                         Term("k and v", g, 2 * w.kv), Term("attention output", g, w.q),
                         Term("attention log-sum-exp", g, w.lse)]
    if shape.qk_norm:
        width = (shape.heads + shape.kv_heads) * shape.head_dim
        through.append(Term("q/k RMSNorm fp32 copies and outputs", g, width * (4 + e)))
    before = norm_mid + [Term("MLP input (normed)", g, w.hidden)]
    if w.ulysses > 1 or w.ring > 1:
        before.append(Term("o_proj input (a copy of the attention output)", g, w.q))
    if not choice.tiled_mlp:
        before.append(Term("MLP intermediates (gate, up, act, product)", g, 4 * w.inter))
    return through, before


def _kernel_call(w: Widths, q_share: float, k_share: float) -> list[Term]:
    """block_backward's buffers for one kernel call over shares of the rank's query and key tokens
    (parallel/kernels.py): it makes dout, q, out and lse dense, expands K and V to the query heads, the kernel
    returns dq, dk, dv, and its workspace, or after it dk and dv summed back to the KV heads (in fp32 on a ring)."""
    g = "attention backward"
    whole = q_share == k_share == 1 and w.ring == 1  # one call over all the rank's tokens: no slices
    terms = [Term("dout dense copy", g, w.q * q_share)]
    if not (whole and w.ulysses > 1):  # q arrives dense only from Ulysses' exchange
        terms.append(Term("q dense copy", g, w.q * q_share))
    if not (whole and w.out_dense):
        terms.append(Term("attention output dense copy", g, w.q * q_share))
    if not (whole and w.lse_dense):
        terms.append(Term("log-sum-exp dense copy", g, w.lse * q_share))
    if w.expand:
        terms.append(Term("K and V expanded to the query heads", g, 2 * w.q * k_share))
    elif not whole:
        terms.append(Term("K and V dense copies", g, 2 * w.kv * k_share))
    kv_grad = w.q if w.expand else w.kv
    terms.append(Term("kernel dq, dk, dv", g, w.q * q_share + 2 * kv_grad * k_share))
    ring_casts = w.ring > 1 and w.fp32 > 1  # a ring accumulates in fp32: dq cast, dk/dv summed into fp32
    after = (w.fp32 * w.q * q_share if ring_casts else 0.0) + 2 * w.kv * k_share * (w.fp32 if ring_casts else 1.0) \
        * (w.expand or ring_casts)
    if w.workspace * q_share >= after:
        return terms + [Term("kernel workspace", g, w.workspace * q_share)]
    return terms + [Term("block gradients summed to the KV heads (and cast)", g, after)]


def attention_backward(problem: Problem, w: Widths) -> list[Term]:
    """Buffers of the attention backward, at the kernel call, on top of the layer's saved tensors."""
    g = "attention backward"
    dout = [Term("attention output gradient", g, w.q)]
    if w.path == "sdpa":
        kv_grad = w.q if w.expand and problem.machine.card.sdpa_gqa_expands_kv_grads else 0.0
        return dout + [Term("kernel dq, dk, dv", g, w.q + 2 * w.kv),
                       Term("kernel dk, dv per query head", g, 2 * kv_grad),
                       Term("kernel workspace", g, w.workspace)]
    if w.ring > 1:
        # Zigzag (Note [Ring attention]): the largest calls are a rank's two q chunks against one k chunk, or one
        # q chunk against both k chunks; the previous call's gradients are still referenced (at two ranks that
        # call was one chunk against one). K/V in flight: the received set (and, beyond two ranks, the one held).
        previous = 0.5 * (w.q + 2 * w.kv) if w.ring == 2 else max(w.q + 2 * 0.5 * w.kv, 0.5 * w.q + 2 * w.kv)
        accumulators = [Term("ring dq accumulator (fp32)", g, w.fp32 * w.q),
                        Term("ring dk/dv: this step's, sent and received (fp32)", g, 3 * 2 * w.fp32 * w.kv),
                        Term("ring K/V received", g, (1 if w.ring == 2 else 2) * 2 * w.kv),
                        Term("the previous block's gradients (fp32)", g, w.fp32 * previous)]
        calls = [_kernel_call(w, 1.0, 0.5), _kernel_call(w, 0.5, 1.0)]
        return dout + accumulators + max(calls, key=lambda c: sum(t.per_token for t in c))
    share = w.document_share
    terms = dout + _kernel_call(w, share, share)
    if share < 1:
        terms.append(Term("dq, dk, dv of the whole sequence (per-document calls)", g, w.q + 2 * w.kv))
    return terms


def mlp_backward(problem: Problem, choice: Choice, w: Widths) -> list[Term]:
    """The MLP's backward, on top of all the layer's saved tensors."""
    g = "MLP backward"
    shape, trains = problem.shape, problem.workload.training != "lora"
    # At the MLP backward's peak six I-wide tensors live: gate, act and up (saved), the gradient of down_proj's
    # input, then those of act and up; the product (down_proj's saved input) is freed by then, and no gradient has
    # reached the MLP's input yet (seen with bench/live_bytes.py).
    if not choice.tiled_mlp:
        return [Term("MLP backward: three gradients, less the freed product", g, 2 * w.inter)]
    terms = [Term("MLP input gradient", g, w.hidden)]
    tile = mlp_tile_positions(problem, choice) * problem.workload.batch * w.inter  # one (batch·t × I) tensor
    terms.append(Term("MLP tile (its recompute and gradients)", g, fixed=6 * tile))
    if trains:
        mlp = 3 * shape.hidden * shape.intermediate
        terms.append(Term("MLP weight gradients over tiles (fp32 sums, one tile's)", g,
                          fixed=mlp * (4 + problem.dtype_bytes)))
    return terms


def loss_terms(problem: Problem, choice: Choice, w: Widths) -> list[Term]:
    """The loss's forward and backward: final norm, final hidden states, logits (a tile of them, or all)."""
    g, shape = "loss", problem.shape
    terms = [Term("final norm input", g, w.hidden), Term("final hidden states", g, w.hidden),
             Term("hidden-state gradient", g, w.hidden)]
    if not choice.tiled_norms:
        terms[0] = Term("final RMSNorm: fp32 input copy and normed output", g, shape.hidden * (4 + problem.dtype_bytes))
    if not choice.tiled_loss:
        logits = w.vocab * (3 * 4 + problem.dtype_bytes)
        return terms + [Term("logits: fp32, log-softmax and their gradients", g, logits)]
    tile = max(1, choice.tile_memory_mib * _MIB // (w.vocab * 8))  # memory/tiled_loss.loss_tile_tokens
    terms.append(Term("logits tile (fp32) and its gradient", g, fixed=min(tile, problem.tokens) * w.vocab * 8))
    if problem.workload.training != "lora":
        terms += [Term("lm_head gradient accumulator (fp32)", g, fixed=shape.vocab * shape.hidden * 4),
                  Term("lm_head gradient chunk product (fp32)", g, fixed=_VOCAB_CHUNK * shape.hidden * 4)]
    return terms


def global_terms(problem: Problem, w: Widths) -> list[Term]:
    return [Term("rotary cos and sin", "buffers", 2 * w.head_dim_bytes),
            Term("token ids, positions, labels", "buffers", 3 * 8.0)]


@dataclass
class Placement:
    """Per layer: what it keeps on the GPU from its forward to its backward, and what it holds on the host."""

    kept: list[list[Term]] = field(default_factory=list)
    host: list[list[Term]] = field(default_factory=list)
    offloaded: list[bool] = field(default_factory=list)
    """Its checkpoint is on the host."""
    host_pair: list[bool] = field(default_factory=list)
    """Its kept attention output is on the host."""


def _on_host(per_token: float, problem: Problem) -> bool:
    """The offloader moves only tensors of at least offload_min_bytes."""
    return per_token * problem.tokens >= problem.offload_min_bytes


def placement_terms(problem: Problem, choice: Choice, w: Widths) -> Placement:
    """Each layer's GPU-kept and host-held terms under the choice's placement."""
    result = Placement()
    through, before = layer_saved(problem, choice, w)
    pair = [("kept attention output", w.q), ("kept attention log-sum-exp", w.lse)]
    built: dict[tuple[str, str], tuple[list[Term], list[Term], bool]] = {}
    for row in choice.placement(problem.shape.layers):
        if row not in built:
            checkpoint, attention = row
            kept, host = [], []
            offloaded = checkpoint == "host" and _on_host(w.hidden, problem)
            if not choice.checkpointing:
                kept = [Term(t.name, "activations kept (no checkpointing)", t.per_token) for t in through + before]
            elif offloaded:
                host.append(Term("checkpoint", "offloaded checkpoints", w.hidden))
            elif checkpoint != "none":
                kept.append(Term("checkpoint", "checkpoints on the GPU", w.hidden))
            for name, width in pair if attention in ("gpu", "host") else []:
                if attention == "host" and _on_host(width, problem):
                    host.append(Term(name, "kept attention outputs on the host", width))
                else:
                    kept.append(Term(name, "kept attention outputs on the GPU", width))
            built[row] = kept, host, offloaded
        kept, host, offloaded = built[row]
        result.kept.append(kept)
        result.host.append(host)
        result.offloaded.append(offloaded)
        result.host_pair.append(row[1] == "host")
    return result


def prefetched(layout: Placement, i: int, cache: bool, w: Widths) -> list[Term]:
    """Copies already brought back when layer i's backward runs (Note [Checkpoint offload]): the checkpoint of the
    nearest offloaded layer below (its copy starts when any later layer unpacks), and layer i−1's kept attention
    output (its copy starts when layer i's recompute begins)."""
    g, terms = "prefetched for the next layer", []
    if True in layout.offloaded[:i]:
        terms.append(Term("next checkpoint", g, w.hidden))
    if cache and i > 0 and layout.host_pair[i - 1]:
        terms += [Term(t.name.replace("kept", "next kept"), g, t.per_token) for t in layout.host[i - 1]
                  if "attention" in t.name]
    return terms


def segment_inputs(choice: Choice, w: Widths) -> list[Term]:
    k = choice.layers_per_checkpoint
    return [Term("inputs of the segment's other layers", "layer saved tensors", (k - 1) * w.hidden)] if k > 1 else []
