"""Default the CUDA caching allocator to expandable segments, unless the user chose otherwise.

Note [Expandable segments]
~~~~~~~~~~~~~~~~~~~~~~~~~~
Long-sequence training allocates tensors whose sizes change with the sequence (a tile, a layer's input, a
restored checkpoint). With fixed-size segments the caching allocator fragments: freed blocks of the wrong size
cannot serve the next request, and reserved memory grows well past what is allocated until an OOM.
`expandable_segments:True` maps more physical memory into one growing virtual segment instead, so freed memory
is reusable for any size. The setting is read when CUDA initialises; after that it can still be switched on
through the allocator's settings call, for segments created from then on.
"""

from __future__ import annotations

import os

import torch

_SETTING = "expandable_segments:True"
_ENV_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def _set_allocator_settings(setting: str) -> None:
    # torch >= 2.9 names it _accelerator_setAllocatorSettings; torch.cuda.memory._set_allocator_settings is its
    # deprecated alias there and the only name before.
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter(setting)


def configure_allocator() -> str | None:
    """Switch on expandable segments unless PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF is set; returns the
    setting applied, or None when the user's own choice was left in place."""
    if any(name in os.environ for name in _ENV_VARS):
        return None
    if torch.cuda.is_initialized():
        _set_allocator_settings(_SETTING)
    else:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = _SETTING
    return _SETTING
