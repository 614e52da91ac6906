"""Shared fixtures. The references themselves live in ``vllm_kvq.testing`` (STYLE habit 1); this file only
re-exports them for tests and keeps runs lean on the 2-core CI machines."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels (the generic kernels and the codecs' hooks, which are decorated when
    # their modules are imported) run in Triton's interpreter: switch it on before anything imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_kvq.testing import (PagedBatch, dense_attention, paged_reference, random_paged_batch,  # noqa: F401
                              relative_error, relative_mse, roundtrip)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def gen() -> torch.Generator:
    """A fixed generator per test, so a failure reproduces with the same numbers."""
    return torch.Generator().manual_seed(1234)
