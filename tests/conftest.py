"""Shared fixtures. The references themselves live in ``vllm_kvq.testing`` (STYLE habit 1); this file only
re-exports them for tests and keeps runs lean on the 2-core CI machines."""

from __future__ import annotations

import pytest
import torch

from vllm_kvq.testing import (PagedBatch, dense_attention, paged_reference, random_paged_batch,  # noqa: F401
                              relative_error, relative_mse, roundtrip)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def gen() -> torch.Generator:
    """A fixed generator per test, so a failure reproduces with the same numbers."""
    return torch.Generator().manual_seed(1234)
