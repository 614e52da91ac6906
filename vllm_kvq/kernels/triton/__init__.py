"""Triton kernels for the paged ops: ``store`` (quantize-on-write) and ``paged_attention`` (decode, prefill
and chunked prefill over the packed cache), with the signatures of ``vllm_kvq.ops.reference``.

On CPU they run under ``TRITON_INTERPRET=1`` (slowly: for tests on small shapes).
"""

import triton  # noqa: F401  (ImportError here tells ops dispatch that Triton is missing)

from vllm_kvq.kernels.triton.attention import paged_attention
from vllm_kvq.kernels.triton.store import store

__all__ = ["store", "paged_attention"]
