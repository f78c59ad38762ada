"""GPU check and timing of the Gluon decode kernel (kitty_vllm.kernels.decode_gluon) against the float32
reference and the Triton decode kernel it replaces on GPUs.

    export PYTHONPATH=$PWD
    python benchmarks/gluon_decode.py          # writes $OUT/gluon.json (or /tmp)

Checks: the pages' attention before the window (merged partials) against kitty_vllm.reference at rtol 1e-4 for several
presets, head sizes and GQA groups. Timing (CUDA graphs), one Qwen3-8B layer (32 query, 8 KV heads of
128): the Gluon kernel alone (pages), decode_attention as it runs (Gluon pages, Triton sinks and ring,
merge) and the Triton kernel alone (decode_attention with the Gluon path off), as milliseconds and as
bandwidth (page bytes / time), on decode_kernel.py's random cache; ``copy_GBps`` is decode_kernel.py's
device-to-device copy (bytes read + written / time).
"""
import json
import os
import time

import torch
import triton

import decode_kernel
from kitty_vllm import reference
from kitty_vllm.config import KittyConfig
from kitty_vllm.kernels import attention
from kitty_vllm.kernels import decode_gluon as gdecode
from kitty_vllm.layout import page_layout


def launch(query, packed, page_table, seq_lens, config, splits):
    """The Gluon kernel's partials [B, Hq, splits + 1, D + 2] (the last split left empty)."""
    B, Hq, D = query.shape
    partial = torch.zeros(B, Hq, splits + 1, D + 2, dtype=torch.float32, device=query.device)
    gdecode.decode_pages(query, packed, page_table, seq_lens, partial, splits, config, page_layout(config, D),
                         D ** -0.5)
    return partial


def merged(partial, splits):
    acc, m, s = partial[..., :splits, :-2], partial[..., :splits, -2], partial[..., :splits, -1]
    w = torch.exp2(m - m.max(dim=-1, keepdim=True).values)
    return (w[..., None] * acc).sum(-2) / (w * s).sum(-1)[..., None]


def check(preset, D, Hq, H, B, pages, splits, seed=0):
    config = KittyConfig.from_preset(preset)
    lay = page_layout(config, D)
    g = torch.Generator().manual_seed(seed)
    P = config.page_size
    n = pages * P
    keys = torch.randn(B, n, H, D, generator=g) * (1 + 3 * torch.rand(D, generator=g))
    values = torch.randn(B, n, H, D, generator=g)
    query = torch.randn(B, Hq, D, generator=g).bfloat16()
    packed = torch.zeros(B * pages, H, lay.page_bytes, dtype=torch.uint8)
    for b in range(B):
        for p in range(pages):
            packed[b * pages + p] = reference.quantize_page(keys[b, p * P:(p + 1) * P], values[b, p * P:(p + 1) * P],
                                                            config, p * P)
    perm = torch.randperm(B * pages, generator=g)
    page_table = perm.view(B, pages).int()
    shuffled = torch.empty_like(packed)
    shuffled[perm] = packed
    seq_lens = torch.full((B,), n + 3, dtype=torch.int32)     # the window: the last P positions
    dev = "cuda"
    partial = launch(query.to(dev), shuffled.to(dev), page_table.to(dev), seq_lens.to(dev), config, splits)
    got = merged(partial.cpu(), splits)
    kq, vq = reference.dequantize_pages(packed.view(B, pages, H, -1), config, D)     # [B, pages, P, H, D]
    kq, vq = kq.reshape(B, n, H, D), vq.reshape(B, n, H, D)
    group = Hq // H
    q = query.float().view(B, H, group, D)
    scores = torch.einsum("bhgd,bthd->bhgt", q, kq) * D ** -0.5
    scores[..., :config.sink_tokens] = -torch.inf
    scores[..., n + 3 - P:] = -torch.inf
    want = torch.einsum("bhgt,bthd->bhgd", torch.softmax(scores, -1), vq).reshape(B, Hq, D)
    err = ((got - want).abs() / (want.abs() + 1e-3)).max().item()
    ok = torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    return {"preset": preset, "D": D, "Hq": Hq, "H": H, "B": B, "pages": pages, "splits": splits,
            "max_rel_err": err, "max_abs_err": (got - want).abs().max().item(), "ok": ok}


def bench(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def timing(preset, B, context, ctas_per_sm=16):
    """Milliseconds and page bandwidth of one Qwen3-8B layer's decode step (decode_kernel.py's shapes)."""
    config = KittyConfig.from_preset(preset)
    pages = context // config.page_size
    cache, page_table, stage_table = decode_kernel.random_kitty_cache(config, B, pages)
    seq_lens = torch.full((B,), context + 7, dtype=torch.int32, device="cuda")
    query = torch.randn(B, decode_kernel.NUM_HEADS, decode_kernel.HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = max(1, min(pages, triton.cdiv(ctas_per_sm * sms, B * decode_kernel.NUM_KV_HEADS)))
    t_gluon = bench(lambda: launch(query, cache.packed, page_table, seq_lens, config, splits))
    decode = lambda: attention.decode_attention(query, cache.packed, cache.stage, page_table, stage_table,  # noqa: E731
                                                seq_lens, config, cache.stage_layout, decode_kernel.HEAD_DIM ** -0.5)
    t_decode = bench(decode)                          # Gluon pages + Triton sinks and ring + merge
    supported = gdecode.supported
    gdecode.supported = lambda *args: False
    try:
        t_triton = bench(decode)                      # the Triton kernel alone
    finally:
        gdecode.supported = supported
    nbytes = B * pages * decode_kernel.NUM_KV_HEADS * cache.stage_layout.page.page_bytes
    return {"preset": preset, "B": B, "context": context, "splits": splits, "gluon_pages_ms": t_gluon * 1e3,
            "decode_ms": t_decode * 1e3, "triton_ms": t_triton * 1e3, "speedup": t_triton / t_decode,
            "gluon_pages_GBps": nbytes / t_gluon / 1e9, "decode_GBps": nbytes / t_decode / 1e9,
            "triton_GBps": nbytes / t_triton / 1e9}


if __name__ == "__main__":
    out = os.environ.get("OUT", "/tmp")
    results = {"checks": [], "timings": []}
    for args in [("kitty2", 128, 32, 8, 3, 5, 1), ("kitty2", 128, 32, 8, 3, 5, 3), ("kitty2-lite", 128, 32, 8, 2, 4, 2),
                 ("kivi2", 128, 32, 8, 2, 4, 1), ("kitty2", 128, 16, 8, 2, 3, 2), ("kitty2", 64, 12, 4, 2, 3, 1),
                 ("kitty2", 256, 8, 2, 2, 3, 2), ("kitty2", 128, 24, 8, 2, 3, 1)]:
        try:
            results["checks"].append(check(*args))
        except Exception as e:  # report and go on
            results["checks"].append({"args": args, "error": repr(e)[:500]})
        print(results["checks"][-1], flush=True)
    results["copy_GBps"] = decode_kernel.copy_bandwidth()
    print("copy", results["copy_GBps"], flush=True)
    for preset, B, context in [("kitty2", 1, 8192), ("kitty2", 16, 8192), ("kitty2", 64, 8192), ("kitty2", 256, 4096),
                               ("kitty2", 64, 32768)]:
        for cps in (16, 32):
            try:
                results["timings"].append(timing(preset, B, context, ctas_per_sm=cps) | {"ctas_per_sm": cps})
            except Exception as e:
                results["timings"].append({"args": (preset, B, context, cps), "error": repr(e)[:500]})
            print(results["timings"][-1], flush=True)
    json.dump(results, open(os.path.join(out, "gluon.json"), "w"), indent=1)
