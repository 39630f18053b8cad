"""Weights, gradients and optimizer state: the fixed bytes of a step, on the GPU and on the host.

- forward-backward (the benchmarks): bf16 weights and bf16 gradients of every parameter on the GPU.
- full (`longseq train`): FSDP2 over all sp × dp ranks with fp32 master weights, fp32 gradients and AdamW's two
  fp32 moments on each rank's shard (16 bytes per parameter, on the host with FSDP2 CPU offload; on the GPU the
  gradients exist only from the backward of their layer on: the trainer's zero_grad(set_to_none=True) frees them
  after each optimizer step, and FSDP2 makes a layer's shard when its reduce-scatter runs), plus the bf16
  copies FSDP2 all-gathers: the root's (embedding, lm_head, final norm; not resharded between forward and
  backward), the current and the prefetched decoder layer, and one layer's gradient in bf16 and in fp32 for the
  reduce-scatter; the root's gradient stays unsharded until the end of backward.
- lora: frozen bf16 weights (sharded by FSDP2 over several ranks, as above without gradients) and rank-r adapters
  on every projection with fp32 weights, gradients and AdamW moments.
"""

from __future__ import annotations

from longseq.plan.choice import Choice
from longseq.plan.terms import Term
from longseq.plan.problem import Problem

FP32_STATE = 16  # bytes per parameter: fp32 master weight, fp32 gradient, AdamW's two fp32 moments


def lora_params(problem: Problem) -> int:
    """Adapter parameters: rank × (in + out) per projection (q, k, v, o, gate, up, down) and layer. Expert blocks
    (their weights are stacked, not linear layers) get adapters on their shared expert only; a Gated DeltaNet
    layer on its input and output projections."""
    s, r = problem.shape, problem.workload.lora_rank
    h, a, kv = s.hidden, s.attention_width, s.kv_width
    total = 0
    for kind in s.kinds:
        if kind.mixer == "linear":  # in-projections (q, k, v, z; b, a) and the out-projection
            linear = s.linear
            total += 2 * h + linear.conv_width + linear.value_width + 2 * linear.v_heads + linear.value_width + h
        else:
            total += (h + a * (2 if s.attention_gate else 1)) + (h + a) + (h + kv) * 2
        inner = s.intermediate if kind.ffn == "dense" else s.experts.shared_intermediate
        total += (h + inner) * 3 if inner else 0
    return r * total


def training_state(problem: Problem, choice: Choice, made: str = "all") -> tuple[list[Term], list[Term]]:
    """(GPU terms, host terms) of one rank's weights, gradients and optimizer state. `made`: which of FSDP2's
    unsharded gradients can exist ('full'): 'none' at the loss (no backward has reached a parameter yet; the tiled
    loss's lm_head gradient is its own term there), 'root' at the final norm's backward (lm_head's is made), 'all'
    in a decoder layer's backward and after it."""
    s, e, ranks = problem.shape, problem.dtype_bytes, problem.layout.gpus
    g = "weights, gradients, optimizer"
    mode = problem.workload.training
    if mode == "forward-backward":
        return [Term("weights (bf16)", g, fixed=s.params * e), Term("gradients (bf16)", g, fixed=s.params * e)], []
    gathered = [Term("unsharded layer weights (bf16, current and prefetched)", g, fixed=2 * s.layer_params * e),
                Term("unsharded root weights (bf16)", g, fixed=s.root_params * e)]
    if mode == "lora":
        adapters = [Term("LoRA adapters with gradients and AdamW (fp32)", g, fixed=lora_params(problem) * FP32_STATE)]
        if ranks == 1:
            return [Term("weights (bf16, frozen)", g, fixed=s.params * e)] + adapters, []
        return [Term("weight shard (bf16, frozen)", g, fixed=s.params * e / ranks)] + gathered + adapters, []
    shard = Term("FSDP2 shard: fp32 weights and AdamW moments", g, fixed=s.params * (FP32_STATE - 4) / ranks)
    if made == "all":
        gathered.append(Term("unsharded layer gradient (bf16, and fp32 for the reduce-scatter)", g,
                             fixed=s.layer_params * (e + 4)))
    if made in ("all", "root"):
        gathered.append(Term("unsharded lm_head/embedding gradient (bf16)", g, fixed=s.vocab * s.hidden * e))
    if choice.fsdp_cpu_offload:
        host = Term("FSDP2 CPU-offloaded weights, gradients, AdamW moments (fp32)", "FSDP2 CPU offload",
                    fixed=shard.fixed)
        return gathered, [host]
    return [shard] + gathered, []


def gradients_made(problem: Problem, choice: Choice, layers_done: int | None) -> list[Term]:
    """The fp32 gradient shards on the GPU ('full' without FSDP2 CPU offload) once the backward of `layers_done`
    decoder layers has run; None: all of them, the root's too (at the end of the backward and the optimizer step)."""
    if problem.workload.training != "full" or choice.fsdp_cpu_offload:
        return []
    s = problem.shape
    params = s.params if layers_done is None else s.params_of_layers(s.layers - layers_done, s.layers)
    return [Term("FSDP2 shard: fp32 gradients made so far", "weights, gradients, optimizer",
                 fixed=params * 4 / problem.layout.gpus)] if params else []
