"""The ideal step of a peers run: the step's FLOPs at this card's own attention and GEMM speeds, measured in the same
device call (the driver of bench.run_peers runs this first, on one of its GPUs, before any contender).

    python -m bench.peers_ideal --shape llama-8b --layers 8 --sp 1 --lengths 16384 131072 --out /tmp/ideal.json
    python -m bench.peers_ideal --shape tiny --lengths 256 --device cpu --out /tmp/ideal.json      # CPU smoke run

Note [Ideal step]
The ideal is what the card's kernels need for the model's FLOPs of one forward + backward, nothing else: no
recompute, no copies, no communication, no optimizer step, no elementwise work (norms, RoPE, SiLU: they count no
FLOPs here). Two parts, each timed at the run's shapes:
- attention: causal SDPA forward + backward (the backend PyTorch picks; cuDNN on an H200 with torch 2.11) on the
  work one GPU does: all `length` tokens over heads / sp heads (what Ulysses gives a rank; a ring does the same
  work), at most ATTENTION_TOKENS tokens (the kernel's speed is flat beyond; the time is scaled by length²);
- dense: every GEMM of the step (q, k, v, o, gate, up, down per layer, lm_head once) forward and both backward
  products, at GEMM_ROWS rows or the tokens per GPU if fewer, scaled to the tokens per GPU.
ideal_step_s = layers × attention time per layer + dense time; pct_of_ideal = 100 × ideal_step_s / step_s. The
TFLOP/s in the record count attention forward + backward as 3.5 × the forward (flash-attention's count; the model
TFLOP/s of bench.common.model_flops count 3 ×): the convention cancels out of the ideal time.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.common import SHAPES, build_config, timed

ATTENTION_TOKENS = 131072
"""Longest attention calibrated (fwd + bwd of 32 heads at 128K: ~0.9 s on an H200); longer runs scale its time."""
GEMM_ROWS = 16384
"""Rows of each calibrated GEMM (a GEMM this tall runs at full speed); the time scales to the tokens per GPU."""
REPEATS = 3


def attention_fwd_bwd_flops(tokens: int, heads: float, head_dim: int) -> float:
    """Causal attention, forward + backward counted as 3.5 × the forward's 2 · 2 · tokens² · head_dim · heads / 2."""
    return 3.5 * 2 * tokens**2 * head_dim * heads


def time_attention(tokens: int, heads: int, head_dim: int, device: torch.device) -> float:
    """Median seconds of one causal SDPA forward + backward, bf16, (1, heads, tokens, head_dim) q, k and v."""
    q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)

    def step():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    step()
    return timed(step, REPEATS).median


def time_gemm(rows: int, out_features: int, in_features: int, device: torch.device) -> float:
    """Median seconds of a linear layer's three GEMMs, bf16: y = x·Wᵀ, dx = dy·W, dW = dyᵀ·x."""
    x = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
    w = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16)
    dy = torch.randn(rows, out_features, device=device, dtype=torch.bfloat16)

    def step():
        return x @ w.t(), dy @ w, dy.t() @ x

    step()
    return timed(step, REPEATS).median


def linear_shapes(config) -> dict[tuple[int, int], int]:
    """(out_features, in_features) -> how many GEMMs of that shape one step's forward runs."""
    h, i = config.hidden_size, config.intermediate_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    layers = config.num_hidden_layers
    counts: dict[tuple[int, int], int] = {}
    for shape, n in (((q, h), layers), ((kv, h), 2 * layers), ((h, q), layers), ((i, h), 2 * layers),
                     ((h, i), layers), ((config.vocab_size, h), 1)):
        counts[shape] = counts.get(shape, 0) + n
    return counts


def calibrate(config, length: int, sp: int, device: torch.device) -> dict:
    """The card's attention and GEMM speeds at this run's shapes, and the ideal step they give (Note [Ideal step])."""
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = config.num_attention_heads / sp
    att_tokens = min(length, ATTENTION_TOKENS)
    att_heads = max(1, config.num_attention_heads // sp)
    att_s = time_attention(att_tokens, att_heads, d, device)
    attention_tflops = attention_fwd_bwd_flops(att_tokens, att_heads, d) / att_s / 1e12
    ideal_attention_s = config.num_hidden_layers * attention_fwd_bwd_flops(length, heads, d) / attention_tflops / 1e12
    tokens = length / sp
    rows = int(min(tokens, GEMM_ROWS))
    dense_s, dense_flops = 0.0, 0.0
    for (out_features, in_features), count in linear_shapes(config).items():
        dense_s += count * time_gemm(rows, out_features, in_features, device) * tokens / rows
        dense_flops += count * 6 * tokens * out_features * in_features
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(ideal_step_s=ideal_attention_s + dense_s, ideal_attention_s=ideal_attention_s, ideal_dense_s=dense_s,
                attention_tflops=attention_tflops, gemm_tflops=dense_flops / dense_s / 1e12,
                calibrated_attention_tokens=att_tokens, calibrated_attention_heads=att_heads, calibrated_gemm_rows=rows)


def with_ideal(record: dict, calibration: dict | None) -> dict:
    """An ok record with its length's ideal step and, when it was timed, its percentage of it; others unchanged."""
    ideal = (calibration or {}).get(str(record.get("length")))
    if not ideal or record.get("status") != "ok":
        return record
    out = {**record, **ideal}
    step = record.get("step_s")
    if isinstance(step, float) and step == step and step > 0:
        out["pct_of_ideal"] = 100 * ideal["ideal_step_s"] / step
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", required=True, help="JSON: {length: calibration} for bench.run_peers' records")
    args = parser.parse_args()
    config = build_config(args.shape, args.layers)
    device = torch.device(args.device)
    found = {str(length): calibrate(config, length, args.sp, device) for length in sorted(set(args.lengths))}
    with open(args.out, "w") as fh:
        json.dump(found, fh)
    print(json.dumps(found), flush=True)


if __name__ == "__main__":
    main()
