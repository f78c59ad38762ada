"""The kitty2 format in plain PyTorch (float32 math): the oracle for every kernel and the CPU path.

Rounding rule, shared with the kernels: ``code = clamp(floor((x - min) / scale + 0.5), 0, levels)``
with ``min`` and ``scale`` first rounded to float16 (the stored values), and code 0 where scale is 0.

Cache schedule, shared with the vLLM backend. Pages cover tokens ``[j * P, (j + 1) * P)``. A page is
quantized as soon as its last token is stored (its tokens stay in full precision in the ring, which
holds each request's newest ``W = value_window = P`` tokens), so the query at position ``p`` sees
Key/Value ``t`` as

* the original (full precision) if ``t < sink_tokens`` or ``p - t < W`` (the window: the ring);
* dequantized otherwise (its page is complete at ``p``, since ``t <= p - P``).

Sink tokens never enter page statistics: they are excluded from page 0's min/max and boost scores.

That rule alone is ``exact_prefill`` (KittyConfig): it depends only on positions, so prefill, chunked
prefill and decode all see the same cache. By default the queries of a step of several tokens (a prefill
or a prefill chunk) read the pages complete before the step, ``(t // P + 1) * P <= c`` for the step's
first position ``c``, dequantized (sinks excepted), and everything else in the original: the unfinished
page before the step and the step's own tokens, as vLLM's other formats prefill. So a step that starts on
a page boundary, as a prefix-cache hit does (kitty_vllm.block_manager), needs no full-precision token
from before it but the sinks. A one-token step (decode) follows the rule alone in both modes, and so
does a verification step of speculative decoding (at most ``1 + draft_tokens`` tokens), which stands
for that many decodes (KittyConfig.reads_as_decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import CODES_PER_BYTE, PageLayout, page_layout

KEY_LEVELS = 3
BOOST_LEVELS = 15
VALUE_LEVELS = 3
# Multiplier of the "random" policy's hash (Knuth's multiplicative hash): odd, so the 32-bit scores
# of distinct channels differ and the choice has no ties.
RANDOM_POLICY_MULTIPLIER = 2654435761


@dataclass
class KeyCodes:
    codes: torch.Tensor        # int64 [H, P, D], 0..15 on boosted channels, 0..3 elsewhere
    boost_index: torch.Tensor  # int64 [H, K] ascending channel ids
    scale: torch.Tensor        # float16 [H, D]
    minimum: torch.Tensor      # float16 [H, D]


@dataclass
class ValueCodes:
    codes: torch.Tensor        # int64 [H, P, D], 0..3
    scale: torch.Tensor        # float16 [H, P]
    minimum: torch.Tensor      # float16 [H, P]


def quantize(x: torch.Tensor, minimum: torch.Tensor, scale: torch.Tensor,
             levels: torch.Tensor | int) -> torch.Tensor:
    """Codes of ``x`` for the float16 ``minimum``/``scale`` (broadcast against ``x``)."""
    mn = minimum.float()
    sc = scale.float()
    safe = torch.where(sc > 0, sc, torch.ones_like(sc))
    codes = torch.floor((x.float() - mn) / safe + 0.5)
    codes = torch.where(sc > 0, codes, torch.zeros_like(codes))
    return torch.minimum(codes.clamp_min(0), torch.as_tensor(levels, dtype=codes.dtype)).long()


def dequantize(codes: torch.Tensor, minimum: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return minimum.float() + codes.float() * scale.float()


def boost_scores(keys: torch.Tensor, valid: torch.Tensor, policy: str) -> torch.Tensor:
    """Per-channel boost scores of a page: float64 [H, D] from keys [H, P, D] and valid rows [P].

    magnitude: sum of |K| over valid tokens (the same order as their mean); variance: sum of squared
    deviations from the channel mean (the same order as the variance); range: max - min over valid
    tokens, the channel's quantization step, so its squared error, up to a constant factor; random: a fixed
    hash of the channel id. Sums run in float64 so that the kernels, which add in another order, rank alike.
    """
    x = keys.float().double()
    rows = valid.view(1, -1, 1)
    if policy == "magnitude":
        return torch.where(rows, x.abs(), 0.0).sum(dim=1)
    if policy == "range":
        return torch.where(rows, x, -torch.inf).amax(dim=1) - torch.where(rows, x, torch.inf).amin(dim=1)
    if policy == "variance":
        mean = torch.where(rows, x, 0.0).sum(dim=1, keepdim=True) / valid.sum()
        return torch.where(rows, (x - mean) ** 2, 0.0).sum(dim=1)
    if policy == "random":
        channel = torch.arange(keys.shape[-1], dtype=torch.int64) + 1
        hashed = (channel * RANDOM_POLICY_MULTIPLIER) & 0xFFFFFFFF
        return hashed.double().expand(keys.shape[0], -1).contiguous()
    raise ValueError(f"unknown boost policy {policy!r}")


def select_boost_channels(scores: torch.Tensor, num_boost: int) -> torch.Tensor:
    """The ``num_boost`` highest-scoring channels per head, ascending; ties go to the lower channel."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.sort(order[..., :num_boost], dim=-1).values


def quantize_keys_per_channel(keys: torch.Tensor, num_boost: int, policy: str,
                              valid: torch.Tensor) -> KeyCodes:
    """Quantize one page of Keys ``[H, P, D]``; rows where ``valid`` [P] is False (sinks) are ignored
    by the statistics and the boost choice."""
    x = keys.float()
    rows = valid.view(1, -1, 1)
    mx = torch.where(rows, x, -torch.inf).amax(dim=1)
    mn = torch.where(rows, x, torch.inf).amin(dim=1)
    boost_index = select_boost_channels(boost_scores(keys, valid, policy), num_boost)
    levels = torch.full_like(mx, KEY_LEVELS)
    levels.scatter_(1, boost_index, BOOST_LEVELS)
    scale = ((mx - mn) / levels).half()
    minimum = mn.half()
    codes = quantize(x, minimum[:, None, :], scale[:, None, :], levels[:, None, :])
    return KeyCodes(codes=codes, boost_index=boost_index, scale=scale, minimum=minimum)


def quantize_values_per_token(values: torch.Tensor) -> ValueCodes:
    """Quantize one page of Values ``[H, P, D]`` per token, over head_dim."""
    x = values.float()
    mx = x.amax(dim=-1)
    mn = x.amin(dim=-1)
    scale = ((mx - mn) / VALUE_LEVELS).half()
    minimum = mn.half()
    codes = quantize(x, minimum[..., None], scale[..., None], VALUE_LEVELS)
    return ValueCodes(codes=codes, scale=scale, minimum=minimum)


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack 2-bit codes ``[..., C]`` into uint8 ``[..., C / 4]``, planar (see kitty_vllm.layout)."""
    quarter = codes.shape[-1] // CODES_PER_BYTE
    planes = codes.long().reshape(*codes.shape[:-1], CODES_PER_BYTE, quarter)
    shifts = (2 * torch.arange(CODES_PER_BYTE)).view(CODES_PER_BYTE, 1)
    return (planes << shifts).sum(dim=-2).to(torch.uint8)


def unpack_2bit(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`: uint8 ``[..., C / 4]`` to uint8 codes ``[..., C]``."""
    shifts = (2 * torch.arange(CODES_PER_BYTE, dtype=torch.uint8, device=packed.device)).view(CODES_PER_BYTE, 1)
    planes = (packed.unsqueeze(-2) >> shifts) & 3
    return planes.reshape(*packed.shape[:-1], -1)


def page_valid_rows(layout: PageLayout, first_position: int) -> torch.Tensor:
    """bool [P]: the rows of the page starting at ``first_position`` that are not sink tokens."""
    return torch.arange(layout.page_size) + first_position >= layout.sink_tokens


def quantize_page(keys: torch.Tensor, values: torch.Tensor, config: KittyConfig,
                  first_position: int) -> torch.Tensor:
    """Quantize and pack one full page: keys/values ``[P, H, D]`` to uint8 ``[H, page_bytes]``."""
    num_tokens, num_heads, head_dim = keys.shape
    layout = page_layout(config, head_dim)
    if num_tokens != layout.page_size or values.shape != keys.shape:
        raise ValueError(f"expected keys and values [{layout.page_size}, H, D], got "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    kc = quantize_keys_per_channel(keys.transpose(0, 1), layout.num_boost, config.boost_policy,
                                   page_valid_rows(layout, first_position))
    vc = quantize_values_per_token(values.transpose(0, 1))
    page = torch.zeros(num_heads, layout.page_bytes, dtype=torch.uint8)
    view = layout.views(page)
    view["key_low"].copy_(pack_2bit(kc.codes & 3))
    high = torch.gather(kc.codes, 2, kc.boost_index[:, None, :].expand(-1, num_tokens, -1)) >> 2
    view["key_high"].copy_(pack_2bit(high))
    view["boost_index"].copy_(kc.boost_index.to(torch.uint8))
    view["key_scale"].copy_(kc.scale)
    view["key_min"].copy_(kc.minimum)
    view["value_codes"].copy_(pack_2bit(vc.codes))
    view["value_scale"].copy_(vc.scale)
    view["value_min"].copy_(vc.minimum)
    return page


def unpack_key_codes(view: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 4/2-bit Key codes (int64) ``[..., P, D]`` of packed pages (``view`` from ``PageLayout.views``)."""
    codes = unpack_2bit(view["key_low"]).long()
    if view["boost_index"].shape[-1]:
        high = unpack_2bit(view["key_high"]).long() << 2
        index = view["boost_index"].long().unsqueeze(-2).expand_as(high)
        codes = codes.scatter_add(-1, index, high)
    return codes


def dequantize_pages(pages: torch.Tensor, config: KittyConfig,
                     head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed pages uint8 ``[..., H, page_bytes]`` to float32 keys and values ``[..., P, H, D]``."""
    view = page_layout(config, head_dim).views(pages)
    keys = dequantize(unpack_key_codes(view), view["key_min"].unsqueeze(-2),
                      view["key_scale"].unsqueeze(-2))
    values = dequantize(unpack_2bit(view["value_codes"]), view["value_min"].unsqueeze(-1),
                        view["value_scale"].unsqueeze(-1))
    return keys.transpose(-3, -2), values.transpose(-3, -2)


def hadamard(dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix, float32 [dim, dim]: symmetric, ``H @ H = I``, so it undoes
    itself (KittyConfig.value_rotation). ``dim`` must be a power of two."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"head_dim={dim}: the Hadamard rotation needs a power of two")
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < dim:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)])
    return (matrix / dim ** 0.5).to(torch.float32).to(device)


def rotate(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``x`` [..., D] times ``rotation`` [D, D] in float32 (float64 for float64 ``x``), back in x's dtype
    (None: ``x`` itself). With value_rotation, Values go in through it before they are stored and the
    attention output comes out through it (the matrix being its own inverse)."""
    if rotation is None:
        return x
    dtype = torch.promote_types(x.dtype, torch.float32)
    return (x.to(dtype) @ rotation.to(dtype)).to(x.dtype)


def value_rotation(config: KittyConfig, head_dim: int, device: torch.device | str | None = None
                   ) -> torch.Tensor | None:
    """The matrix of ``config.value_rotation`` for ``head_dim`` (None: no rotation)."""
    return hadamard(head_dim, device) if config.value_rotation == "hadamard" else None


def quantized_sequence(keys: torch.Tensor, values: torch.Tensor, config: KittyConfig,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every complete page of a sequence ``[N, H, D]``, quantized and dequantized (float32).

    Rows of incomplete pages are left as the input; sink rows are dequantized too (they are never
    read from the page, see :func:`quantized_mask`).
    """
    page = config.page_size
    keys_q, values_q = keys.float().clone(), values.float().clone()
    for start in range(0, keys.shape[0] - page + 1, page):
        packed = quantize_page(keys[start:start + page], values[start:start + page], config, start)
        keys_q[start:start + page], values_q[start:start + page] = dequantize_pages(
            packed, config, keys.shape[-1])
    return keys_q, values_q


def quantized_mask(query_positions: torch.Tensor, num_keys: int, config: KittyConfig) -> torch.Tensor:
    """bool [Tq, N]: True where a step's queries at ``query_positions`` read key ``t`` from a quantized
    page (the cache schedule, module docstring)."""
    t = torch.arange(num_keys)
    if config.reads_as_decode(len(query_positions)):
        quantized = query_positions[:, None] - t >= config.value_window
    else:
        page_end = (t // config.page_size + 1) * config.page_size
        quantized = (page_end <= query_positions.min()).expand(len(query_positions), -1)
    return quantized & (t >= config.sink_tokens)


def reference_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        config: KittyConfig, query_positions: torch.Tensor | None = None,
                        scale: float | None = None, soft_cap: float = 0.0,
                        sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of one sequence over its kitty cache, float32.

    query [Tq, Hq, D] at ``query_positions`` (default: the last Tq positions); keys/values
    [N, Hkv, D] hold the sequence's full-precision K (after RoPE) and V for positions 0..N-1. The
    queries are one step: each sees the cache as it stands at its position (module docstring). Hq is a multiple of Hkv.
    ``soft_cap`` and ``sinks``: as :func:`schedule_attention`. With ``config.value_rotation`` the Values are
    stored rotated and the output rotated back, as the backend does around the cache.
    """
    num_keys = keys.shape[0]
    if query_positions is None:
        query_positions = torch.arange(num_keys - query.shape[0], num_keys)
    rotation = value_rotation(config, keys.shape[-1], keys.device)
    values = rotate(values, rotation)
    keys_q, values_q = quantized_sequence(keys, values, config)
    return rotate(schedule_attention(query, keys, values, keys_q, values_q, query_positions, config, scale, soft_cap,
                                     sinks), rotation)


def schedule_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       keys_q: torch.Tensor, values_q: torch.Tensor, query_positions: torch.Tensor,
                       config: KittyConfig, scale: float | None = None, soft_cap: float = 0.0,
                       sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention that reads each key/value in the form the cache schedule gives the query.

    query [Tq, Hq, D] at ``query_positions`` [Tq]; keys/values [N, Hkv, D] full precision, keys_q /
    values_q [N, Hkv, D] dequantized (only rows of complete pages are read from them). float32 result
    [Tq, Hq, D].

    Two softmax options of some models: ``soft_cap`` > 0 caps the scaled scores to
    ``soft_cap * tanh(score / soft_cap)`` before the softmax (Gemma 2); ``sinks`` [Hq] are learned
    attention sinks (gpt-oss): one more logit per query head in every softmax's denominator, with no value,
    so a row's weights add up to less than 1.
    """
    num_keys, num_kv_heads, head_dim = keys.shape
    num_queries, num_heads, _ = query.shape
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    # Query heads grouped by their KV head: [Hkv, group * Tq, D], rows ordered (group, query).
    q = query.float().reshape(num_queries, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    q = q.reshape(num_kv_heads, group * num_queries, head_dim)

    def per_kv_head(x: torch.Tensor) -> torch.Tensor:                   # [N, Hkv, D] -> [Hkv, N, D]
        return x.float().transpose(0, 1)

    use_quantized = quantized_mask(query_positions.cpu(), num_keys, config).to(query.device).repeat(group, 1)
    scores = torch.where(use_quantized, q @ per_kv_head(keys_q).transpose(1, 2),
                         q @ per_kv_head(keys).transpose(1, 2)) * scale
    if soft_cap:
        scores = soft_cap * torch.tanh(scores / soft_cap)
    causal = (torch.arange(num_keys, device=query.device)[None, :] <= query_positions[:, None]).repeat(group, 1)
    scores = scores.masked_fill(~causal, -torch.inf)
    if sinks is not None:
        # The sink of query head h = kv_head * group + g, as a last column of its rows (ordered (g, query)).
        sink = sinks.float().to(query.device).view(num_kv_heads, group, 1).repeat_interleave(num_queries, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = (torch.where(use_quantized, probs, 0.0) @ per_kv_head(values_q)
           + torch.where(use_quantized, 0.0, probs) @ per_kv_head(values))   # [Hkv, group * Tq, D]
    return out.reshape(num_kv_heads, group, num_queries, head_dim).permute(2, 0, 1, 3).reshape(
        num_queries, num_heads, head_dim)
