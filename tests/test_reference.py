import pytest
import torch

from kitty_vllm import reference as R
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import page_layout

KITTY2 = KittyConfig.from_preset("kitty2")


def test_pack_unpack_round_trip_is_bit_exact():
    codes = torch.randint(0, 4, (5, 7, 128))
    packed = R.pack_2bit(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 7, 32)
    assert torch.equal(R.unpack_2bit(packed).long(), codes)


def test_packing_is_planar():
    codes = torch.zeros(8, dtype=torch.long)
    codes[1], codes[6] = 3, 2   # column 1 -> byte 1 bits 0-1; column 6 -> byte 0 bits 6-7
    assert R.pack_2bit(codes).tolist() == [2 << 6, 3]


@pytest.mark.parametrize("preset", ["kitty2", "kitty2-lite", "kivi2"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_page_round_trip(preset, head_dim):
    config = KittyConfig.from_preset(preset)
    layout = page_layout(config, head_dim)
    keys = torch.randn(128, 2, head_dim) * torch.linspace(0.5, 20, head_dim)
    values = torch.randn(128, 2, head_dim)
    page = R.quantize_page(keys.half(), values.half(), config, first_position=256)
    view = layout.views(page)
    kc = R.quantize_keys_per_channel(keys.half().transpose(0, 1), layout.num_boost, "magnitude",
                                     torch.ones(128, dtype=torch.bool))
    assert torch.equal(R.unpack_key_codes(view), kc.codes)
    assert torch.equal(view["boost_index"].long(), kc.boost_index)
    keys_hat, values_hat = R.dequantize_pages(page, config, head_dim)
    key_step = view["key_scale"].float()                   # [H, D]
    assert ((keys_hat - keys.half().float()).abs() <= key_step[None] / 2 + 1e-2 * key_step[None] + 1e-3).all()
    value_step = view["value_scale"].float().T[..., None]  # [P, H, 1]
    assert ((values_hat - values.half().float()).abs() <= value_step / 2 + 1e-2 * value_step + 1e-3).all()


def test_magnitude_policy_boosts_the_outlier_channels():
    keys = torch.randn(2, 128, 128)
    outliers = torch.tensor([3, 40, 77, 100])
    keys[:, :, outliers] *= 25
    kc = R.quantize_keys_per_channel(keys, 32, "magnitude", torch.ones(128, dtype=torch.bool))
    for head in range(2):
        assert set(outliers.tolist()) <= set(kc.boost_index[head].tolist())
        assert kc.codes[head][:, outliers].max() > 3
    not_boosted = torch.ones(128, dtype=torch.bool)
    not_boosted[kc.boost_index[0]] = False
    assert kc.codes[0][:, not_boosted].max() <= 3


def test_policies_choose_differently_and_random_is_fixed():
    keys = torch.randn(1, 128, 64)
    keys[..., 5] = 30 + 0.1 * keys[..., 5]   # largest magnitude, smallest variance
    keys[..., 9] *= 10      # largest variance
    valid = torch.ones(128, dtype=torch.bool)
    pick = {p: R.quantize_keys_per_channel(keys, 4, p, valid).boost_index[0].tolist()
            for p in ("magnitude", "variance", "random")}
    assert 5 in pick["magnitude"] and 9 in pick["variance"] and 5 not in pick["variance"]
    assert pick["random"] == R.quantize_keys_per_channel(-keys, 4, "random", valid).boost_index[0].tolist()


def test_sinks_stay_out_of_page_statistics():
    keys = torch.randn(128, 1, 64)
    values = torch.randn(128, 1, 64)
    keys[:32] *= 1000
    page0 = R.quantize_page(keys, values, KITTY2, first_position=0)
    later = R.quantize_page(keys, values, KITTY2, first_position=128)
    scale0 = page_layout(KITTY2, 64).views(page0)["key_scale"].float()
    scale1 = page_layout(KITTY2, 64).views(later)["key_scale"].float()
    assert scale0.max() < 10 < scale1.max()


SMALL = KittyConfig(page_size=16, value_window=16, sink_tokens=4)
SMALL_EXACT = SMALL.replace(exact_prefill=True)


def test_quantized_mask_follows_the_schedule():
    mask = R.quantized_mask(torch.tensor([14, 15, 40, 47]), 48, SMALL_EXACT)
    assert not mask[:2].any()                                   # page 0 full at 15, but in the window
    assert mask[2, 4:25].all() and not mask[2, :4].any()        # 40 - t >= 16; sinks stay fp
    assert not mask[2, 25:].any()                               # the window: 25..40
    assert mask[3, 4:32].all() and not mask[3, 32:].any()       # page 1 leaves the window whole at 47


def test_default_mask_reads_the_step_in_full_precision():
    """A step of queries 36..50: keys from 36 on are the step's own, read in full precision, and so is
    the rest of page 2 (32..35), unfinished before the step; pages complete before the step are read
    quantized. With exact_prefill each query at p reads keys up to p - 16 quantized, the step's own
    included."""
    positions = torch.arange(36, 51)
    mask = R.quantized_mask(positions, 51, SMALL)
    assert not mask[:, 32:].any() and not mask[:, :4].any()     # page 2 and the step's own keys; sinks
    assert mask[:, 4:32].all()                                  # pages 0 and 1, complete before the step
    exact = R.quantized_mask(positions, 51, SMALL_EXACT)
    t = torch.arange(51)
    assert torch.equal(exact, (positions[:, None] - t >= 16) & (t >= 4))


def test_attention_without_full_pages_is_exact():
    q, k, v = torch.randn(5, 4, 64), torch.randn(100, 2, 64), torch.randn(100, 2, 64)
    out = R.reference_attention(q, k, v, KITTY2)
    scores = q.transpose(0, 1) @ k.repeat_interleave(2, 1).permute(1, 2, 0) / 8
    causal = torch.arange(100)[None] <= torch.arange(95, 100)[:, None]
    expected = torch.softmax(scores.masked_fill(~causal, -torch.inf), -1) @ v.repeat_interleave(2, 1).transpose(0, 1)
    torch.testing.assert_close(out, expected.transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [64, 128, 256])
def test_hadamard_is_symmetric_and_its_own_inverse(dim):
    h = R.hadamard(dim)
    assert torch.equal(h, h.T) and torch.equal(h.abs(), torch.full_like(h, dim ** -0.5))
    torch.testing.assert_close(h @ h, torch.eye(dim), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="head_dim=96: the Hadamard rotation needs a power of two"):
        R.hadamard(96)


def test_value_rotation_quantizes_rotated_values_and_rotates_the_output_back():
    """With value_rotation=hadamard, reference_attention is kitty2's attention over Values V H, its output
    times H: exact where nothing is quantized, different where pages are."""
    rotated = KITTY2.replace(value_rotation="hadamard")
    h = R.hadamard(64)
    q, k, v = torch.randn(5, 4, 64), torch.randn(300, 2, 64), torch.randn(300, 2, 64)
    out = R.reference_attention(q, k, v, rotated)
    torch.testing.assert_close(out, R.reference_attention(q, k, v @ h, KITTY2) @ h)
    assert not torch.allclose(out, R.reference_attention(q, k, v, KITTY2), atol=1e-3)
    short = slice(0, 100)   # no complete page: full precision throughout, the rotation cancels
    torch.testing.assert_close(R.reference_attention(q, k[short], v[short], rotated),
                               R.reference_attention(q, k[short], v[short], KITTY2), rtol=1e-5, atol=1e-5)
    assert R.value_rotation(KITTY2, 64) is None and R.rotate(v, None) is v


def test_soft_cap_and_sinks_follow_their_definitions():
    """Soft-capping (Gemma 2): the scaled scores become cap * tanh(score / cap) before the softmax.
    Learned sinks (gpt-oss): sum_t exp(s_t - m) v_t / (sum_t exp(s_t - m) + exp(sink_h - m)), per query
    head h, written out here with the max m of the row and its sink."""
    q, k, v = torch.randn(5, 4, 64) * 3, torch.randn(100, 2, 64), torch.randn(100, 2, 64)
    sinks = torch.tensor([-1.0, 0.0, 2.0, 5.0])
    out = R.reference_attention(q, k, v, KITTY2, soft_cap=1.5, sinks=sinks)
    scores = q.transpose(0, 1) @ k.repeat_interleave(2, 1).permute(1, 2, 0) / 8          # [Hq, Tq, N]
    scores = 1.5 * torch.tanh(scores / 1.5)
    causal = torch.arange(100)[None] <= torch.arange(95, 100)[:, None]
    scores = scores.masked_fill(~causal, -torch.inf)
    top = torch.maximum(scores.amax(-1, keepdim=True), sinks[:, None, None])
    weights = torch.exp(scores - top)
    expected = weights @ v.repeat_interleave(2, 1).transpose(0, 1) / (weights.sum(-1, keepdim=True)
                                                                       + torch.exp(sinks[:, None, None] - top))
    torch.testing.assert_close(out, expected.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_exact_attention_depends_only_on_positions():
    """With exact_prefill, prefill in one call equals prefill in chunks and decode: what makes chunked
    prefill and prefix caching exact."""
    q, k, v = torch.randn(70, 4, 32), torch.randn(70, 2, 32), torch.randn(70, 2, 32)
    whole = R.reference_attention(q, k, v, SMALL_EXACT, query_positions=torch.arange(70))
    for start, end in [(0, 13), (13, 48), (48, 69), (69, 70)]:
        part = R.reference_attention(q[start:end], k[:end], v[:end], SMALL_EXACT)
        torch.testing.assert_close(part, whole[start:end], rtol=1e-5, atol=1e-5)


def test_default_attention_of_a_step_reads_earlier_pages_quantized():
    """A step 32..59: plain causal attention over pages 0 and 1 quantized (sinks aside) and everything
    from 32 on in full precision. Under exact_prefill a query at p reads keys up to p - 16 quantized
    instead: the same keys only at 47."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, 32, generator=g) for n, h in [(28, 4), (60, 2), (60, 2)])
    out = R.reference_attention(q, k, v, SMALL)
    keys_q, values_q = R.quantized_sequence(k, v, SMALL)
    earlier = (torch.arange(60) >= SMALL.sink_tokens) & (torch.arange(60) < 32)
    mixed_k = torch.where(earlier[:, None, None], keys_q, k)
    mixed_v = torch.where(earlier[:, None, None], values_q, v)
    plain = KittyConfig(page_size=64, value_window=64, sink_tokens=0)   # no page fills: plain attention
    torch.testing.assert_close(out, R.reference_attention(q, mixed_k, mixed_v, plain), rtol=1e-5, atol=1e-5)
    exact = R.reference_attention(q, k, v, SMALL_EXACT)
    same = torch.arange(32, 60) == 47
    assert torch.equal(out[same], exact[same])
    assert (out - exact)[~same].abs().amax(dim=(1, 2)).gt(0).all()


@pytest.mark.parametrize("position", [10, 15, 16, 47, 69])
def test_a_decode_step_is_the_same_in_both_modes(position):
    """One query, also where its own token completes a page (15, 47): that page stays in its window, in
    full precision, and at 47 page 1 (16..31) has just left it whole."""
    q, k, v = torch.randn(1, 4, 32), torch.randn(position + 1, 2, 32), torch.randn(position + 1, 2, 32)
    assert torch.equal(R.reference_attention(q, k, v, SMALL), R.reference_attention(q, k, v, SMALL_EXACT))
