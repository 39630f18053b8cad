"""Shared pieces of the benchmarks: model shapes, the machine's description, timing, memory, JSON records."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

SHAPES = {
    # Llama-3.1-8B: hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 128256, rope theta 500000.
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=1 << 22),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=1 << 22,
                     tie_word_embeddings=True),
    # CPU smoke runs of the benchmark scripts (tests/test_bench_peers.py): seconds per step on one core.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, max_position_embeddings=4096),
}


def build_config(shape: str, layers: int | None = None) -> transformers.LlamaConfig:
    """The transformers config of a named shape, with `layers` decoder layers when given."""
    settings = dict(SHAPES[shape])
    if layers is not None:
        settings["num_hidden_layers"] = layers
    return transformers.LlamaConfig(**settings)


def build_model(shape: str, layers: int | None = None, device: str = "cuda", attn: str = "sdpa", seed: int = 0):
    """Random-weight Llama of a named shape, bf16, built directly on the device."""
    config = build_config(shape, layers)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    return model.train()


def machine() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "card": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    """Synchronised wall time of each timed call, seconds."""

    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    def fields(self, name: str) -> dict:
        """`{name}_s` (the median: the figure quoted), `{name}_s_min` and how many calls were timed."""
        return {f"{name}_s": self.median, f"{name}_s_min": self.min, f"{name}_repeats": len(self.seconds)}


def timed(fn, repeats: int = 1) -> Timing:
    """Time `repeats` calls of `fn`, each on its own (call it after a warm-up step): the spread, not one mean."""
    seconds = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return Timing(tuple(seconds))


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def attention_flops(tokens: int, config, causal: bool = True) -> float:
    """Forward FLOPs of attention (QKᵀ and PV) over one sequence: 4·s²·d_attn·L, halved when causal."""
    d_attn = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return 4 * tokens**2 * d_attn * config.num_hidden_layers * (0.5 if causal else 1.0)


def model_flops(tokens: int, config, recompute: bool = True) -> float:
    """FLOPs of one training step (forward + backward), dense 6·N·tokens plus causal attention (×3, fwd + 2 bwd);
    the forward recomputed under checkpointing is not counted (model FLOPs, not hardware FLOPs)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    d = h // heads
    per_layer = h * (heads * d) * 2 + h * (kv * d) * 2 + 3 * h * i
    dense = 6 * tokens * (per_layer * config.num_hidden_layers + h * v)
    return dense + 3 * attention_flops(tokens, config)


def write_record(name: str, record: dict) -> None:
    """Print the record as the last line and append it to bench/results/<name>.jsonl (and $OUT when set)."""
    line = json.dumps(record, sort_keys=True)
    for folder in filter(None, [os.environ.get("OUT"), str(Path(__file__).parent / "results")]):
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / f"{name}.jsonl", "a") as fh:
            fh.write(line + "\n")
    print(line, flush=True)
