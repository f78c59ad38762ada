"""Triton kernels for the kitty page format (layout: kitty_vllm.layout; oracle: kitty_vllm.reference)."""

from kitty_vllm.kernels.decode import decode_attention
from kitty_vllm.kernels.dequantize import dequantize_pages
from kitty_vllm.kernels.quantize import quantize_pages

__all__ = ["decode_attention", "dequantize_pages", "quantize_pages"]
