"""Quantize one page of outlier-heavy Keys with the Triton kernels and show what each preset keeps.

    python -m kitty_vllm.demo

Runs on the GPU when there is one, otherwise through Triton's CPU interpreter.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kitty_vllm.config import PRESETS, KittyConfig  # noqa: E402
from kitty_vllm.kernels import dequantize_pages, quantize_pages  # noqa: E402
from kitty_vllm.layout import format_table, page_layout  # noqa: E402

HEAD_DIM, NUM_KV_HEADS = 128, 8


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    magnitude = torch.ones(HEAD_DIM)
    magnitude[torch.randperm(HEAD_DIM, generator=g)[:8]] = 10 + 20 * torch.rand(8, generator=g)
    keys = (torch.randn(1, 128, NUM_KV_HEADS, HEAD_DIM, generator=g) * magnitude).half().to(device)
    values = torch.randn(1, 128, NUM_KV_HEADS, HEAD_DIM, generator=g).half().to(device)
    print(f"one 128-token page, {NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}, 8 outlier channels (10-30x); "
          f"kernels on {device}{' (Triton interpreter)' if device == 'cpu' else ''}\n")
    print(format_table(page_layout(KittyConfig.from_preset("kitty2"), HEAD_DIM)), "\n")
    print("| preset | bits/element | Key rel. error | Value rel. error |\n|---|---|---|---|")
    for preset in PRESETS:
        config = KittyConfig.from_preset(preset)
        layout = page_layout(config, HEAD_DIM)
        cache = torch.zeros(1, NUM_KV_HEADS, layout.page_bytes, dtype=torch.uint8, device=device)
        index = torch.zeros(1, dtype=torch.int32, device=device)
        quantize_pages(keys, values, torch.full_like(index, 128), index, cache, config)
        keys_hat, values_hat = dequantize_pages(cache, index, config, HEAD_DIM)
        key_error = float((keys_hat - keys.float()).norm() / keys.float().norm())
        value_error = float((values_hat - values.float()).norm() / values.float().norm())
        print(f"| {preset} | {layout.effective_bits:.2f} | {key_error:.4f} | {value_error:.4f} |")


if __name__ == "__main__":
    main()
