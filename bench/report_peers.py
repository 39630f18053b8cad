"""Report of bench.run_peers: per card, a table, two plots and the longseq / ALST ratios.

    python -m bench.report_peers [bench/results/peers.jsonl]      # writes docs/peers-<card>.md and its PNGs

Records of different cards are never mixed (an H200 figure is never compared with an H100 one). When a contender ran
several times at one (shape, sp, layers, length), the latest record counts. ALST is represented by the better of its two
offload flavours (alst, alst-arctic-offload) at each point.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from bench.peers_records import ROOT, latest, load, series, table

ALST = ("alst", "alst-arctic-offload")
MEMORY_FAILURES = ("oom", "killed")  # killed: SIGKILL, the host out of memory


def best_alst(points: dict, key: tuple, length: int):
    """The faster ok ALST flavour at this point (or any failed one when none is ok)."""
    options = [points.get((name, *key, length)) for name in ALST]
    ok = [r for r in options if r and r.get("status") == "ok"]
    if ok:
        return max(ok, key=lambda r: r.get("tokens_per_s_per_gpu") or 0)
    return next((r for r in options if r), None)


def longest(points: dict, names, key: tuple) -> tuple[int | None, int | None]:
    """(longest length that ran, shortest longer length that failed on memory): the limit is known only where the
    second exists; a timeout or an error says nothing about memory."""
    rows = [(k[-1], r.get("status")) for k, r in points.items() if k[0] in names and k[1:-1] == key]
    ok = max((length for length, status in rows if status == "ok"), default=None)
    failed = min((length for length, status in rows if status in MEMORY_FAILURES and length > (ok or 0)),
                 default=None)
    return ok, failed


def marginal_kib_per_token(points: dict) -> dict:
    """(contender, shape, sp, layers) -> {"L1-L2": KiB} GPU memory per extra token a GPU holds, between the two
    longest ok lengths of one contender (the weights' fixed part cancels out)."""
    by_series = defaultdict(list)
    for (*key, length), r in points.items():
        if r.get("status") == "ok" and r.get("peak_gib") is not None:
            by_series[tuple(key)].append((length, r["peak_gib"]))
    out = {}
    for key, rows in by_series.items():
        if len(rows) >= 2:
            (l1, p1), (l2, p2) = sorted(rows)[-2:]
            out[key] = {f"{l1}-{l2}": round((p2 - p1) * 2**20 / ((l2 - l1) / (key[2] or 1)), 1)}
    return out


def label(key: tuple) -> str:
    shape, sp, layers = key
    return f"{shape}/sp{sp}/layers={layers}"


def summary(records: list[dict]) -> dict:
    """longseq / ALST ratios per (shape, sp, layers): tokens/s at equal length, loss difference, GPU bytes per token,
    longest length that ran and whether a memory failure bounds it."""
    points = latest(records)
    for r in records:  # search probes count for the longest length too
        if r.get("status") == "ok" and r.get("search"):
            points.setdefault((r["contender"], *series(r), r["length"]), r)
    out = defaultdict(dict)
    for (name, *where, length), mine in sorted(points.items(), key=lambda kv: str(kv[0])):
        if name != "longseq":
            continue
        key = label(tuple(where))
        peer = best_alst(points, tuple(where), length)
        if peer and peer.get("status") == "ok" and mine.get("status") == "ok" and mine.get("timed_steps"):
            ratio = mine["tokens_per_s_per_gpu"] / peer["tokens_per_s_per_gpu"]
            out[key][f"tokens_per_s_ratio@{length}"] = round(ratio, 3)
            out[key][f"loss_diff@{length}"] = round(mine["first_step_loss"] - peer["first_step_loss"], 5)
            out[key][f"peak_gib_longseq/alst@{length}"] = f"{mine['peak_gib']:.1f}/{peer['peak_gib']:.1f}"
        hf = points.get(("hf", *where, length))
        if hf and hf.get("status") == "ok" and mine.get("status") == "ok":
            out[key][f"loss_diff_vs_hf@{length}"] = round(mine["first_step_loss"] - hf["first_step_loss"], 5)
    for (name, *where), slope in marginal_kib_per_token(points).items():
        out[label(tuple(where))][f"marginal_kib_per_token_{name}"] = slope
    for where in {k[1:-1] for k in points}:
        (mine, mine_failed), (peer, peer_failed) = longest(points, ("longseq",), where), longest(points, ALST, where)
        if mine or peer:
            entry = out[label(where)]
            entry.update(longest_ok_longseq=mine, out_of_memory_longseq=mine_failed, longest_ok_alst=peer,
                         out_of_memory_alst=peer_failed)
            if mine and peer and peer_failed:  # a ratio of lengths means something only where ALST's limit was hit
                entry["longest_ratio"] = round(mine / peer, 3)
                entry["longest_ratio_is"] = "bracketed" if mine_failed else "a lower bound (longseq's limit not hit)"
    return {"ratios_longseq_over_alst": dict(out)}


def plot(points: dict, card_slug: str, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for metric, label in (("peak_gib", "peak GPU memory, GiB (max over ranks)"),
                          ("tokens_per_s_per_gpu", "tokens/s per GPU")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        lines = defaultdict(list)
        for (name, shape, sp, layers, length), r in sorted(points.items(), key=lambda kv: kv[0][-1]):
            if r.get("status") == "ok" and r.get(metric) == r.get(metric) and r.get(metric) is not None:
                lines[f"{name} {shape} sp={sp} layers={layers}"].append((length / 1024, r[metric]))
        for label_, xy in sorted(lines.items()):
            ax.plot(*zip(*xy), marker="o", label=label_)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length, K tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        name = f"peers-{card_slug}-{'memory' if metric == 'peak_gib' else 'speed'}.png"
        fig.tight_layout()
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        names.append(name)
    return names


def write_card(card: str, records: list[dict], folder: Path) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    points = latest(records)
    images = plot(points, slug, folder)
    info = next((r for r in records if r.get("torch")), {})
    lines = [f"# Peers on {card}", "",
             f"torch {info.get('torch')}, transformers {info.get('transformers')}, deepspeed "
             f"{next((r.get('deepspeed') for r in records if r.get('deepspeed')), '–')}, CUDA {info.get('cuda')}. "
             "Generated by `python -m bench.report_peers` from bench/results/peers.jsonl; see docs/peers.md for what "
             "each contender runs. `call` is the device call (docs/log.md): compare step times only within one call.",
             "",
             table([r for k, r in sorted(points.items(), key=lambda kv: str(kv[0]))] +
                   [r for r in records if r.get("status") == "search"]), "",
             "```json", json.dumps(summary(records), indent=1), "```", ""]
    lines += [f"![{name}]({name})" for name in images]
    path = folder / f"peers-{slug}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "results" / "peers.jsonl"
    by_card = defaultdict(list)
    for r in load(source):
        by_card[r.get("card", "unknown")].append(r)
    for card, records in sorted(by_card.items()):
        path = write_card(card, records, ROOT / "docs")
        print(card, "->", path.relative_to(ROOT), json.dumps(summary(records)))


if __name__ == "__main__":
    main()
