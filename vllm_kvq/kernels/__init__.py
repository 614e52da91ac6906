"""Fast implementations of the paged ops: triton/ (GPU, and CPU under TRITON_INTERPRET=1) and the Python
side of the native extensions in csrc/. Each one is checked against ``vllm_kvq.ops.reference``."""
