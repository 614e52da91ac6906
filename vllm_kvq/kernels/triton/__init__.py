"""Triton kernels for the paged ops (filled in by the GPU-kernel work)."""
raise ImportError("vllm_kvq Triton kernels are not built yet")
