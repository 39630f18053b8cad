"""Turn bench/results/*.jsonl into docs/results-<card>.md with PNG plots, one report per card (never mixed).

    python -m bench.report            # needs matplotlib (pip install -e ".[bench]")
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS, DOCS = ROOT / "bench" / "results", ROOT / "docs"


def load(name: str) -> list[dict]:
    path = RESULTS / f"{name}.jsonl"
    return [json.loads(line) for line in path.open()] if path.exists() else []


def slug(card: str) -> str:
    return card.lower().replace("nvidia ", "").replace(" ", "-")


def memory_section(records: list[dict], card: str) -> list[str]:
    lines = ["## Memory on one GPU (bench_memory.py): Llama-3.1-8B shape, bf16, forward + backward, no optimizer", "",
             "Process capped at 79 GiB (an 80 GB H100's usable memory) unless the cap column says otherwise. "
             "Fixed part = bf16 weights + gradients (+ ballast standing for missing layers). "
             "`all` = tiled MLP + tiled loss + offloaded checkpoints (+ tiled norms from commit 1201e5f on).", "",
             "Slope = extra peak memory per extra token between the record's shortest and longest fitting lengths (at "
             "short lengths fixed-size buffers, such as the tiled loss's fp32 weight gradient, hide it).", "",
             "| variant | code | layers (+ballast) | cap GiB | tokens | peak GiB | slope KiB/token | step s | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        points = []
        for i, row in enumerate(r["rows"]):
            above = r.get("kib_per_token") if i == 0 else None
            peak = f"{row['peak_gib']:.1f}" if "peak_gib" in row else "OOM"
            lines.append(
                f"| {r['variant']} | {r['code']} | {r['layers']}{'+' + str(r['ballast_layers']) if r['ballast_layers'] else ''}"
                f" | {r['cap_gib'] or '-'} | {row['length']:,} | {peak} | {f'{above:.0f}' if above else '-'}"
                f" | {row.get('step_s', float('nan')):.2f} | {row.get('tokens_per_s', float('nan')):,.0f} |")
            if "peak_gib" in row:
                points.append((row["length"], row["peak_gib"]))
        if points and r["layers"] + r["ballast_layers"] == 32:
            label = f"{r['variant']} ({r['code']}{', ballast' if r['ballast_layers'] else ''})"
            ax.plot(*zip(*points), marker="o", label=label)
    ax.axhline(79, color="grey", linestyle="--", label="79 GiB cap")
    ax.set(xscale="log", xlabel="tokens", ylabel="peak GPU memory (GiB)", title=f"Llama-3.1-8B shape, 1 GPU, {card}")
    return lines + save_plot(fig, ax, f"memory-{slug(card)}.png", "peak memory vs length", legend_size=7)


def save_plot(fig, ax, png: str, alt: str, legend_size=None) -> list[str]:
    """Write the figure into docs/ and return the markdown lines that show it."""
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(DOCS / png, dpi=110)
    plt.close(fig)
    return ["", f"![{alt}]({png})", ""]


def attention_section(records: list[dict], card: str) -> list[str]:
    """One table and plot per GPU count; for each length, the latest record that measured it."""
    lines = []
    for world in sorted({r["world"] for r in records}, reverse=True):
        rows, layouts, calls = {}, [], set()
        for record in (r for r in records if r["world"] == world):
            for row in record["rows"]:
                rows[row["length"]] = row
            layouts += [k[:-len("_tflops_per_gpu")] for k in record["rows"][0]
                        if k.endswith("_tflops_per_gpu") and k[:-len("_tflops_per_gpu")] not in layouts]
        rows = [rows[length] for length in sorted(rows)]
        calls = sorted({str(r.get("device_call", "?")) for r in records if r["world"] == world})
        lines += [f"## Attention alone (bench_attention.py): {world} GPUs, 32 heads / 8 KV heads × 128, bf16, "
                  "forward + backward", "", "Per-GPU TFLOP/s (causal FLOPs, backward counted as 2.5× forward); "
                  "`single` is one GPU running causal attention of S/√P tokens, the same work per GPU; `_flex` "
                  f"layouts run the ring on FlexAttention block kernels. Device calls {', '.join(calls)} "
                  "(docs/log.md).", "",
                  "| tokens | single | " + " | ".join(f"{n} (vs single)" for n in layouts) + " |",
                  "|---|---|" + "---|" * len(layouts)]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lengths = [row["length"] for row in rows]
        ax.plot(lengths, [row["single_gpu_tflops"] for row in rows], marker="o", label="single GPU, same work")
        for name in layouts:
            points = [(row["length"], row[f"{name}_tflops_per_gpu"]) for row in rows if f"{name}_tflops_per_gpu" in row]
            ax.plot(*zip(*points), marker="o", label=name)
        for row in rows:
            cells = " | ".join(f"{row[f'{n}_tflops_per_gpu']:.0f} ({row[f'{n}_vs_single']:.0%})"
                               if f"{n}_tflops_per_gpu" in row else "–" for n in layouts)
            lines.append(f"| {row['length']:,} | {row['single_gpu_tflops']:.0f} | {cells} |")
        ax.set(xscale="log", xlabel="tokens (whole sequence)", ylabel="TFLOP/s per GPU", ylim=(0, None),
               title=f"Sequence-parallel attention, {world} × {card}")
        lines += save_plot(fig, ax, f"attention-{slug(card)}-{world}gpus.png", f"attention TFLOP/s, {world} GPUs")
    return lines


def sp_section(records: list[dict], card: str) -> list[str]:
    lines = ["## End-to-end step under sequence parallelism (bench_sp.py): Llama-3.1-8B shape, all memory features",
             "", "| GPUs | layout | tokens | loss | loss at reference length − single GPU | peak GiB per GPU | "
             "step s | tokens/s per GPU | model TFLOP/s per GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for record in records:
        for name, r in record["results"].items():
            gpus = 1 if name == "single_gpu" else record["world"]
            diff = f"{r['loss_diff_vs_single']:.1e}" if "loss_diff_vs_single" in r else "-"
            lines.append(f"| {gpus} | {name} | {r['tokens']:,} | {r['loss']:.4f} | {diff} | {r['peak_gib']:.1f} | "
                         f"{r['step_s']:.2f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['tflops_per_gpu']:.0f} |")
    return lines + [""]


def check_section(records: list[dict]) -> list[str]:
    """The latest run per GPU count (earlier runs, and what they found, are in docs/log.md)."""
    lines = []
    for gpus in sorted({r["gpus"] for r in records}, reverse=True):
        latest = [r for r in records if r["gpus"] == gpus][-1]
        call = latest.get("device_call", "?")
        lines += [f"## CUDA/NCCL exactness (tests/gpu/nccl_checks.py, {gpus} GPUs, device call {call})",
                  "", "| check | max error | tolerance | ok |", "|---|---|---|---|"]
        for r in latest["results"]:
            lines.append(f"| {r['check']} | {r['error']:.2e} | {r['tolerance']:.0e} | {'yes' if r['ok'] else 'NO'} |")
        lines.append("")
    return lines


def main() -> None:
    by_card: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for name in ("bench_memory", "bench_attention", "bench_sp", "check_gpu"):
        for record in load(name):
            by_card[record["card"]][name].append(record)
    for card, groups in by_card.items():
        first = next(iter(groups.values()))[0]
        lines = [f"# Results on {card}", "", f"torch {first['torch']}, transformers {first['transformers']}, "
                 "random weights. Every figure below comes from the JSON records in bench/results/ "
                 "(each record names its card, date and code commit).", ""]
        if groups["check_gpu"]:
            lines += check_section(groups["check_gpu"])
        if groups["bench_attention"]:
            lines += attention_section(groups["bench_attention"], card)
        if groups["bench_sp"]:
            lines += sp_section(groups["bench_sp"], card)
        if groups["bench_memory"]:
            lines += memory_section(groups["bench_memory"], card)
        out = DOCS / f"results-{slug(card)}.md"
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
