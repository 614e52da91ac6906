"""vLLM's ``vllm.general_plugins`` entry point."""


def register() -> None:
    from vllm_kvq.vllm import registration

    registration.register()
