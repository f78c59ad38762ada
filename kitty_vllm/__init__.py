"""Kitty for vLLM: a 2-bit KV cache with dynamic channel-wise precision boost."""


def register() -> None:
    """vLLM general-plugin entry point."""
