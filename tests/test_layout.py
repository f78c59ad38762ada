import subprocess
import sys

import pytest
import torch

from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import page_layout


def hand_computed(head_dim: int, boost: int) -> dict[str, tuple[int, int]]:
    """(offset, bytes) of each section for 128-token pages, worked out by hand."""
    tokens = 128
    key_low = tokens * head_dim // 4           # 2 bits x head_dim per token
    key_high = tokens * boost // 4            # 2 bits x boosted channels per token
    boost_index = boost                       # one uint8 per boosted channel
    padded_index = -(-boost_index // 16) * 16
    key_scale = key_min = 2 * head_dim        # fp16 per channel
    value_codes = tokens * head_dim // 4
    value_scale = value_min = 2 * tokens      # fp16 per token
    sizes = [("key_low", key_low), ("key_high", key_high), ("boost_index", boost_index),
             ("key_scale", key_scale), ("key_min", key_min), ("value_codes", value_codes),
             ("value_scale", value_scale), ("value_min", value_min)]
    out, offset = {}, 0
    for name, size in sizes:
        out[name] = (offset, size)
        offset += padded_index if name == "boost_index" else size
    out["page"] = (0, offset)
    return out


# head_dim, preset, boosted channels, page bytes, effective bits (all by hand)
PINNED = [
    (64, "kitty2", 16, 2048 + 512 + 16 + 128 + 128 + 2048 + 256 + 256, 2.63),
    (128, "kitty2", 32, 4096 + 1024 + 32 + 256 + 256 + 4096 + 256 + 256, 2.51),
    (256, "kitty2", 64, 8192 + 2048 + 64 + 512 + 512 + 8192 + 256 + 256, 2.45),
    (64, "kitty2-lite", 8, 2048 + 256 + 16 + 128 + 128 + 2048 + 256 + 256, 2.51),
    (128, "kitty2-lite", 16, 4096 + 512 + 16 + 256 + 256 + 4096 + 256 + 256, 2.38),
    (128, "kivi2", 0, 4096 + 256 + 256 + 4096 + 256 + 256, 2.25),
]


@pytest.mark.parametrize("head_dim, preset, boost, page_bytes, bits", PINNED)
def test_layout_matches_hand_computation(head_dim, preset, boost, page_bytes, bits):
    layout = page_layout(KittyConfig.from_preset(preset), head_dim)
    expected = hand_computed(head_dim, boost)
    assert layout.num_boost == boost
    assert layout.page_bytes == page_bytes == expected["page"][1]
    for section in layout.sections:
        assert (section.offset, section.nbytes) == expected[section.name], section.name
        assert section.offset % 16 == 0
    assert round(layout.effective_bits, 2) == bits


def test_kitty2_is_under_2_6_bits_at_head_dim_128():
    assert page_layout(KittyConfig.from_preset("kitty2"), 128).effective_bits <= 2.60


def test_views_cover_every_byte_once():
    layout = page_layout(KittyConfig.from_preset("kitty2"), 128)
    pages = torch.zeros(3, 2, layout.page_bytes, dtype=torch.uint8)
    views = layout.views(pages)
    assert views["key_low"].shape == (3, 2, 128, 32)
    assert views["key_scale"].dtype == torch.float16 and views["key_scale"].shape == (3, 2, 128)
    for i, view in enumerate(views.values()):
        view.view(torch.uint8).fill_(i + 1)
    covered = (pages != 0).sum().item()
    assert covered == 3 * 2 * sum(s.nbytes for s in layout.sections)


def test_cli_prints_table_and_effective_bits():
    out = subprocess.run([sys.executable, "-m", "kitty_vllm.layout", "--head-dim", "128", "--preset",
                          "kitty2"], capture_output=True, text=True, check=True).stdout
    assert "| key_high | uint8 | [128, 8] | 4096 | 1024 |" in out
    assert out.strip().splitlines()[-1] == "effective bits per element (incl. metadata): 2.51"


def test_cli_rejects_a_head_size_it_cannot_split():
    proc = subprocess.run([sys.executable, "-m", "kitty_vllm.layout", "--head-dim", "72"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "head_dim=72" in proc.stderr
