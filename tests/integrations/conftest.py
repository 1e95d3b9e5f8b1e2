"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch.distributed as dist


@pytest.fixture(scope="module")
def gloo_group() -> Iterator[None]:
    """A single-process gloo group (ZeroRedundancyOptimizer and DDP need one)."""
    if dist.is_initialized():  # made by someone else: use it, leave it
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
