"""Mixture-of-experts blocks in the memory and time model: what a block keeps, its backward's buffers, and its FLOPs.

Note [Expert blocks in the plan]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
A block routes each token to k of E experts (transformers' grouped-GEMM experts: the token's hidden state copied
once per expert it goes to, sorted by expert) and sums their outputs weighted by the router. With s rows, H hidden,
I one expert's width, e bytes per element, per row the block's forward keeps for its backward (seen with
plan/live_bytes.py on the tiny Qwen3-MoE, Mixtral and GPT-OSS of tests/models.py):

    the k copies of its input, sorted (k·H·e); the experts' outputs before the weighting (k·H·e)
    gate and up projections (2k·I·e), act(gate) and the product (2k·I·e; GPT-OSS's clamped GLU keeps five I-wide
    tensors there: ExpertShape.gate_tensors)
    the router's softmax in fp32 (4E), the routing weights (2k·e) and k int64 indices four times (32k)

Its backward is largest at one of two moments: at the down projection's backward the gradients of the weighted
outputs (3k·H·e: the summed gradient expanded, and the un-permuting index's zeros and result), or at the gate and up
projections' backward, when the experts' outputs are freed and the gradients of the product and of act and up
exist (2k·I·e); the router's softmax gradient (4E) beside either. So k·(5H + 4I) or k·(H + 6I), plus the rest:
for Qwen3-30B-A3B's (H 2048, I 768, k 8) the first, for Mixtral's (I = 3.5H) the second.

Tiled (Note [Tiled experts]: the families longseq wraps), a layer keeps only the block's input (H·e); in backward a
tile of t positions recomputes the block with those buffers for t rows. The first tile peaks before any weight
gradient exists, with its output beside it (H·e per row); a later one beside the fp32 sums of every expert's weight
gradients and its own (E·3HI·(4 + e), the router's too; at the second moment one more down-projection-sized copy)
and its output and input gradient (2H·e per row); after the last tile, the sums, the last tile's gradients and the
sums rounded to bf16 (E·3HI·(4 + 2e)), more than any tile's moment where the experts' weights dwarf a tile
(Mixtral-8x7B's layers: 11.3 GB against 9.9). The tile is the MLP's rule with k·I as the width: three (t × k·I)
tensors fit tile_memory_mib. A block of a family longseq does not wrap (Qwen3-Next, Qwen3.5-MoE) runs untiled
whatever tiled_mlp says, and so does any block whose sequence fits one tile. Its shared expert (every token, behind
a sigmoid gate) keeps what a dense MLP of its width keeps, and its output (H·e); its backward, two of its widths,
comes at another moment than the routed experts'.

Time: Note [Expert block time].

Note [Expert block time]
~~~~~~~~~~~~~~~~~~~~~~~~
One forward of a block over s tokens (r = k·s routed rows) does two kinds of work:

    GEMMs   the routed experts' 2·r·3·H·I FLOPs and the router's 2·s·H·E, at the card's expert_gemm_tflops
            (transformers' grouped_mm: one grouped GEMM per projection over every expert's rows); a shared expert
            (2·s·3·H·I_shared) at gemm_tflops, a dense MLP
    rows    what each routed row reads and writes outside the GEMMs' arithmetic, at expert_row_gelements_s:
            row_elements() counts the elements per row of transformers 5.17's grouped_mm_experts_forward (the GPU
            machines' version; 5.24 skips the three sentinel masks outside expert parallelism):
                H wide: the rows gathered by expert (2), masked in place (2), the up projection's input (1), the
                        down projection's output (1) and its mask (2), the routing weight (2), the rows put back in
                        token order (2), the sum over the k rows (1): 13
                I wide: the up projection's 2I outputs (2) and their mask (4), the activation (activation_elements:
                        act(gate)·up 5, GPT-OSS's clamped GLU 16), the down projection's input (1): 7 + activation
                biases (GPT-OSS): gathered per row and added, 2I (4 + 6) and H (2 + 3): 10·I + 5·H

Backward: twice the forward's GEMM FLOPs (once for frozen weights: no weight gradients) and twice its rows. A
tiled block (Note [Tiled experts]) runs its forward again per tile in backward, and again in a checkpointed layer's
recompute (the dense MLP's tiled_mlp_ns holds that pass for a dense MLP; an expert block counts it here), and sums
its weight gradients over tiles in fp32 (ParameterGradients): per tile and weight the tile's gradient read (e bytes)
and the sum read and written (8) for every tile but the first, whose gradient is copied to fp32 (4 + e; none for
fp32 weights), and the sums rounded once at the end (4 + e), at memory_gib_s.

Why rows apart from GEMMs (device call 28, bench/results/bench_moe.jsonl; bench/fit_moe_time.py): with the passes
and sums above and one speed for all of a block's work, the records imply ~120 TFLOP/s for Qwen3-MoE's experts
(H 2048, I 768) and ~320 for Mixtral's (H 4096, I 14336) at both 64K and 128K. The tile sets the rows per expert
(256 MiB / (6·E·I): 455 and 390), so it is not the rows per expert that differs but the expert's width: per routed
row the GEMMs grow with H·I, the rows' work with H + I, and a small expert spends most of its time on its rows.
"""

from __future__ import annotations

from longseq.plan.terms import Term

_MIB = 2**20
_INDEX = 8  # int64 routing indices


def tile_positions(problem, choice) -> int:
    """models/moe.py's tile: the MLP's rule (memory/tiled.mlp_tile_tokens) with top_k × the expert's width."""
    experts = problem.shape.experts
    width = experts.top_k * experts.intermediate
    return max(1, choice.tile_memory_mib * _MIB // (problem.workload.batch * width * 3 * problem.dtype_bytes))


def runs_tiled(problem, choice) -> bool:
    """Whether expert blocks run over tiles: a family longseq tiles, tiled_mlp on, and more than one tile."""
    experts = problem.shape.experts
    positions = problem.tokens // problem.workload.batch
    return choice.tiled_mlp and experts.tiled and positions > tile_positions(problem, choice)


def _per_row(problem) -> tuple[float, float, float]:
    """(what the routed experts keep per row, their backward's extra at its largest moment, the router's gradient)."""
    experts, e = problem.shape.experts, problem.dtype_bytes
    k, h, i = experts.top_k, problem.shape.hidden, experts.intermediate
    kept = k * (2 * h + (2 + experts.gate_tensors) * i) * e + 4 * experts.experts + 2 * k * e + 4 * k * _INDEX
    # at the down projection's backward: 3k·H of gradients; at gate/up's: the outputs (k·H) freed, 2k·I made
    extra = max(3 * k * h, 2 * k * i - k * h) * e
    return kept, extra, 4.0 * experts.experts


def saved(problem, group: str) -> list[Term]:
    """What an untiled expert block keeps per token from its forward to its backward."""
    experts, e, h = problem.shape.experts, problem.dtype_bytes, problem.shape.hidden
    kept, _, _ = _per_row(problem)
    terms = [Term("expert block: routed copies, expert intermediates, router softmax, indices", group, kept)]
    if experts.shared_intermediate:
        terms.append(Term("shared expert: intermediates (gate, up, act, product) and output", group,
                          (4 * experts.shared_intermediate + h) * e))
    return terms


def backward(problem, choice, tiled: bool) -> list[Term]:
    """The block's backward at its largest, on top of the layer's saved tensors (Note [Expert blocks in the plan])."""
    g, experts, e, h = "MLP backward", problem.shape.experts, problem.dtype_bytes, problem.shape.hidden
    kept, extra, router = _per_row(problem)
    if not tiled:
        shared = 2 * experts.shared_intermediate * e
        return [Term("expert block backward: gradients at its largest moment", g, max(extra, shared) + router)]
    return [Term("MLP input gradient", g, h * e), _largest_tile(problem, choice, kept + extra + router)]


def _largest_tile(problem, choice, per_row: float) -> Term:
    """The largest of the backward's moments over tiles (Note [Expert blocks in the plan]): its first tile (before
    any weight gradient exists, the tile's output beside it), its second (the fp32 sums of every expert's weight
    gradients and one tile's gradients beside it, and the tile's output and input gradient), and after its last."""
    experts, e, h, batch = problem.shape.experts, problem.dtype_bytes, problem.shape.hidden, problem.workload.batch
    tile = tile_positions(problem, choice)
    second = min(tile, problem.tokens // batch - tile) * batch
    sums = copy = rounded = 0.0
    if problem.workload.training != "lora":
        sums = experts.params(h) * (4 + e)  # the fp32 sums and one tile's gradients
        if 2 * experts.intermediate > 4 * h:  # the gate/up moment holds one more down-projection-sized copy
            copy = experts.experts * h * experts.intermediate * e
        rounded = experts.params(h) * e if e < 4 else 0.0  # the sums rounded to the weights' dtype (fp32: no copy)
    moments = {"expert tile: the first in backward (its recompute, output and gradients)": tile * batch * (
                   per_row + h * e),
               "expert tile: a later one, with the weight gradients' fp32 sums and one tile's": second * (
                   per_row + 2 * h * e) + sums + copy,
               "expert weight gradients after the last tile (fp32 sums, the last tile's, rounded)": sums + rounded}
    name = max(moments, key=moments.get)
    return Term(name, "MLP backward", fixed=moments[name])


def forward_flops(problem) -> float:
    """FLOPs of one block's forward on the rank's tokens: the active experts, the router, the shared expert."""
    experts, h = problem.shape.experts, problem.shape.hidden
    per_token = 3 * h * (experts.top_k * experts.intermediate + experts.shared_intermediate) + h * experts.experts
    return 2.0 * problem.tokens * per_token


def row_elements(experts, hidden: int) -> int:
    """Elements one routed row reads and writes outside the GEMMs' arithmetic in one forward (Note [Expert block
    time])."""
    i, bias = experts.intermediate, int(experts.bias)
    return (13 + 5 * bias) * hidden + (7 + experts.activation_elements + 10 * bias) * i


def block_work(experts, hidden: int, tokens: int) -> tuple[float, float, float]:
    """(grouped GEMM FLOPs, shared expert FLOPs, routed rows' elements) of one block's forward over `tokens` tokens
    (Note [Expert block time])."""
    grouped = 2.0 * tokens * hidden * (3 * experts.top_k * experts.intermediate + experts.experts)
    shared = 2.0 * tokens * 3 * hidden * experts.shared_intermediate
    return grouped, shared, float(tokens * experts.top_k * row_elements(experts, hidden))


def block_seconds(problem, card) -> tuple[float, float]:
    """(forward, backward) seconds of one block on the rank's tokens (Note [Expert block time])."""
    grouped, shared, rows = block_work(problem.shape.experts, problem.shape.hidden, problem.tokens)
    gemms = grouped / (card.expert_gemm_tflops * 1e12) + shared / (card.gemm_tflops * 1e12)
    rows = rows / (card.expert_row_gelements_s * 1e9)
    weights = 2.0 if problem.workload.training != "lora" else 1.0
    return gemms + rows, weights * gemms + 2 * rows


def tile_sums_seconds(problem, choice, card) -> float:
    """A tiled block's fp32 sums of its weight gradients over tiles, at memory bandwidth (Note [Expert block
    time]); none for frozen weights."""
    if problem.workload.training == "lora":
        return 0.0
    e, tiles = problem.dtype_bytes, -(-problem.tokens // (tile_positions(problem, choice) * problem.workload.batch))
    copies = 2 * (4 + e) if e < 4 else 0  # the first tile's copy to fp32 and the final rounding
    per_weight = (tiles - 1) * (e + 8) + copies
    return problem.shape.experts.params(problem.shape.hidden) * per_weight / (card.memory_gib_s * 2**30)
