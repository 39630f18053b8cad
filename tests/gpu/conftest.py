"""Tests under tests/gpu need CUDA: without it (CI is CPU-only) every test marked `gpu` is skipped, not failed."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (tests/gpu run on a GPU machine; CI is CPU-only)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
