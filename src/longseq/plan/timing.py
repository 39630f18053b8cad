"""Step time of one rank from FLOPs at the card's calibrated speeds, plus the traffic that compute does not hide.

Note [Step time]
~~~~~~~~~~~~~~~~
Per layer, with s tokens on the rank, P the layer's projection and MLP weights, a = heads × head_dim and causal
attention within documents of length d over sequences of length S:

    attention forward   2·B·S·d·a / sp FLOPs at attention_forward_tflops; backward 2.5× that at the backward speed;
                        a checkpointed layer whose output is not kept runs the forward again in backward
    projections, MLP    2·s·P forward, twice that backward (once for frozen weights: no weight gradients), and the
                        forward again under checkpointing (the tiled MLP recomputes its tiles in backward even
                        without checkpointing), at gemm_tflops
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

from longseq.plan.choice import Choice
from longseq.plan.memory import effective, loss_tile_tokens
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


def layer_flops(problem: Problem) -> tuple[float, float, float]:
    """(attention forward FLOPs, attention-projection FLOPs, MLP FLOPs) of one layer's forward on one rank."""
    shape, work, layout = problem.shape, problem.workload, problem.layout
    attention = 2.0 * work.batch * work.length * work.document * shape.attention_width / layout.sp
    h = shape.hidden
    projections = 2.0 * problem.tokens * (2 * h * shape.attention_width + 2 * h * shape.kv_width)
    mlp = 2.0 * problem.tokens * 3 * h * shape.intermediate
    return attention, projections, mlp


def step_time(problem: Problem, choice: Choice) -> StepTime:
    choice = effective(problem, choice)
    card, shape, tokens = problem.machine.card, problem.shape, problem.tokens
    trains_weights = problem.workload.training != "lora"
    attention, projections, mlp = layer_flops(problem)
    gemm = card.gemm_tflops * 1e12
    backward = 2.0 if trains_weights else 1.0
    step = StepTime()
    forward_speed, backward_speed = (x * 1e12 for x in card.attention_tflops(shape.head_dim))
    layer_forward = attention / forward_speed + (projections + mlp) / gemm
    layer_backward = 2.5 * attention / backward_speed + backward * (projections + mlp) / gemm
    for (checkpoint, kept), count in Counter(choice.placement(shape.layers)).items():
        layer = StepTime()
        layer.add("attention", attention / forward_speed + 2.5 * attention / backward_speed)
        layer.add("projections and MLP", (1 + backward) * (projections + mlp) / gemm)
        if choice.checkpointing:  # every layer is checkpointed on its own, whatever keeps its input
            layer.add("attention recomputed", attention / forward_speed * (kept == "recompute"))
            layer.add("forward recomputed", projections / gemm + (0 if choice.tiled_mlp else mlp / gemm))
        k = choice.layers_per_checkpoint
        if choice.checkpointing and k > 1:  # k − 1 of a segment's k layers run forward once more to rebuild inputs
            again = (projections + mlp) / gemm + attention / forward_speed * (kept == "recompute")
            layer.add("segment inputs rebuilt", again * (k - 1) / k)
        if choice.tiled_mlp:
            layer.add("MLP recomputed in its tiles", mlp / gemm)
            layer.add("tiled MLP overhead", card.tiled_mlp_ns * 1e-9 * tokens)
        if choice.tiled_norms:
            layer.add("tiled norms overhead", card.tiled_norms_ns * 1e-9 * tokens)
        if choice.fuse_norms:  # the q/k/v projections' forward again in their tiles, their norm with them
            layer.add("fused norms: projections recomputed", projections / gemm)
            layer.add("fused norms overhead", card.fused_norms_ns * 1e-9 * tokens)
        _communication(problem, choice, layer, checkpoint, kept, layer_forward, layer_backward)
        for name, seconds in layer.components.items():
            step.add(name, seconds * count)
    _loss_and_optimizer(problem, choice, step)
    return step


def _communication(problem, choice, step, checkpoint, kept, layer_forward, layer_backward) -> None:
    card, shape, layout, tokens, e = (problem.machine.card, problem.shape, problem.layout, problem.tokens,
                                      problem.dtype_bytes)
    kv = max(shape.kv_heads, layout.ulysses) * shape.head_dim
    passes = 3 if choice.checkpointing else 2  # forward, backward, and the recompute
    if layout.ulysses > 1:
        exchanged = tokens * (2 * shape.attention_width + 2 * kv) * e * (layout.ulysses - 1) / layout.ulysses
        step.add("Ulysses all-to-all", passes * exchanged / (card.all_to_all_gib_s * _G))
    if layout.ring > 1:
        steps, kv_bytes = layout.ring - 1, tokens * 2 * kv * e
        attention = layer_flops(problem)[0] / layout.ring
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
    window = layer_backward - (2.5 * layer_flops(problem)[0] / (card.attention_tflops(shape.head_dim)[1] * 1e12)
                               if after else 0.0)
    step.add("offload copies not hidden", _exposed(offloaded / (card.device_to_host_gib_s * _G), layer_forward)
             + _exposed(offloaded / (card.host_to_device_gib_s * _G), window))
    _fsdp(problem, choice, step, layer_forward, layer_backward)


def _fsdp(problem, choice, step, layer_forward, layer_backward) -> None:
    """FSDP2's per-layer traffic, overlapped with the layer's compute (training='full' and 'lora' over ranks)."""
    card, params, ranks = problem.machine.card, problem.shape.layer_params, problem.layout.gpus
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
