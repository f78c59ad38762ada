"""Attention error of each preset on Keys shaped like real ones: a few channels 10-30x larger, for the
last 32 positions as decoding reads them (exact_prefill: the quantization alone, whatever the steps)."""

import torch

from kitty_vllm.config import KittyConfig
from kitty_vllm.reference import reference_attention

SEQ_LEN, NUM_KV_HEADS, NUM_HEADS, HEAD_DIM = 1024, 2, 8, 128
OUTLIER_CHANNELS = 8
SEEDS = range(8)
FULL_PRECISION = KittyConfig(page_size=2048, value_window=2048)   # no page ever fills


def outlier_keys(seed):
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.ones(NUM_KV_HEADS, HEAD_DIM)
    for head in range(NUM_KV_HEADS):
        channels = torch.randperm(HEAD_DIM, generator=g)[:OUTLIER_CHANNELS]
        magnitude[head, channels] = 10 + 20 * torch.rand(OUTLIER_CHANNELS, generator=g)
    offset = 0.5 * torch.randn(1, NUM_KV_HEADS, HEAD_DIM, generator=g)
    keys = (torch.randn(SEQ_LEN, NUM_KV_HEADS, HEAD_DIM, generator=g) + offset) * magnitude
    values = torch.randn(SEQ_LEN, NUM_KV_HEADS, HEAD_DIM, generator=g)
    queries = torch.randn(32, NUM_HEADS, HEAD_DIM, generator=g)
    return queries.half(), keys.half(), values.half()


def test_boost_orders_attention_error():
    positions = torch.arange(SEQ_LEN - 32, SEQ_LEN)
    error = {preset: 0.0 for preset in ("kitty2", "kitty2-lite", "kivi2")}
    for seed in SEEDS:
        q, k, v = outlier_keys(seed)
        exact = reference_attention(q, k, v, FULL_PRECISION, query_positions=positions)
        for preset in error:
            config = KittyConfig.from_preset(preset).replace(exact_prefill=True)
            out = reference_attention(q, k, v, config, query_positions=positions)
            error[preset] += float((out - exact).norm() / exact.norm()) / len(SEEDS)
    print("relative attention-output error vs fp16, mean of", len(SEEDS), "seeds:",
          ", ".join(f"{p} {e:.4f}" for p, e in error.items()))
    assert error["kitty2"] < error["kitty2-lite"] < error["kivi2"]
