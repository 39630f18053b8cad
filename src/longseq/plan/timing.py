"""Step time of one rank from FLOPs at the card's calibrated speeds, plus the traffic that compute does not hide.

Note [Step time]
~~~~~~~~~~~~~~~~
Per layer, with s tokens on the rank, P the layer's projection and MLP weights, a = heads × head_dim and causal
attention within documents of length d over sequences of length S:

    attention forward   2·B·S·d·a / sp FLOPs at attention_forward_tflops (4·a per (query, key) pair: a sliding
                        window bounds the pairs); backward 2.5× that at the backward speed; a checkpointed layer
                        whose output is not kept runs the forward again in backward
    bands               a sliding layer run as bands (sinks, sp = 1 or Ulysses) does the matmuls of its chunks as
                        window.py runs them, in fp32 (band_flops: 2 matmuls forward, 5 backward), at band_tflops
    Gated DeltaNet      the chunked rule's forward FLOPs (Note [Linear attention in the plan]), three times that for
                        forward and backward, at delta_rule_tflops; its forward again under checkpointing
    projections, MLP    2·s·P forward, twice that backward (once for frozen weights: no weight gradients), and the
                        forward again under checkpointing (the tiled MLP recomputes its tiles in backward even
                        without checkpointing), at gemm_tflops; an expert block by Note [Expert block time]:
                        its grouped GEMMs, its routed rows' work, and tiled, its recompute and fp32 sums
    tiled features      tiled_mlp_ns, tiled_norms_ns per token and layer (their recomputes and fp32 sums); norms
                        fused into their readers: the q/k/v projections' forward once more, and fused_norms_ns
    segments            with layers_per_checkpoint k, k − 1 of a segment's k layers run forward once more in
                        backward to rebuild their inputs (attention only where its output was not kept)
    Ulysses             each all-to-all (q, k, v out; the output back) moves (U−1)/U of its bytes, synchronously,
                        in forward, backward and again in the recompute
    ring                R−1 K/V exchanges per attention pass, R dk/dv exchanges in backward; each overlaps the
                        blocks of its ring step, so only the part longer than a step's compute shows
    offload             a layer's checkpoint and kept output go to the host on a side stream during its forward and
                        come back during the backward of the layer above (after its attention backward with
                        prefetch_after_attention): only what outlasts that compute shows
    FSDP2               all-gathers (forward, backward) and reduce-scatters per layer, and with CPU offload the
                        shard's host↔device copies, overlap the layer's compute the same way

and once per step the loss (3 GEMMs of s × H × V; 2 for a frozen lm_head; tiled: tiled_loss_ns per token, and per
tile a pass of tiled_loss_tile_bytes_per_weight over the V × H weight gradient's fp32 accumulator, so that a tile
count, not only the token count, sets its cost: 252 tiles of 256 MiB cost 0.6 s at 64K on an H200, 16 of 4 GiB
0.04 s) and the optimizer (fused AdamW: 28 bytes of traffic per parameter of the shard on the GPU, or
host_adamw_gparams_s for a host's ranks).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from longseq.parallel.sizes import band_rows
from longseq.plan import experts, linear
from longseq.plan.attention import keeps_output, windowed
from longseq.plan.choice import Choice
from longseq.plan.families import DENSE, LayerKind
from longseq.plan.loss import loss_tile_tokens
from longseq.plan.memory import effective, ffn_tiled
from longseq.plan.problem import Problem

_G = 2**30


@dataclass
class StepTime:
    """Seconds per step of one rank, by component."""

    components: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        if seconds > 0:
            self.components[name] = self.components.get(name, 0.0) + seconds

    @property
    def seconds(self) -> float:
        return sum(self.components.values())


def _exposed(traffic: float, compute: float) -> float:
    return max(0.0, traffic - compute)


def attention_pairs(document: int, window: int | None) -> float:
    """(query, key) pairs of causal attention over one document, within a sliding window if given."""
    if window is None or window >= document:
        return document * document / 2
    return document * window - window * window / 2


def layer_flops(problem: Problem, kind: LayerKind = DENSE) -> tuple[float, float, float]:
    """(attention forward FLOPs, token-mixer projection FLOPs, MLP FLOPs) of one layer's forward on one rank: 4·a
    FLOPs per (query, key) pair (2·S²·a for a causal sequence), a sliding window bounding the pairs; the active
    experts only (experts.py); none for a Gated DeltaNet layer's attention (its rule: linear_flops)."""
    shape, work, layout, h = problem.shape, problem.workload, problem.layout, problem.shape.hidden
    if kind.mixer == "linear":
        attention, projections = 0.0, linear.projection_flops(problem)
    else:
        window = shape.sliding_window if kind.mixer == "sliding" else None
        documents = work.batch * work.length / work.document
        attention = 4.0 * documents * attention_pairs(work.document, window) * shape.attention_width / layout.sp
        q = shape.attention_width * (2 if shape.attention_gate else 1)
        projections = 2.0 * problem.tokens * (h * q + h * shape.attention_width + 2 * h * shape.kv_width)
    mlp = experts.forward_flops(problem) if kind.ffn == "experts" else 2.0 * problem.tokens * 3 * h * shape.intermediate
    return attention, projections, mlp


def step_time(problem: Problem, choice: Choice) -> StepTime:
    choice = effective(problem, choice)
    shape, step = problem.shape, StepTime()
    for ((checkpoint, kept), kind), count in Counter(zip(choice.placement(shape.layers), shape.kinds)).items():
        layer = _layer_time(problem, choice, kind, checkpoint, kept)
        for name, seconds in layer.components.items():
            step.add(name, seconds * count)
    _loss_and_optimizer(problem, choice, step)
    return step


def band_pairs(length: int, rows: int, window: int) -> int:
    """(query, key) pairs a band over one causal sequence computes (Note [Sliding windows on blocks]): every chunk of
    `rows` query rows against the keys the chunk reaches, rows + window − 1 once the chunks start past the window."""
    pairs, start = 0, 0
    while start < min(length, window - 1):  # chunks that reach back to the sequence's first key
        end = min(length, start + rows)
        pairs += (end - start) * end
        start = end
    full, last = divmod(length - start, rows)
    return pairs + full * rows * (rows + window - 1) + last * (last + window - 1)


def band_flops(problem: Problem, rows: int | None = None) -> tuple[float, float]:
    """(forward, backward) FLOPs of a sliding layer's bands on one rank as window.py runs them: QKᵀ and PV forward,
    and the scores again, dV, dP, dQ and dK backward, over every chunk's pairs (band_pairs); `rows` per chunk by
    sizes.band_rows unless given."""
    shape, work = problem.shape, problem.workload
    heads, window = shape.heads // problem.layout.ulysses, shape.sliding_window
    rows = rows or band_rows(work.batch, heads, work.document, work.document, window)
    pairs = work.batch * work.length // work.document * band_pairs(work.document, rows, window)
    per_matmul = 2.0 * pairs * heads * shape.head_dim
    return 2 * per_matmul, 5 * per_matmul


def _mixer_seconds(problem: Problem, kind: LayerKind, attention: float) -> tuple[str, float, float]:
    """(component, forward, backward) seconds of one layer's token mixer given its attention FLOPs."""
    card = problem.machine.card
    if kind.mixer == "linear":  # forward and backward: three times the forward's FLOPs (Note [Linear attention...])
        forward = linear.core_flops(problem) / (card.delta_rule_tflops * 1e12)
        return "linear attention", forward, 2 * forward
    if windowed(problem, kind) == "band" and problem.layout.ring == 1:
        forward, backward = band_flops(problem)
        return "attention: sliding-window bands (fp32)", *(f / (card.band_tflops * 1e12) for f in (forward, backward))
    forward_speed, backward_speed = (x * 1e12 for x in card.attention_tflops(problem.shape.head_dim))
    return "attention", attention / forward_speed, 2.5 * attention / backward_speed


def _ffn_seconds(problem: Problem, kind: LayerKind, mlp: float) -> tuple[float, float]:
    """(forward, backward) seconds of one layer's MLP or expert block (Note [Expert block time])."""
    if kind.ffn == "experts":
        return experts.block_seconds(problem, problem.machine.card)
    gemm = problem.machine.card.gemm_tflops * 1e12
    return mlp / gemm, (2.0 if problem.workload.training != "lora" else 1.0) * mlp / gemm


def _layer_time(problem: Problem, choice: Choice, kind: LayerKind, checkpoint: str, kept: str) -> StepTime:
    """One layer's time under its placement (checkpoint, attention output kept)."""
    card, tokens = problem.machine.card, problem.tokens
    attention, projections, mlp = layer_flops(problem, kind)
    gemm, backward = card.gemm_tflops * 1e12, 2.0 if problem.workload.training != "lora" else 1.0
    mixer, mixer_forward, mixer_backward = _mixer_seconds(problem, kind, attention)
    ffn_forward, ffn_backward = _ffn_seconds(problem, kind, mlp)
    if not keeps_output(problem, kind):
        kept = "recompute"
    tiled = ffn_tiled(problem, choice, kind)
    layer = StepTime()
    layer.add(mixer, mixer_forward + mixer_backward)
    if kind.ffn == "experts":
        layer.add("projections", (1 + backward) * projections / gemm)
        layer.add("expert blocks (grouped GEMMs and routed rows)", ffn_forward + ffn_backward)
    else:
        layer.add("projections and MLP", (1 + backward) * projections / gemm + ffn_forward + ffn_backward)
    if choice.checkpointing:  # every layer is checkpointed on its own, whatever keeps its input
        layer.add("attention recomputed", mixer_forward * (kept == "recompute"))
        layer.add("forward recomputed", projections / gemm + (0 if tiled else ffn_forward))
    k = choice.layers_per_checkpoint
    if choice.checkpointing and k > 1:  # k − 1 of a segment's k layers run forward once more to rebuild inputs
        again = projections / gemm + ffn_forward + mixer_forward * (kept == "recompute")
        layer.add("segment inputs rebuilt", again * (k - 1) / k)
    if tiled:
        layer.add("MLP recomputed in its tiles", ffn_forward)
        _tiled_overheads(problem, choice, kind, ffn_forward, layer)
    if choice.tiled_norms:
        layer.add("tiled norms overhead", card.tiled_norms_ns * 1e-9 * tokens)
    if choice.fuse_norms and kind.mixer != "linear":  # the q/k/v projections again in their tiles, with their norm
        layer.add("fused norms: projections recomputed", projections / gemm)
        layer.add("fused norms overhead", card.fused_norms_ns * 1e-9 * tokens)
    layer_forward = mixer_forward + projections / gemm + ffn_forward
    layer_backward = mixer_backward + backward * projections / gemm + ffn_backward
    _communication(problem, choice, kind, layer, (checkpoint, kept), (layer_forward, layer_backward),
                   mixer_backward)
    return layer


def _tiled_overheads(problem, choice, kind, ffn_forward, layer) -> None:
    """A dense tiled MLP's measured overhead per token (its recompute in a checkpointed layer and its fp32 sums);
    an expert block's counted: its forward again in the layer's recompute and the sums (Note [Expert block time])."""
    card = problem.machine.card
    if kind.ffn != "experts":
        layer.add("tiled MLP overhead", card.tiled_mlp_ns * 1e-9 * problem.tokens)
        return
    layer.add("expert blocks: forward again in the layer's recompute", ffn_forward * choice.checkpointing)
    layer.add("expert weight gradients summed over tiles (fp32)", experts.tile_sums_seconds(problem, choice, card))


def _communication(problem, choice, kind, step, placed, compute, mixer_backward) -> None:
    """Ulysses, ring, offload and FSDP2 traffic of one layer, less what its compute (forward, backward) hides."""
    card, shape, layout, tokens, e = (problem.machine.card, problem.shape, problem.layout, problem.tokens,
                                      problem.dtype_bytes)
    (checkpoint, kept), (layer_forward, layer_backward) = placed, compute
    kv = max(shape.kv_heads, layout.ulysses) * shape.head_dim
    passes = 3 if choice.checkpointing else 2  # forward, backward, and the recompute
    if layout.ulysses > 1:
        width = 2 * shape.attention_width + 2 * kv
        if kind.mixer == "linear":  # q, k, v and the gates a, b out; the rule's output back
            width = shape.linear.conv_width + 2 * shape.linear.v_heads + shape.linear.value_width
        exchanged = tokens * width * e * (layout.ulysses - 1) / layout.ulysses
        step.add("Ulysses all-to-all", passes * exchanged / (card.all_to_all_gib_s * _G))
    if layout.ring > 1 and kind.mixer != "linear":
        steps, kv_bytes = layout.ring - 1, tokens * 2 * kv * e
        attention = layer_flops(problem, kind)[0] / layout.ring
        forward_speed, backward_speed = (x * 1e12 for x in card.attention_tflops(shape.head_dim))
        forward_step, backward_step = attention / forward_speed, 2.5 * attention / backward_speed
        link = card.p2p_gib_s * _G
        forwards = 2 if kept == "recompute" and choice.checkpointing else 1
        step.add("ring K/V exchange", forwards * steps * _exposed(kv_bytes / link, forward_step))
        step.add("ring K/V and dk/dv exchange", steps * _exposed(kv_bytes / link, backward_step)
                 + layout.ring * _exposed(2 * kv_bytes / link, backward_step))
    offloaded = tokens * shape.hidden * e * (checkpoint == "host")
    offloaded += tokens * (shape.attention_width * e + shape.heads * 4) * (kept == "host")
    # Brought back after the attention backward (prefetch_after_attention), a copy has the rest of the layer's
    # backward to hide behind; otherwise all of it.
    after = choice.prefetch_after_attention and choice.cache_attention
    window = layer_backward - (mixer_backward if after else 0.0)
    step.add("offload copies not hidden", _exposed(offloaded / (card.device_to_host_gib_s * _G), layer_forward)
             + _exposed(offloaded / (card.host_to_device_gib_s * _G), window))
    _fsdp(problem, choice, kind, step, layer_forward, layer_backward)


def _fsdp(problem, choice, kind, step, layer_forward, layer_backward) -> None:
    """FSDP2's per-layer traffic, overlapped with the layer's compute (training='full' and 'lora' over ranks)."""
    card, params, ranks = problem.machine.card, problem.shape.kind_params(kind), problem.layout.gpus
    mode = problem.workload.training
    if mode == "forward-backward" or (mode == "lora" and ranks == 1):
        return
    share = (ranks - 1) / ranks
    gather = params * problem.dtype_bytes * share / (card.all_to_all_gib_s * _G)
    reduce = params * 4 * share / (card.all_to_all_gib_s * _G) if mode == "full" else 0.0
    if mode == "full" and choice.fsdp_cpu_offload:
        shard = params * 4 / ranks
        gather += shard / (card.host_to_device_gib_s * _G)
        reduce += shard / (card.device_to_host_gib_s * _G)
    step.add("FSDP2 traffic not hidden", _exposed(gather, layer_forward) + _exposed(gather + reduce, layer_backward))


def _loss_and_optimizer(problem: Problem, choice: Choice, step: StepTime) -> None:
    card, shape, tokens = problem.machine.card, problem.shape, problem.tokens
    mode = problem.workload.training
    matmuls = 3 if mode != "lora" else 2
    step.add("loss", matmuls * 2.0 * tokens * shape.hidden * shape.vocab / (card.gemm_tflops * 1e12))
    if choice.tiled_loss:
        step.add("tiled loss overhead", card.tiled_loss_ns * 1e-9 * tokens)
        if mode != "lora":  # a trained lm_head's weight gradient accumulates once per tile
            passes = -(-tokens // loss_tile_tokens(problem, choice))
            weight_bytes = shape.vocab * shape.hidden * card.tiled_loss_tile_bytes_per_weight
            step.add("tiled loss: weight-gradient passes", passes * weight_bytes / (card.memory_gib_s * _G))
    if mode == "forward-backward":
        return
    params = shape.params / problem.layout.gpus if mode == "full" else 0.0
    if mode == "full" and choice.fsdp_cpu_offload:
        step.add("AdamW on the host", params * problem.ranks_per_host / (card.host_adamw_gparams_s * 1e9))
    elif mode == "full":
        step.add("AdamW on the GPU", params * 28 / (card.memory_gib_s * _G))
