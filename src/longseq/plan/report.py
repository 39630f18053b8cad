"""A plan as a table for people and as a dict (JSON) for programs."""

from __future__ import annotations

import dataclasses

from longseq.plan.errors import PlanError
from longseq.plan.planner import Plan, settings, tokens_per_second

_GIB = 2**30


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2, 5'."""
    parts, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            parts.append(f"{start}" if start == index else f"{start}-{index}")
            start = None
    return ", ".join(parts) or "none"


def placement_summary(result: Plan) -> dict[str, str]:
    """Layer ranges per checkpoint place and per attention place."""
    rows = result.chosen.choice.placement(result.problem.shape.layers)
    summary = {}
    for column, label in ((0, "checkpoint"), (1, "attention output")):
        for place in ("gpu", "host", "none", "recompute"):
            layers = [i for i, row in enumerate(rows) if row[column] == place]
            if layers:
                summary[f"{label} {place}"] = _ranges(layers)
    return summary


def _settings_or_reason(result: Plan) -> dict | str:
    try:
        return settings(result)
    except PlanError as error:
        return str(error)


def as_dict(result: Plan) -> dict:
    p = result.problem
    out = {"model": dataclasses.asdict(p.shape), "layout": {"sp": p.layout.sp, "ulysses": p.layout.ulysses,
                                                             "ring": p.layout.ring, "dp": p.layout.dp},
           "workload": dataclasses.asdict(p.workload),
           "machine": {"card": p.machine.card.name, "gpu_memory_gib": p.machine.gpu_memory_gib,
                       "host_memory_gib": p.machine.host_memory_gib, "gpus_per_host": p.machine.gpus_per_host,
                       "gpu_limit_gib": p.machine.gpu_limit / _GIB, "host_limit_gib": p.machine.host_limit / _GIB},
           "fits": result.fits, "longest_length": result.longest, "limit": result.limit,
           "unmeasured_card_fields": p.machine.card.unmeasured()}
    evaluation = result.shown
    if not result.fits:
        out["shortfall"] = result.shortfall()
        out["message"] = result.shortfall_message()
    usage, time = evaluation.footprint, evaluation.time
    out.update(
        choice=evaluation.choice.as_dict(),
        gpu={"peak_gib": usage.gpu.bytes / _GIB, "moment": usage.gpu.moment,
             "components_gib": {k: v / _GIB for k, v in usage.gpu.by_group().items()}},
        host={"per_rank_gib": usage.host.bytes / _GIB, "per_host_gib": usage.host.bytes * p.ranks_per_host / _GIB,
              "components_gib": {k: v / _GIB for k, v in usage.host.by_group().items()}},
        time={"step_s": time.seconds, "components_s": dict(time.components)})
    if result.fits:
        out["time"]["tokens_per_s"] = tokens_per_second(result)
        out["placement"] = placement_summary(result)
        out["settings"] = _settings_or_reason(result)
    return out


def table(result: Plan) -> str:
    d, p = as_dict(result), result.problem
    shape, layout = p.shape, d["layout"]
    active = f", {shape.active_params / 1e9:.2f} B active" if shape.experts is not None else ""
    lines = [f"longseq plan: {shape.name} ({shape.layers} layers: {shape.layer_summary()}; "
             f"{shape.params / 1e9:.2f} B parameters{active}), "
             f"{p.layout.gpus} GPU(s) {p.machine.card.name} (sp={layout['sp']}: ulysses {layout['ulysses']} × ring "
             f"{layout['ring']}, dp={layout['dp']}), {p.workload.batch} × {p.workload.length} tokens, "
             f"training: {p.workload.training}"]
    if result.longest is not None:
        lines.append(f"longest length that fits: {result.longest} tokens (limited by {result.limit})")
    if not result.fits:
        lines.append(f"DOES NOT FIT: {d['message']}")
    shown = "" if result.fits else " (the configuration closest to fitting)"
    lines += _components(f"GPU per rank{shown}, peak at {d['gpu']['moment']}", d["gpu"]["components_gib"],
                         d["gpu"]["peak_gib"], d["machine"]["gpu_limit_gib"])
    lines += _components(f"host per rank ({p.ranks_per_host} rank(s) per host: {d['host']['per_host_gib']:.1f} GiB "
                         "per host)", d["host"]["components_gib"], d["host"]["per_rank_gib"],
                         d["machine"]["host_limit_gib"] / p.ranks_per_host)
    lines += _time(d["time"])
    if result.fits:
        lines += _configuration(d)
    if d["unmeasured_card_fields"]:
        lines.append(f"assumed, not measured, in the card: {', '.join(d['unmeasured_card_fields'])}")
    return "\n".join(lines)


def _components(title: str, components: dict, total: float, limit: float) -> list[str]:
    lines = [f"\n{title:<66}{'GiB':>8}"]
    lines += [f"  {name:<64}{gib:8.2f}" for name, gib in sorted(components.items(), key=lambda kv: -kv[1])]
    lines.append(f"  {'total':<64}{total:8.2f}   (limit {limit:.2f})")
    return lines


def _time(time: dict) -> list[str]:
    rate = f", {time['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in time else ""
    parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(time["components_s"].items(), key=lambda kv: -kv[1]))
    return [f"\nstep time: {time['step_s']:.2f} s predicted{rate}", f"  ({parts})"]


def _configuration(d: dict) -> list[str]:
    c = d["choice"]
    on = {True: "on", False: "off"}
    lines = ["\nconfiguration:",
             f"  tiled MLP {on[c['tiled_mlp']]}, tiled norms {on[c['tiled_norms']]}, tiled loss "
             f"{on[c['tiled_loss']]}, tile {c['tile_memory_mib']} MiB",
             f"  checkpointing {on[c['checkpointing']]}, layers_per_checkpoint {c['layers_per_checkpoint']}, "
             f"attention cache {on[c['cache_attention'] and c['checkpointing']]}, FSDP2 CPU offload "
             f"{on[c['fsdp_cpu_offload']]}"]
    lines += [f"  {where}: layers {layers}" for where, layers in d["placement"].items()]
    settings_ = d["settings"]
    if isinstance(settings_, str):
        lines.append(f"  settings: {settings_}")
    else:
        lines.append("  longseq train: " + " ".join(f"--{k}={v}" for k, v in settings_.items()))
    return lines
