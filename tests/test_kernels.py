"""Triton kernels against the PyTorch reference: codes bit-exact, dequantized values to float32 ulps.

On the CPU these run through TRITON_INTERPRET=1 (tests/conftest.py); on a GPU, natively.
"""

import pytest
import torch

from kitty_vllm import reference as R
from kitty_vllm.config import KittyConfig
from kitty_vllm.kernels import dequantize_pages, quantize_pages
from kitty_vllm.layout import page_layout

HEAD_DIMS = [64, 128, 256]
# Head sizes whose quarters (the channels of one 2-bit plane) the kernels pad to a power of two
# (common.padded_sizes), each with a preset whose boost count the layout can split (a multiple of 4):
# boosted ranks padded (kitty2 at 80, 96, 112, 192; kitty2-lite at 96, 160) or none (kivi2).
PADDED_CASES = [(80, "kitty2"), (80, "kivi2"), (96, "kitty2"), (96, "kitty2-lite"), (112, "kitty2"),
                (160, "kitty2-lite"), (192, "kitty2")]
PRESETS = ["kitty2", "kitty2-lite", "kivi2"]
POLICIES = ["magnitude", "variance", "range", "random"]
DTYPES = [torch.float16, torch.bfloat16]
NUM_KV_HEADS = 2
# Page 0 holds the sinks; block ids are scattered and out of order.
FIRST_POSITIONS = [0, 128, 384]
BLOCK_IDS = [5, 0, 3]
NUM_BLOCKS = 7
BOUNDARY = 1e-5


def make_pages(head_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (len(FIRST_POSITIONS), 128, NUM_KV_HEADS, head_dim)
    magnitude = torch.ones(head_dim)
    magnitude[torch.randperm(head_dim, generator=g)[: head_dim // 16]] = 10 + 20 * torch.rand(head_dim // 16, generator=g)
    keys = (torch.randn(shape, generator=g) + 0.3) * magnitude
    keys[0, :32] *= 50  # sinks with huge norms must not disturb page 0
    values = torch.randn(shape, generator=g)
    return keys.to(dtype).to(device), values.to(dtype).to(device)


def near_boundary(x, minimum, scale):
    """bool: the unrounded code of x lies within BOUNDARY of a rounding boundary."""
    u = (x.float() - minimum.float()) / torch.where(scale.float() > 0, scale.float(), 1.0) + 0.5
    return (u - u.round()).abs() < BOUNDARY


def compare_page(got, want, keys, values, config, head_dim):
    """Assert two packed pages [H, page_bytes] agree; codes may differ only at rounding boundaries.
    Returns how many codes differ."""
    layout = page_layout(config, head_dim)
    g, w = layout.views(got), layout.views(want)
    for name in ("boost_index", "key_scale", "key_min", "value_scale", "value_min"):
        assert torch.equal(g[name], w[name]), name
    differ = 0
    key_codes = R.unpack_key_codes(g), R.unpack_key_codes(w)
    value_codes = R.unpack_2bit(g["value_codes"]).long(), R.unpack_2bit(w["value_codes"]).long()
    x_keys, x_values = keys.transpose(0, 1), values.transpose(0, 1)   # [H, P, D]
    for (a, b), x, mn, sc in (
            (key_codes, x_keys, w["key_min"][:, None, :], w["key_scale"][:, None, :]),
            (value_codes, x_values, w["value_min"][..., None], w["value_scale"][..., None])):
        mismatch = a != b
        assert near_boundary(x, mn, sc)[mismatch].all(), "codes differ away from a rounding boundary"
        assert ((a - b).abs()[mismatch] == 1).all()
        differ += int(mismatch.sum())
    return differ


def run_and_compare(config, head_dim, dtype, device, seed=0, pages=None):
    keys, values = make_pages(head_dim, dtype, device, seed) if pages is None else pages
    layout = page_layout(config, head_dim)
    cache = torch.zeros(NUM_BLOCKS, NUM_KV_HEADS, layout.page_bytes, dtype=torch.uint8, device=device)
    first = torch.tensor(FIRST_POSITIONS, dtype=torch.int32, device=device)
    blocks = torch.tensor(BLOCK_IDS, dtype=torch.int32, device=device)
    quantize_pages(keys, values, first, blocks, cache, config)
    differ = 0
    for i, (pos, block) in enumerate(zip(FIRST_POSITIONS, BLOCK_IDS)):
        want = R.quantize_page(keys[i].cpu(), values[i].cpu(), config, pos)
        differ += compare_page(cache[block].cpu(), want, keys[i].cpu(), values[i].cpu(), config, head_dim)
    untouched = sorted(set(range(NUM_BLOCKS)) - set(BLOCK_IDS))
    assert not cache[untouched].any(), "wrote outside the target blocks"
    print(f"[{config.boost_policy} boost={layout.num_boost} D={head_dim} {dtype}] codes on a rounding "
          f"boundary that differ: {differ}")
    return cache, blocks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_quantize_matches_reference(kernel_device, head_dim, preset, dtype):
    run_and_compare(KittyConfig.from_preset(preset), head_dim, dtype, kernel_device)


@pytest.mark.parametrize("head_dim, preset", PADDED_CASES)
def test_quantize_padded_head_sizes_match_reference(kernel_device, head_dim, preset):
    """Pages stay at the true head size and the padded columns write no byte: a stray one would land in
    the next token's row or the next section, which are compared, as are the other blocks."""
    run_and_compare(KittyConfig.from_preset(preset), head_dim, torch.bfloat16, kernel_device)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS + [96])
def test_quantize_policies_match_reference(kernel_device, head_dim, policy):
    config = KittyConfig.from_preset("kitty2").replace(boost_policy=policy)
    run_and_compare(config, head_dim, torch.float16, kernel_device, seed=1)


@pytest.mark.parametrize("policy", ["magnitude", "variance", "range"])
@pytest.mark.parametrize("head_dim", [96, 128])
def test_boost_ties_go_to_the_lower_channel(kernel_device, head_dim, policy):
    """Channels of equal score are boosted lowest first, as the reference's stable sort orders them: in
    page 1 every channel is the same constant (all scores equal), in page 2 more channels than are boosted
    copy or negate the largest channel (equal magnitude, variance and range)."""
    config = KittyConfig.from_preset("kitty2").replace(boost_policy=policy)
    keys, values = make_pages(head_dim, torch.float32, "cpu", seed=2)
    keys[1] = 0.75
    top = keys[2].abs().sum(dim=0).argmax(dim=-1)                               # [H]: each head's largest channel
    largest = keys[2].gather(-1, top[None, :, None].expand(128, -1, 1))         # [P, H, 1]
    copies = torch.arange(head_dim - 2 * page_layout(config, head_dim).num_boost, head_dim)
    keys[2, :, :, copies] = largest * torch.where(copies % 3 == 0, -1.0, 1.0)
    cache, blocks = run_and_compare(config, head_dim, torch.float16, kernel_device,
                                    pages=(keys.half().to(kernel_device), values.half().to(kernel_device)))
    boost = page_layout(config, head_dim).num_boost
    index = page_layout(config, head_dim).views(cache[blocks[1]].cpu())["boost_index"]
    assert torch.equal(index.long(), torch.arange(boost).expand(NUM_KV_HEADS, -1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim, preset", [(d, p) for d in HEAD_DIMS for p in PRESETS] + PADDED_CASES)
def test_dequantize_matches_reference(kernel_device, head_dim, preset, dtype):
    """Pages dequantized into rows out of order: the reference's float32 values in the output dtype,
    and no other row written."""
    config = KittyConfig.from_preset(preset)
    keys, values = make_pages(head_dim, torch.float16, "cpu")
    pages = torch.stack([R.quantize_page(keys[i], values[i], config, pos) for i, pos in enumerate(FIRST_POSITIONS)])
    cache = torch.zeros(NUM_BLOCKS, NUM_KV_HEADS, pages.shape[-1], dtype=torch.uint8)
    cache[BLOCK_IDS] = pages
    rows = [300, 0, 140]
    got_keys, got_values = torch.zeros(2, 450, NUM_KV_HEADS, head_dim, dtype=dtype, device=kernel_device)
    dequantize_pages(cache.to(kernel_device), torch.tensor(BLOCK_IDS, dtype=torch.int32, device=kernel_device),
                     torch.tensor(rows, device=kernel_device), got_keys, got_values, config)
    for got, want_pages in zip((got_keys, got_values), R.dequantize_pages(pages, config, head_dim)):
        want = torch.zeros(450, NUM_KV_HEADS, head_dim, dtype=dtype)
        for page, row in zip(want_pages, rows):
            want[row:row + 128] = page.to(dtype)
        torch.testing.assert_close(got.cpu(), want)


def test_launchers_reject_bad_shapes(kernel_device):
    config = KittyConfig.from_preset("kitty2")
    layout = page_layout(config, 128)
    cache = torch.zeros(2, 1, layout.page_bytes, dtype=torch.uint8, device=kernel_device)
    keys = torch.zeros(1, 64, 1, 128, device=kernel_device)
    one = torch.zeros(1, dtype=torch.int32, device=kernel_device)
    with pytest.raises(ValueError, match=r"\[num_pages, 128, 1, 128\]"):
        quantize_pages(keys, keys, one, one, cache, config)
    with pytest.raises(ValueError, match="block_ids must be int32"):
        quantize_pages(torch.zeros(1, 128, 1, 128, device=kernel_device), torch.zeros(1, 128, 1, 128, device=kernel_device),
                       one, one.long(), cache, config)


@pytest.mark.cuda
def test_block_offsets_beyond_int32():
    """A block whose byte offset exceeds 2**31 is written and read where it should be."""
    config = KittyConfig.from_preset("kitty2")
    layout = page_layout(config, 64)
    num_blocks = 2 ** 31 // layout.page_bytes + 2
    cache = torch.zeros(num_blocks, 1, layout.page_bytes, dtype=torch.uint8, device="cuda")
    keys = torch.randn(1, 128, 1, 64, device="cuda", dtype=torch.float16)
    values = torch.randn(1, 128, 1, 64, device="cuda", dtype=torch.float16)
    block = torch.tensor([num_blocks - 1], dtype=torch.int32, device="cuda")
    quantize_pages(keys, values, torch.tensor([128], dtype=torch.int32, device="cuda"), block, cache, config)
    want = R.quantize_page(keys[0].cpu(), values[0].cpu(), config, 128)
    assert torch.equal(cache[-1].cpu(), want)
    assert not cache[: num_blocks - 1].any()
