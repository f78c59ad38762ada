"""A `vllm serve` subprocess for tests: bound to 127.0.0.1, logged to a file, always killed as a group.

The helpers live in kitty_vllm.tools.soak (the soak runner that users run drives the same server); the tests
import them from here.
"""

from kitty_vllm.tools.soak import VllmServer, free_port, metric

__all__ = ["VllmServer", "free_port", "metric"]
