"""Calibration of one kind of accelerator: kernel speeds, link speeds and the few memory facts that depend on the
kernels, stored as JSON in plan/cards/ (every value with its source) and written by bench/calibrate.py."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from longseq.plan.errors import PlanError

CARDS = Path(__file__).parent / "cards"


@dataclass(frozen=True, kw_only=True)
class Card:
    """What the model needs to know about one accelerator kind (figures per GPU)."""

    name: str
    """The device name as torch reports it (torch.cuda.get_device_name), or 'cpu'."""
    gpu_memory_gib: float
    """Total device memory the allocator can use."""
    attention_forward_tflops: dict[str, float]
    """Causal attention forward (bf16) by head_dim, model FLOPs per second / 1e12."""
    attention_backward_tflops: dict[str, float]
    """Causal attention backward (2.5 × the forward's FLOPs) by head_dim, per second / 1e12."""
    gemm_tflops: float
    """Dense projections and MLP in a training step, per second / 1e12 (elementwise work around them included)."""
    expert_gemm_tflops: float
    """The grouped GEMMs of a mixture-of-experts block (transformers' grouped_mm: the routed experts' projections,
    and the router), model FLOPs per second / 1e12 (Note [Expert block time])."""
    expert_row_gelements_s: float
    """An expert block's work per routed row outside its GEMMs' arithmetic (gathers by expert, masks, activation,
    weighting, the rows put back in token order; experts.row_elements), elements per second / 1e9."""
    band_tflops: float
    """longseq's sliding-window bands (parallel/window.py: fp32 math over chunks of query rows), forward and
    backward: the chunks' matmul FLOPs as they run (every row against the keys its chunk reaches) per second / 1e12,
    the elementwise work on their scores included."""
    delta_rule_tflops: float
    """longseq's chunked gated delta rule (Gated DeltaNet, fp32), forward and backward: model FLOPs (three times the
    forward's, Note [Linear attention in the plan]) per second / 1e12."""
    host_to_device_gib_s: float
    """Pinned host → device copy bandwidth on a side stream."""
    device_to_host_gib_s: float
    """Device → pinned host copy bandwidth on a side stream."""
    all_to_all_gib_s: float
    """All-to-all bandwidth per rank among the GPUs of one host (Ulysses)."""
    p2p_gib_s: float
    """Point-to-point send/receive bandwidth between neighbouring GPUs of one host (ring attention)."""
    memory_gib_s: float
    """Device memory bandwidth (the optimizer step on the GPU)."""
    host_adamw_gparams_s: float
    """Fused AdamW on the host (FSDP2 CPU offload): parameters per second / 1e9, for all ranks of a host together."""
    attention_workspace_bytes: float
    """Bytes the attention backward kernel allocates for itself per query element (an fp32 dq accumulator: 4)."""
    attention_lse_dense: bool
    """The block kernels' log-sum-exp comes out dense (B, H, S) (cuDNN, flash; CPU's is (B, S, H) in memory)."""
    sdpa_gqa_expands_kv_grads: bool
    """The model's own SDPA backward with GQA builds dk/dv for every query head before summing (flash does)."""
    tiled_mlp_ns: float
    """Extra step time of the tiled MLP per token and layer, over the untiled MLP, in ns."""
    tiled_norms_ns: float
    """Extra step time of recomputed (tiled) norms per token and layer, in ns."""
    fused_norms_ns: float
    """Extra step time of norms fused into their readers per token and layer, besides the projections' recompute."""
    tiled_loss_ns: float
    """Extra step time of the tiled loss per token, over the untiled loss, in ns (besides its tiles' passes)."""
    tiled_loss_tile_bytes_per_weight: float
    """Memory traffic of one loss tile per lm_head weight, in bytes at memory_gib_s: each tile adds its partial weight
    gradient into the fp32 accumulator (Note [Tiled loss]), a pass over V × H that the tile count multiplies."""
    host_process_gib: float
    """Host memory a training process holds besides what the model counts (interpreter, CUDA context, buffers)."""
    host_memory_gib: dict[str, float] = field(default_factory=dict)
    """Host memory of the machines this card comes in, by GPUs per machine (the default --host-mem-gib)."""
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    """Where each figure comes from (a measurement, a record, or 'assumed: ...')."""

    def attention_tflops(self, head_dim: int) -> tuple[float, float]:
        """(forward, backward) attention speed for head_dim, from the nearest head_dim calibrated."""
        nearest = min(self.attention_forward_tflops, key=lambda d: abs(int(d) - head_dim))
        return self.attention_forward_tflops[nearest], self.attention_backward_tflops[nearest]

    def unmeasured(self) -> list[str]:
        """The fields whose figure is assumed rather than measured."""
        return sorted(k for k, s in self.sources.items() if s.startswith("assumed"))


_FIELDS = {f.name for f in dataclasses.fields(Card)} - {"name", "sources"}


def card_from_json(data: dict) -> Card:
    values = data["values"]
    unknown = set(values) - _FIELDS
    missing = _FIELDS - set(values) - {"host_memory_gib"}
    if unknown or missing:
        raise PlanError(f"card {data.get('name')!r}: unknown fields {sorted(unknown)}, missing {sorted(missing)}; "
                        "rewrite it with bench/calibrate.py.")
    return Card(name=data["name"], sources={k: v["source"] for k, v in values.items()},
                **{k: v["value"] for k, v in values.items()})


def card_to_json(card: Card) -> dict:
    values = {f: {"value": getattr(card, f), "source": card.sources.get(f, "")} for f in sorted(_FIELDS)}
    return {"name": card.name, "values": values}


def available_cards() -> list[str]:
    return sorted(p.stem for p in CARDS.glob("*.json"))


def load_card(name_or_path: str) -> Card:
    """A stored card by file stem ('h200', 'cpu'), by device name ('NVIDIA H200'), or a JSON file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CARDS / f"{name_or_path.lower()}.json"
    if not path.is_file():
        by_name = {json.loads(p.read_text())["name"]: p for p in CARDS.glob("*.json")}
        if name_or_path not in by_name:
            raise PlanError(f"no calibration for card {name_or_path!r}; stored: {', '.join(available_cards())}. "
                            "Run bench/calibrate.py on that card, or pass --card with one of those.")
        path = by_name[name_or_path]
    return card_from_json(json.loads(path.read_text()))
