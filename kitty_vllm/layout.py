"""The kitty page layout: the one place that computes where each part of a page lives.

A page holds ``page_size`` tokens of one KV head, as consecutive sections, each starting on a 16-byte
boundary (so kernels can use vector loads):

    key_low      uint8   [page_size, head_dim / 4]    low 2 bits of every Key channel
    key_high     uint8   [page_size, boost / 4]       high 2 bits of the boosted channels only
    boost_index  uint8   [boost]                      the boosted channels, ascending
    key_scale    float16 [head_dim]                   per channel: (max - min) / levels
    key_min      float16 [head_dim]
    value_codes  uint8   [page_size, head_dim / 4]    2-bit Value codes
    value_scale  float16 [page_size]                  per token
    value_min    float16 [page_size]

2-bit codes are packed four to a byte, *planar* within a row: the code of column ``c`` of a row of
``C`` columns sits in byte ``c % (C / 4)`` at bit ``2 * (c // (C / 4))``. Unpacking a row is then four
shift-and-mask passes, each yielding a contiguous quarter of the columns, with no interleaving.
A boosted channel's 4-bit code is ``low | high << 2``, its ``high`` stored at the channel's rank in
``boost_index``.

A vLLM block of a layer holds one page per KV head: ``[num_kv_heads, page_bytes]``.

    python -m kitty_vllm.layout --head-dim 128 --preset kitty2
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from kitty_vllm.config import PRESETS, KittyConfig, KittyConfigError

ALIGNMENT = 16
CODES_PER_BYTE = 4


@dataclass(frozen=True)
class Section:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count * torch.empty((), dtype=self.dtype).element_size()

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class PageLayout:
    """Byte layout of one page of one KV head. Build it with :func:`page_layout`."""

    page_size: int
    head_dim: int
    num_boost: int
    sink_tokens: int
    sections: tuple[Section, ...]
    page_bytes: int

    def section(self, name: str) -> Section:
        for section in self.sections:
            if section.name == name:
                return section
        raise KeyError(f"no section {name!r}; sections: {[s.name for s in self.sections]}")

    @property
    def effective_bits(self) -> float:
        """Bits per stored K or V element, metadata included (fp16 sinks and buffers excluded)."""
        return self.page_bytes * 8 / (2 * self.page_size * self.head_dim)

    def views(self, pages: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of every section of ``pages`` (uint8 ``[..., page_bytes]``, last dim contiguous)."""
        if pages.dtype != torch.uint8 or pages.shape[-1] != self.page_bytes:
            raise ValueError(f"expected uint8 pages [..., {self.page_bytes}], got {pages.dtype} "
                             f"{tuple(pages.shape)}")
        lead = pages.shape[:-1]
        return {s.name: pages[..., s.offset:s.end].view(s.dtype).reshape(*lead, *s.shape)
                for s in self.sections}


@lru_cache(maxsize=None)
def page_layout(config: KittyConfig, head_dim: int) -> PageLayout:
    num_boost = config.num_boost_channels(head_dim)
    p = config.page_size
    parts = [
        ("key_low", torch.uint8, (p, head_dim // CODES_PER_BYTE)),
        ("key_high", torch.uint8, (p, num_boost // CODES_PER_BYTE)),
        ("boost_index", torch.uint8, (num_boost,)),
        ("key_scale", torch.float16, (head_dim,)),
        ("key_min", torch.float16, (head_dim,)),
        ("value_codes", torch.uint8, (p, head_dim // CODES_PER_BYTE)),
        ("value_scale", torch.float16, (p,)),
        ("value_min", torch.float16, (p,)),
    ]
    sections = []
    offset = 0
    for name, dtype, shape in parts:
        section = Section(name, dtype, shape, offset)
        sections.append(section)
        offset = _align(section.end)
    return PageLayout(page_size=p, head_dim=head_dim, num_boost=num_boost,
                      sink_tokens=config.sink_tokens, sections=tuple(sections), page_bytes=offset)


def model_page_layouts(config: KittyConfig, head_dim: int, num_layers: int) -> list[PageLayout]:
    """The page layout of each of a model's ``num_layers`` layers: one, but with per-layer boost ratios
    (KittyConfig.layer_boost, whose ratios must be the model's)."""
    if config.layer_boost and len(config.layer_boost) != num_layers:
        raise KittyConfigError(f"layer_boost has {len(config.layer_boost)} ratios for a model of {num_layers} layers")
    return [page_layout(config.for_layer(i), head_dim) for i in range(num_layers)]


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def format_table(layout: PageLayout) -> str:
    rows = ["| section | dtype | shape | offset | bytes |", "|---|---|---|---|---|"]
    for s in layout.sections:
        dtype = str(s.dtype).removeprefix("torch.")
        rows.append(f"| {s.name} | {dtype} | {list(s.shape)} | {s.offset} | {s.nbytes} |")
    rows.append(f"| page (per KV head, {layout.page_size} tokens) | | | | {layout.page_bytes} |")
    bf16 = 2 * layout.page_size * layout.head_dim * 2
    rows.append(f"| bf16 page for comparison | | | | {bf16} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print the kitty page layout for one KV head.")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--preset", default="kitty2", choices=PRESETS)
    parser.add_argument("--config", help="a KittyConfig YAML file instead of a preset")
    args = parser.parse_args(argv)
    try:
        config = KittyConfig.from_yaml(args.config) if args.config else KittyConfig.from_preset(args.preset)
        layout = page_layout(config, args.head_dim)
    except KittyConfigError as e:
        parser.error(str(e))
    print(f"kitty page layout: {args.config or args.preset}, head_dim {args.head_dim}, "
          f"{layout.num_boost} boosted channels, {layout.page_size} tokens per page")
    print(format_table(layout))
    print(f"effective bits per element (incl. metadata): {layout.effective_bits:.2f}")


if __name__ == "__main__":
    main()


@dataclass(frozen=True)
class StageLayout:
    """Where a request's full-precision tokens live: blocks of the staging KV-cache group.

    A staging block has the byte size of one layer's packed block (``pages_per_block * num_kv_heads *
    page_bytes``: a packed block holds ``pages_per_block`` consecutive pages, one but on hybrid models,
    kitty_vllm.block_manager.mixed), so the two vLLM groups share one block pool without padding. It holds ``tokens_per_block`` tokens as
    ``[2 (K, V), tokens_per_block, num_kv_heads, head_dim]`` in the model's dtype. A request's staging
    row is, in this order: ``sink_blocks`` blocks of ``block_tokens`` sink tokens each (``block_tokens``
    is the group's vLLM block size, so these blocks are prefix-cached under the request's own block
    hashes and a cache hit restores the sinks), then ``ring_blocks`` blocks holding the request's newest
    ``page_size`` tokens, the window that attention reads in full precision (kitty_vllm.reference), which
    also holds every page's tokens until the page is packed: ``ring_slots`` slots (``page_size``, more
    under speculative decoding: KittyConfig.ring_slots), position ``p`` at slot ``p % ring_slots``,
    ``tokens_per_block`` slots per block.

    The sizes are cached on first use: the scheduler asks for them for every running request in
    every step (kitty_vllm.block_manager).
    """

    page: PageLayout
    num_kv_heads: int
    element_bytes: int
    ring_slots: int
    pages_per_block: int = 1
    # Bytes per KV head and page of a staging block: the page's (None), or with per-layer boost ratios the
    # smallest of the model's pages (stage_layout), the same in every layer.
    block_page_bytes: int | None = None

    @cached_property
    def block_bytes(self) -> int:
        return self.pages_per_block * self.num_kv_heads * (self.block_page_bytes or self.page.page_bytes)

    @cached_property
    def tokens_per_block(self) -> int:
        return self.block_bytes // (2 * self.num_kv_heads * self.page.head_dim * self.element_bytes)

    @cached_property
    def block_tokens(self) -> int:
        """The staging group's vLLM block size: a power of two (so it divides the page), at most 16, the
        granularity of the sinks' prefix-cache hashes. With blocks of several pages (hybrid models, which
        kitty serves without prefix caching: kitty_vllm.patches, 9) as many as the sinks, so that they take
        one of those large blocks, not two."""
        cap = MAX_STAGE_BLOCK_TOKENS
        if self.pages_per_block > 1:
            cap = max(cap, 1 << (max(self.page.sink_tokens, 1) - 1).bit_length())
        return min(cap, 1 << (self.tokens_per_block.bit_length() - 1))

    @cached_property
    def sink_blocks(self) -> int:
        return -(-self.page.sink_tokens // self.block_tokens)

    @cached_property
    def ring_blocks(self) -> int:
        return -(-self.ring_slots // self.tokens_per_block)

    @cached_property
    def blocks_per_request(self) -> int:
        return self.sink_blocks + self.ring_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        """Staging blocks a request of ``num_tokens`` tokens holds (its ring grows up to ``ring_slots``)."""
        ring_tokens = min(num_tokens, self.ring_slots)
        return self.sink_blocks + -(-ring_tokens // self.tokens_per_block)


MAX_STAGE_BLOCK_TOKENS = 16


@lru_cache(maxsize=None)
def stage_layout(config: KittyConfig, head_dim: int, num_kv_heads: int, element_bytes: int,
                 pages_per_block: int = 1) -> StageLayout:
    """The staging layout of a layer in ``config``. With per-layer boost ratios (KittyConfig.layer_boost) every
    layer's staging blocks hold what the smallest of the layers' pages holds, so that a request needs as many
    in every layer, each padded to its layer's page (kitty_vllm.block_manager.spec)."""
    smallest = None
    if config.layer_boost:
        smallest = min(page.page_bytes for page in model_page_layouts(config, head_dim, len(config.layer_boost)))
    return StageLayout(page_layout(config, head_dim), num_kv_heads, element_bytes, config.ring_slots, pages_per_block,
                       smallest)
