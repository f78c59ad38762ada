"""Kitty for vLLM: a 2-bit KV cache with dynamic channel-wise precision boost.

``register`` is the ``vllm.general_plugins`` entry point: vLLM calls it in every process (engine,
workers, CLI) before it parses ``--kv-cache-dtype``, and possibly several times.
"""


def register() -> None:
    from kitty_vllm.patches import apply

    apply()
