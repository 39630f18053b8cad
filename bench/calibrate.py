"""Measure one card for the plan (kernel and link speeds, the attention kernels' memory facts) and write its card.

    python -m bench.calibrate                                  # one GPU: updates src/longseq/plan/cards/<card>.json
    python -m bench.calibrate --device cpu --out /tmp/cpu.json # CPU at tiny sizes (the 'cpu' card's speeds)

What it measures, each on the card at hand (figures it cannot measure here keep the stored value and source):
attention forward and backward TFLOP/s of longseq's block kernels (head_dim 128 and 64 on a GPU); the effective
GEMM speed of one decoder layer's forward and backward less its attention; pinned host↔device copies on a side
stream; device memory bandwidth; fused AdamW on the host; whether the lse comes out dense, and the attention
backward's workspace; whether the model's own SDPA builds per-query-head dk/dv under GQA; the chunked gated delta
rule's speed (Gated DeltaNet, forward and backward, at Qwen3-Next's head dims on a GPU); the sliding-window bands'
fp32 speed (GPT-OSS's heads and window); an expert block's grouped GEMMs and routed rows (Note [Expert block time]:
one tile of Qwen3-30B-A3B's and of Mixtral-8x7B's blocks on a GPU); and the extra time per token of the tiled MLP,
recomputed norms, norms fused into their readers and the tiled loss (a two-layer model, each feature switched on
alone). Prints a table and ends with one JSON line.

    python -m bench.calibrate --only experts band              # just those figures; the card's others stay
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.common import machine, synchronize
from longseq.plan.card import CARDS, card_to_json, load_card

# (heads, kv heads, head_dim, hidden, intermediate, tokens) for a GPU and for a CPU smoke run.
SIZES = {"cuda": dict(heads=32, kv=8, dims=(128, 64), hidden=4096, inter=14336, tokens=16384, vocab=128256,
                      loss_tiles_mib=(256, 4096), linear_heads=32, linear_dim=128, linear_tokens=131072,
                      experts=((2048, 768, 128, 8), (4096, 14336, 8, 2)), expert_tile_mib=256,
                      band=dict(heads=64, kv=8, dim=64, window=128, tokens=65536)),
         "cpu": dict(heads=4, kv=2, dims=(16,), hidden=64, inter=128, tokens=1024, vocab=256, loss_tiles_mib=(1, 4),
                     linear_heads=4, linear_dim=16, linear_tokens=1024,
                     experts=((64, 16, 16, 4), (128, 2048, 2, 1)), expert_tile_mib=2,
                     band=dict(heads=4, kv=2, dim=16, window=16, tokens=512))}
"""Expert blocks as (hidden, expert intermediate, experts, top_k): a small expert whose routed rows weigh most
(Qwen3-30B-A3B's) and a large one whose GEMMs do (Mixtral-8x7B's); bands at GPT-OSS's heads, head_dim and window."""


def _timed(fn, repeats: int = 3) -> float:
    fn()
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize()
    return (time.perf_counter() - start) / repeats


def attention_speeds(device, dtype, size) -> tuple[dict, dict]:
    """Causal block-kernel forward and backward TFLOP/s by head_dim (forward FLOPs 2·S²·heads·d, backward 2.5×)."""
    from longseq.parallel.kernels import block_backward, block_forward

    forward, backward, s = {}, {}, size["tokens"]
    for d in size["dims"]:
        q, k, v = (torch.randn(1, h, s, d, device=device, dtype=dtype) for h in (size["heads"], size["kv"], size["kv"]))
        out, lse = block_forward(q, k, v, causal=True, scale=d ** -0.5)
        flops = 2.0 * s * s * size["heads"] * d
        forward[str(d)] = flops / _timed(lambda: block_forward(q, k, v, causal=True, scale=d ** -0.5)) / 1e12
        dout = torch.randn_like(out)
        seconds = _timed(lambda: block_backward(dout, q, k, v, out, lse, causal=True, scale=d ** -0.5))
        backward[str(d)] = 2.5 * flops / seconds / 1e12
    return forward, backward


def delta_rule_speed(device, dtype, size) -> float:
    """longseq's chunked gated delta rule, forward and backward, in model TFLOP/s (three times the forward's FLOPs
    as plan/linear.py counts them), at Qwen3-Next's head dims and 128K tokens on a GPU (its scan's backward grows
    faster than its FLOPs: the speed is the one at the lengths a plan is for)."""
    from longseq.parallel.delta_rule import Segment, chunk_layout, gated_delta_rule
    from longseq.plan.families import LinearShape
    from longseq.plan.linear import core_flops

    heads, dk, s = size["linear_heads"], size["linear_dim"], size["linear_tokens"]
    q, k, v = (torch.randn(1, s, heads, dk, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    g = (-torch.rand(1, s, heads, device=device)).requires_grad_()
    beta = torch.rand(1, s, heads, device=device, dtype=dtype, requires_grad=True)
    layout = chunk_layout([[Segment(start=0, length=s)]], s, device=device)

    def step():
        gated_delta_rule(q, k, v, g, beta, layout).sum().backward()

    shape = SimpleNamespace(linear=LinearShape(k_heads=heads, v_heads=heads, k_dim=dk, v_dim=dk))
    return 3 * core_flops(SimpleNamespace(shape=shape, tokens=s)) / _timed(step) / 1e12


def expert_block(device, dtype, shape, tile_mib: int):
    """A Qwen3-MoE expert block of `shape` as transformers builds it in a model (its default experts
    implementation), and the tokens of one of longseq's tiles of it (models/moe.py)."""
    import transformers

    from longseq.memory.config import MemoryConfig
    from longseq.memory.tiled import mlp_tile_tokens

    hidden, intermediate, experts, top_k = shape
    config = transformers.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=experts,
                                         num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, head_dim=16, intermediate_size=hidden, vocab_size=32,
                                         norm_topk_prob=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    tokens = mlp_tile_tokens(MemoryConfig(tile_memory_mib=tile_mib), top_k * intermediate, 1, dtype)
    return model.model.layers[0].mlp, config, tokens


def expert_speeds(device, dtype, size) -> dict:
    """expert_gemm_tflops and expert_row_gelements_s (Note [Expert block time]) from expert_block_times."""
    return solve_expert_speeds(expert_block_times(device, dtype, size))


def expert_block_times(device, dtype, size) -> list[tuple[float, float, float]]:
    """One tile of a small-expert and of a large-expert block, forward and backward (weight gradients included):
    for each, (GEMM FLOPs, routed rows' elements, seconds), the work counted as experts.block_work counts it."""
    from longseq.plan.experts import block_work
    from longseq.plan.shapes import shape_from_config

    rows = []
    for shape in size["experts"]:
        block, config, tokens = expert_block(device, dtype, shape, size["expert_tile_mib"])
        x = torch.randn(1, tokens, shape[0], device=device, dtype=dtype, requires_grad=True)
        grad, params = torch.randn_like(x), [x, *block.parameters()]

        def step():
            out = block(x)
            torch.autograd.grad(out[0] if isinstance(out, tuple) else out, params, grad)

        grouped, _, elements = block_work(shape_from_config(config).experts, shape[0], tokens)
        rows.append((3 * grouped, 3 * elements, _timed(step, repeats=5)))
    return rows


def solve_expert_speeds(rows: list[tuple[float, float, float]]) -> dict:
    """Each block takes F/G + N/R seconds for its GEMM FLOPs F and rows' elements N; two blocks solve for G and R."""
    (f1, n1, t1), (f2, n2, t2) = rows
    determinant = f1 * n2 - f2 * n1
    per_flop, per_element = (t1 * n2 - t2 * n1) / determinant, (f1 * t2 - f2 * t1) / determinant
    if per_flop <= 0 or per_element <= 0:
        raise RuntimeError(f"expert blocks: {t1:.3g} s and {t2:.3g} s for the two shapes give a non-positive speed "
                           f"(s per FLOP {per_flop:.3g}, per element {per_element:.3g}); the GEMMs or the rows do not "
                           "take the time Note [Expert block time] says here. Check for another job on the device.")
    return {"expert_gemm_tflops": 1 / per_flop / 1e12, "expert_row_gelements_s": 1 / per_element / 1e9}


def band_speed(device, dtype, size) -> float:
    """longseq's sliding-window band (window.py) over one causal sequence, forward and backward, in TFLOP/s of
    its chunks' matmuls as they run (plan/timing.band_flops)."""
    from longseq.parallel.window import band_backward, band_forward
    from longseq.plan.timing import band_flops

    b = size["band"]
    q = torch.randn(1, b["heads"], b["tokens"], b["dim"], device=device, dtype=dtype)
    k, v = (torch.randn(1, b["kv"], b["tokens"], b["dim"], device=device, dtype=dtype) for _ in range(2))
    dout, band = torch.randn_like(q), dict(offset=0, window=b["window"], scale=b["dim"] ** -0.5)

    def step():
        band_backward(dout, q, k, v, *band_forward(q, k, v, **band), **band)

    shape = SimpleNamespace(heads=b["heads"], head_dim=b["dim"], sliding_window=b["window"])
    problem = SimpleNamespace(shape=shape, layout=SimpleNamespace(ulysses=1),
                              workload=SimpleNamespace(batch=1, length=b["tokens"], document=b["tokens"]))
    return sum(band_flops(problem)) / _timed(step) / 1e12


def attention_memory(device, dtype, size) -> dict:
    """Whether the block kernels' lse comes out dense, and (on a GPU) the backward's own bytes per query element."""
    from longseq.parallel.kernels import block_backward, block_forward

    heads, d, s = size["heads"], size["dims"][0], size["tokens"]
    q = torch.randn(1, s, heads, d, device=device, dtype=dtype).transpose(1, 2)  # the projections' layout
    k = torch.randn(1, size["kv"], s, d, device=device, dtype=dtype)
    out, lse = block_forward(q, k, k, causal=True, scale=1.0)
    facts = {"attention_lse_dense": lse.is_contiguous()}
    if device.type == "cuda":
        args = [t.contiguous() for t in (torch.randn_like(out), q, k, k, out, lse)]
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        block_backward(*args, causal=True, scale=1.0, grad_dtype=dtype)
        # K and V expanded to the query heads, and the kernel's dq, dk, dv: five q-sized tensors besides its own.
        extra = torch.cuda.max_memory_allocated() - before - 5 * q.numel() * q.element_size()
        facts["attention_workspace_bytes"] = max(0.0, extra / q.numel())
    return facts


def sdpa_gqa_expands(device, dtype, size) -> bool:
    """Whether SDPA's backward with enable_gqa holds dk/dv for every query head (more than dq + dk + dv)."""
    import torch.nn.functional as F

    if device.type != "cuda":
        return False
    heads, kv, d, s = size["heads"], size["kv"], size["dims"][0], size["tokens"]
    q = torch.randn(1, heads, s, d, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, kv, s, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    grad = torch.randn_like(out)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out.backward(grad)
    extra = torch.cuda.max_memory_allocated() - before
    # dq, dk, dv are 1.5 q's and an fp32 dq accumulator 2 more; per-query-head dk and dv add another 2.
    return extra > q.numel() * q.element_size() * 4.5


def copy_speeds(device, dtype) -> dict:
    if device.type != "cuda":
        return {}
    n = 1 << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(n, dtype=torch.uint8, device=device)
    other = torch.empty_like(gpu)
    stream = torch.cuda.Stream()

    def on_side(fn):
        with torch.cuda.stream(stream):
            fn()
        stream.synchronize()

    gib = n / 2**30
    return {"host_to_device_gib_s": gib / _timed(lambda: on_side(lambda: gpu.copy_(host, non_blocking=True))),
            "device_to_host_gib_s": gib / _timed(lambda: on_side(lambda: host.copy_(gpu, non_blocking=True))),
            "memory_gib_s": 2 * gib / _timed(lambda: other.copy_(gpu))}


def host_adamw(device) -> float:
    """Fused AdamW on the host, parameters per second / 1e9."""
    count = 1 << (26 if device.type == "cuda" else 22)
    param = torch.nn.Parameter(torch.zeros(count))
    param.grad = torch.ones(count)
    optimizer = torch.optim.AdamW([param], lr=1e-3, fused=True)
    return count / _timed(optimizer.step) / 1e9


def layer_model(size, device, dtype, layers: int):
    import transformers

    config = transformers.LlamaConfig(hidden_size=size["hidden"], intermediate_size=size["inter"],
                                      num_hidden_layers=layers, num_attention_heads=size["heads"],
                                      num_key_value_heads=size["kv"], vocab_size=size["vocab"],
                                      head_dim=size["dims"][0], max_position_embeddings=1 << 20)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").train()


def step_seconds(size, device, dtype, memory, layers: int = 2) -> float:
    """A forward + backward of a `layers`-layer model under `memory` (checkpointed layers kept on the device)."""
    import longseq

    model = layer_model(size, device, dtype, layers)
    longseq.apply(model, longseq.Mesh(), memory)
    s = size["tokens"]
    ids = torch.randint(0, size["vocab"], (1, s), device=device)
    batch = longseq.shard_batch({"input_ids": ids, "position_ids": torch.arange(s, device=device)[None]},
                                longseq.Mesh())
    return _timed(lambda: longseq.causal_lm_loss(model, batch).backward(), repeats=2)


def tiled_loss_costs(size, device, dtype, plain, base, memory_gib_s) -> dict:
    """The tiled loss at two tile sizes: its cost per token and its weight-gradient pass per tile (Note [Step time]),
    the pass as bytes per lm_head weight at memory_gib_s."""
    from longseq import MemoryConfig
    from longseq.memory.tiled_loss import loss_tile_tokens

    s, passes = size["tokens"], {}
    for tile_mib in size["loss_tiles_mib"]:
        memory = MemoryConfig(**{**plain, "tiled_loss": True, "tile_memory_mib": tile_mib})
        passes[-(-s // loss_tile_tokens(size["vocab"], tile_mib))] = step_seconds(size, device, dtype, memory) - base
    (many, slow), (few, fast) = sorted(passes.items(), reverse=True)
    per_pass = max(0.0, (slow - fast) / (many - few))
    return {"tiled_loss_ns": max(0.0, fast - few * per_pass) / s * 1e9,
            "tiled_loss_tile_bytes_per_weight": per_pass * memory_gib_s * 2**30 / (size["vocab"] * size["hidden"])}


def feature_costs(size, device, dtype, attention_forward, attention_backward, memory_gib_s) -> dict:
    """ns per token (and layer) of each tiled feature, and the effective GEMM speed of a plain step."""
    from longseq import MemoryConfig

    layers, s = 2, size["tokens"]
    plain = dict(tiled_mlp=False, tiled_norms=False, fuse_norms=False, tiled_loss=False, offload_checkpoints=True,
                 cache_attention=False, keep_last_layers_on_gpu=layers, tile_memory_mib=256)
    base = step_seconds(size, device, dtype, MemoryConfig(**plain), layers)
    h, a, kv, i = size["hidden"], size["heads"] * size["dims"][0], size["kv"] * size["dims"][0], size["inter"]
    out, seconds = {}, {}
    for name, features, per_layer in (("tiled_mlp", dict(tiled_mlp=True), True),
                                      ("tiled_norms", dict(tiled_norms=True), True),
                                      ("fused_norms", dict(tiled_norms=True, fuse_norms=True), True)):
        seconds[name] = step_seconds(size, device, dtype, MemoryConfig(**{**plain, **features}), layers)
        if name != "fused_norms":  # measured against recomputed norms, below
            out[f"{name}_ns"] = max(0.0, seconds[name] - base) / (s * layers) * 1e9
    out.update(tiled_loss_costs(size, device, dtype, plain, base, memory_gib_s))
    # Fused norms beyond recomputed ones, less their projections' second forward (timed by the GEMM speed below).
    projections = 2.0 * s * (2 * h * a + 2 * h * kv) * layers
    attention = 2.0 * s * s * a
    attention_s = layers * (2 * attention / attention_forward + 2.5 * attention / attention_backward) / 1e12
    dense = 8.0 * s * (2 * h * a + 2 * h * kv + 3 * h * i) * layers + 6.0 * s * h * size["vocab"]
    out["gemm_tflops"] = dense / max(base - attention_s, 1e-9) / 1e12
    again = projections / (out["gemm_tflops"] * 1e12)
    out["fused_norms_ns"] = max(0.0, seconds["fused_norms"] - seconds["tiled_norms"] - again) / (s * layers) * 1e9
    return out


SEPARATE = ("delta_rule", "band", "experts")
"""Measurements that need nothing else measured first: `--only` runs just these, keeping the card's other figures."""


def separate(names, device, dtype, size) -> dict:
    """The card fields of the SEPARATE measurements `names`."""
    parts = {"delta_rule": lambda: {"delta_rule_tflops": delta_rule_speed(device, dtype, size)},
             "band": lambda: {"band_tflops": band_speed(device, dtype, size)},
             "experts": lambda: expert_speeds(device, dtype, size)}
    return {field: value for name in names for field, value in parts[name]().items()}


def calibrate(device: torch.device, only: tuple[str, ...] = ()) -> dict:
    """Measured values by card field: all of them, or only the SEPARATE measurements named."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = SIZES[device.type]
    if only:
        return separate(only, device, dtype, size)
    forward, backward = attention_speeds(device, dtype, size)
    values = {"attention_forward_tflops": forward, "attention_backward_tflops": backward,
              "host_adamw_gparams_s": host_adamw(device),
              "sdpa_gqa_expands_kv_grads": sdpa_gqa_expands(device, dtype, size),
              **separate(SEPARATE, device, dtype, size)}
    values.update(attention_memory(device, dtype, size), **copy_speeds(device, dtype))
    d = str(size["dims"][0])
    memory_gib_s = values.get("memory_gib_s") or load_card("cpu").memory_gib_s  # CPU: the stored card's figure
    values.update(feature_costs(size, device, dtype, forward[d], backward[d], memory_gib_s))
    if device.type == "cuda":
        values["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return values


def write_card(values: dict, device: torch.device, out: Path | None, only: tuple[str, ...] = ()) -> Path:
    """Merge `values` into the stored card of this device (or a new one) and write it."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    stem = name.split()[-1].lower() if device.type == "cuda" else "cpu"
    path = out or CARDS / f"{stem}.json"
    stored = CARDS / f"{stem}.json"
    data = card_to_json(load_card(str(stored))) if stored.is_file() else {"name": name, "values": {}}
    info = machine()
    command = "bench/calibrate.py" + (f" --only {' '.join(only)}" if only else "")
    source = f"measured: {command}, {info['card']}, torch {info['torch']}, {info['date']}"
    for key, value in values.items():
        data["values"][key] = {"value": value, "source": source}
    data["name"] = name
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="where to write the card (default: the package's cards/)")
    parser.add_argument("--only", nargs="+", choices=SEPARATE, default=(),
                        help="measure only these (the card's other figures stay as stored)")
    args = parser.parse_args(argv)
    device, only = torch.device(args.device), tuple(args.only)
    values = calibrate(device, only)
    for key, value in sorted(values.items()):
        print(f"{key:<32}{value}")
    path = write_card(values, device, args.out, only)
    load_card(str(path))  # the card must load
    print(json.dumps({"bench": "calibrate", "card_file": str(path), "values": values, **machine()}, sort_keys=True))


if __name__ == "__main__":
    main()
