"""Triton kernels for the paged ops: ``store`` (quantize-on-write) and ``paged_attention`` (decode, prefill
and chunked prefill over the packed cache), with the signatures of ``vllm_kvq.ops.reference``. They are
generic over the codecs' Triton hooks (``VectorCodec.triton_hooks``).

On CPU they run under ``TRITON_INTERPRET=1`` (slowly: for tests on small shapes).
"""

import triton  # noqa: F401  (ModuleNotFoundError here tells ops dispatch that Triton is missing)

from vllm_kvq.kernels.triton.attention import paged_attention
from vllm_kvq.kernels.triton.store import store


def why_not(fmt, op: str = "paged_attention", decode: bool = True, group: int = 1) -> str | None:
    """None when the kernels take every head group of ``fmt``, else why not (the codec's own answer)."""
    for g in fmt.groups:
        for c in (g.key, g.value):
            why = c.why_not("triton")
            if why:
                return why
    return None


__all__ = ["store", "paged_attention", "why_not"]
