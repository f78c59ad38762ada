"""Triton kernels for the kitty page format (layout: kitty_vllm.layout; oracle: kitty_vllm.reference)."""

from kitty_vllm.kernels.attention import context_attention, decode_attention, prefill_attention, prefill_blocks
from kitty_vllm.kernels.dequantize import dequantize_pages
from kitty_vllm.kernels.quantize import quantize_pages
from kitty_vllm.kernels.store import store_decode

__all__ = ["context_attention", "decode_attention", "dequantize_pages", "prefill_attention", "prefill_blocks",
           "quantize_pages", "store_decode"]
