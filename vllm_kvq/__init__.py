"""vllm_kvq: quantized KV caches for vLLM.

    from vllm_kvq import codecs, ops, kv_format

Nothing here imports vLLM; the adapter lives in ``vllm_kvq.vllm`` and is loaded by vLLM's plugin entry
point (``vllm_kvq.vllm.plugin:register``).
"""

from vllm_kvq import codecs
from vllm_kvq.kv_format import KVFormat, kv_format
from vllm_kvq import ops

__version__ = "0.1.0"
__all__ = ["codecs", "ops", "kv_format", "KVFormat", "__version__"]
