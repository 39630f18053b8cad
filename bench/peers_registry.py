"""Every contender of bench.run_peers: its name, the training-state placements it can take, and how it is built."""

from __future__ import annotations

from bench.peers_accelerate import accelerate_cp_unavailable, prepare_accelerate_cp
from bench.peers_alst import alst_unavailable, prepare_alst
from bench.peers_contenders import (
    hf_offload_unavailable, hf_unavailable, longseq_unavailable, prepare_hf, prepare_hf_offload, prepare_longseq,
)
from bench.peers_records import Contender, require

PLACEMENTS = {
    "hf": ("gpu",),
    "hf-offload": ("gpu",),
    "longseq": ("gpu", "all"),  # FSDP2 offloads parameters, gradients and optimizer state together, or nothing
    "longseq-nocache": ("gpu", "all"),
    "alst": ("gpu", "optimizer", "all"),
    "alst-arctic-offload": ("gpu", "optimizer", "all"),
    "accelerate-cp": ("gpu", "all"),
}
"""Contender -> the placements (peers_records.PLACEMENTS) it can run, least offloaded first: the driver tries them in
this order and moves to the next only when a run is out of GPU memory (each contender at its best). What the older
variants longseq-nooffload and longseq-nooptim ran is now --placement gpu and --optimizer none."""
ALST = ("alst", "alst-arctic-offload")
NAMES = tuple(PLACEMENTS)
BUILDERS = {
    "hf": prepare_hf,
    "hf-offload": prepare_hf_offload,
    "longseq": prepare_longseq,
    "longseq-nocache": lambda args: prepare_longseq(args, cache_attention=False),
    "alst": prepare_alst,
    "alst-arctic-offload": lambda args: prepare_alst(args, offload="arctic"),
    "accelerate-cp": prepare_accelerate_cp,
}

UNAVAILABLE = {
    "hf": hf_unavailable,
    "hf-offload": hf_offload_unavailable,
    "longseq": longseq_unavailable,
    "longseq-nocache": longseq_unavailable,
    "alst": alst_unavailable,
    "alst-arctic-offload": alst_unavailable,
    "accelerate-cp": accelerate_cp_unavailable,
}
"""Contender -> why it cannot run with these options on this machine (an empty list: it can)."""


def unavailable(name: str, args) -> list[str]:
    if name not in BUILDERS:
        raise ValueError(f"unknown contender {name!r}; choose among {list(NAMES)}.")
    return UNAVAILABLE[name](args)


def prepare(name: str, args) -> Contender:
    """The contender's step, or ContenderUnavailable with every reason it cannot run here (DeepSpeed, Liger and
    accelerate are imported only inside the builders that need them)."""
    require(name, unavailable(name, args))
    return BUILDERS[name](args)
