"""The vLLM adapter: registration, version shims, the attention backend."""
