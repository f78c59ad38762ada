"""The simulation's accuracy levers (kitty_vllm.tools.levers): the Hadamard rotation of the Values, the
value lag and per-layer boost ratios (with their calibration, kitty_vllm.tools.calibrate), how the eval and
the study take them, and that vLLM runs refuse them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kitty_vllm import reference as R
from kitty_vllm.boost_profile import LayerBoostProfile
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import page_layout
from kitty_vllm.tools import calibrate, levers, oracle
from kitty_vllm.tools.capacity import EVAL_MODELS, kitty_bytes
from kitty_vllm.tools.eval import CacheSpec
from tiny_model import build_tiny_model

KITTY2 = KittyConfig.from_preset("kitty2")
EXACT = KITTY2.replace(exact_prefill=True)
PAGE, SINKS = KITTY2.page_size, KITTY2.sink_tokens
ROOT = Path(__file__).parents[1]
SCREEN = ROOT / "benchmarks/results/lever-screen-2026-12-07"


def sequence(num_keys: int = 700, kv_heads: int = 2, head_dim: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_keys, kv_heads, head_dim, generator=generator) * torch.linspace(0.5, 8, head_dim)
    values = torch.randn(num_keys, kv_heads, head_dim, generator=generator)
    return keys, values


def uniform_read(values_read: torch.Tensor, position: int) -> torch.Tensor:
    """What a query of zeros (every score 0, so equal weights on keys 0..position) at ``position`` gets
    from the Values it reads, [N, Hkv, D], with 2 query heads per KV head: [Hq, D]."""
    return values_read[:position + 1].mean(dim=0).repeat_interleave(2, dim=0)


def test_hadamard_spreads_an_outlier_channel_over_the_per_token_scale():
    """Per-token 2-bit Values with one large channel: rotated, the other channels keep their resolution."""
    values = torch.randn(PAGE, 2, 64, generator=torch.Generator().manual_seed(1))
    values[..., 5] *= 30
    rotation = R.hadamard(64)
    plain = R.quantized_sequence(values, values, KITTY2)[1]
    rotated = R.quantized_sequence(values, values @ rotation, KITTY2)[1] @ rotation.T
    assert (rotated - values).square().mean() < 0.5 * (plain - values).square().mean()


@pytest.mark.parametrize("position", [255, 256, 383, 699])
def test_value_lag_reads_the_newest_128_to_255_values_in_full_precision(position):
    """A decode at ``position`` reads the Values of its page and the page before in full precision, the
    older ones (sinks aside) as plain kitty2 packs them; Keys as plain kitty2 reads them."""
    keys, values = sequence()
    packed = int(levers.packed_value_pages(torch.tensor([position]), EXACT))
    assert PAGE <= position - packed * PAGE <= 2 * PAGE - 1
    _, values_q = R.quantized_sequence(keys, values, KITTY2)
    t = torch.arange(len(values))
    full = (t < SINKS) | (t // PAGE >= position // PAGE - 1)
    expected = uniform_read(torch.where(full[:, None, None], values, values_q), position)
    query = torch.zeros(1, 4, keys.shape[-1])
    step = dict(query_positions=torch.tensor([position]))
    lagged = levers.attention(query, keys[:position + 1], values[:position + 1], KITTY2, **step, levers=["value-lag"])
    assert torch.allclose(lagged[0], expected, atol=1e-5)
    plain = R.reference_attention(query, keys[:position + 1], values[:position + 1], KITTY2, **step)
    assert (plain - lagged).abs().max() > 1e-4   # kitty2 reads only the newest 128 in full precision
    query = torch.randn(1, 4, keys.shape[-1], generator=torch.Generator().manual_seed(position))   # Keys as kitty2's
    lagged = levers.attention(query, keys[:position + 1], values[:position + 1], KITTY2, **step, levers=["value-lag"])
    keys_q, _ = R.quantized_sequence(keys[:position + 1], values[:position + 1], KITTY2)
    read = torch.where(full[:, None, None], values, values_q)[:position + 1]
    assert torch.allclose(lagged, R.schedule_attention(query, keys[:position + 1], values[:position + 1], keys_q,
                                                       read, step["query_positions"], KITTY2), atol=1e-5)


def test_value_lag_on_a_prefill_step_reads_the_page_before_its_first_token_in_full_precision():
    """exact_prefill off: a step of several tokens from position c reads the pages complete before c
    quantized, except the Values of the page before c's."""
    keys, values = sequence()
    start, count = 450, 40
    _, values_q = R.quantized_sequence(keys[:start + count], values[:start + count], KITTY2)
    t = torch.arange(start + count)
    full = (t < SINKS) | (t // PAGE >= start // PAGE - 1)
    query = torch.zeros(count, 4, keys.shape[-1])
    out = levers.attention(query, keys[:start + count], values[:start + count], KITTY2, levers=["value-lag"])
    for i in (0, count - 1):
        read = torch.where(full[:, None, None], values[:start + count], values_q)
        assert torch.allclose(out[i], uniform_read(read, start + i), atol=1e-5)


@pytest.mark.parametrize("names", [["value-lag"], ["hadamard-v"], ["value-lag", "hadamard-v"]])
def test_exact_prefill_under_a_lever_equals_its_decodes(names):
    """With exact_prefill one step over every position reads what each position's decode reads."""
    keys, values = sequence(num_keys=420)
    query = torch.randn(len(keys), 4, keys.shape[-1], generator=torch.Generator().manual_seed(2))
    whole = levers.attention(query, keys, values, EXACT, levers=names)
    for p in (31, 128, 255, 256, 419):
        decode = levers.attention(query[p:p + 1], keys[:p + 1], values[:p + 1], KITTY2, levers=names)
        assert torch.allclose(whole[p], decode[0], atol=1e-5), p


def test_hadamard_v_quantizes_the_rotated_values_and_leaves_the_keys():
    keys, values = sequence(head_dim=64)
    rotation = R.hadamard(64)
    keys_q, _ = R.quantized_sequence(keys, values, KITTY2)
    values_q = R.quantized_sequence(keys, values @ rotation, KITTY2)[1] @ rotation.T
    positions = torch.tensor([400, 699])
    query = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(3))
    out = levers.attention(query, keys, values, EXACT, query_positions=positions, levers=["hadamard-v"])
    assert torch.allclose(out, R.schedule_attention(query, keys, values, keys_q, values_q, positions, EXACT),
                          atol=1e-5)
    assert not torch.allclose(out, R.reference_attention(query, keys, values, EXACT, query_positions=positions),
                              atol=1e-4)


def test_levers_parse_in_order_and_refuse_unknown_names():
    assert levers.parse("hadamard-v,value-lag") == ("value-lag", "hadamard-v")
    for text in ("value-lags", "value-lag,value-lag", ""):
        with pytest.raises(ValueError, match="the levers are value-lag, hadamard-v"):
            levers.parse(text)
    assert levers.lever_attention(()) is None
    spec = CacheSpec.parse("kitty2:lever=hadamard-v,value-lag")
    assert spec.levers == ("value-lag", "hadamard-v") and spec.label == "kitty2 (value-lag + hadamard-v)"
    with pytest.raises(ValueError, match="unknown: 'rotate'"):
        CacheSpec.parse("kitty2:lever=rotate")
    with pytest.raises(ValueError, match="a lever applies to kitty dtypes only"):
        CacheSpec.parse("fp8:lever=value-lag")


def test_vllm_runs_refuse_levers(monkeypatch, capsys):
    """The kernels do not implement the levers: only --reference runs them."""
    from kitty_vllm.tools.eval import parse_args

    monkeypatch.delenv("KITTY_CONFIG", raising=False)
    with pytest.raises(SystemExit):
        parse_args(["--model", "smollm2", "--tasks", "perplexity", "--kv-cache-dtypes", "kitty2:lever=value-lag"])
    assert "float32 simulation only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="kernels do not implement"):
        CacheSpec.parse("kitty2:lever=hadamard-v").llm_kwargs()
    args = parse_args(["--model", "smollm2", "--reference", "--tasks", "perplexity",
                       "--kv-cache-dtypes", "kitty2", "kitty2:lever=value-lag"])
    assert [spec.levers for spec in args.specs] == [(), ("value-lag",)]


def test_the_oracle_attends_through_the_lever_in_quantized_layers_only():
    keys, values = sequence(num_keys=300)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[3])
        return levers.attention(*args, **kwargs, levers=["value-lag"])

    def forward(layer):
        module = SimpleNamespace(layer_idx=layer, scaling=0.25)
        q = torch.randn(1, 4, 1, 16)
        return oracle.kitty_attention_forward(module, q, keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                              None, position_ids=torch.tensor([[299]]))[0]

    with oracle.kitty_attention(EXACT, plain_layers=[1], attention=spy):
        forward(0)
        forward(1)
    assert calls == [EXACT]


def test_the_value_lag_costs_capacity_and_hadamard_nothing():
    from kitty_vllm.tools.study import cache_figures

    plain, lag, rotation = (CacheSpec.parse(t) for t in ("kitty2", "kitty2:lever=value-lag", "kitty2:lever=hadamard-v"))
    assert levers.lagged_values(lag.levers, KITTY2) == PAGE and levers.lagged_values(rotation.levers, KITTY2) == 0
    for shape in EVAL_MODELS:
        figures = cache_figures(plain, shape, (4624, 32768))
        assert cache_figures(rotation, shape, (4624, 32768)) == figures
        lagged = cache_figures(lag, shape, (4624, 32768))
        assert lagged["bits_per_element"] == figures["bits_per_element"]
        for n, ratio in figures["capacity_vs_auto"].items():
            assert 0.85 * ratio < lagged["capacity_vs_auto"][n] < ratio
        # One page of bf16 Values per full-attention layer, in whole staging blocks, once a request has two pages.
        extra = [kitty_bytes(shape, KITTY2, n, lagged_values=PAGE) - kitty_bytes(shape, KITTY2, n)
                 for n in (PAGE, 2 * PAGE, 4624, 32768)]
        block = shape.kv_heads * page_layout(KITTY2, shape.head_dim).page_bytes
        values = shape.full * PAGE * shape.kv_heads * shape.head_dim * 2
        assert extra[0] == 0 and extra[1] == extra[2] == extra[3] and values <= extra[1] < values + shape.full * block


def test_per_layer_pages_cost_their_sum_and_the_smaller_staging_blocks(tmp_path):
    """Capacity with KittyConfig.layer_boost, as vLLM counts it (tests/test_block_manager.py): a block is each
    layer's page side by side, and staging blocks hold the smallest page's tokens. The eval's config file names
    its profile relative to itself."""
    from kitty_vllm.layout import stage_layout
    from kitty_vllm.tools.study import cache_figures

    shape = next(s for s in EVAL_MODELS if s.model == "Qwen2.5-Coder-1.5B")
    ratios = [0.0, 0.25, 0.5, 0.25] * (shape.full // 4)
    write_profile(tmp_path / "profile.yaml", ratios, model="qwen-1.5b")
    (tmp_path / "layer-boost.yaml").write_text("layer_boost: profile.yaml\n")
    spec = CacheSpec.parse(f"kitty2:{tmp_path / 'layer-boost.yaml'}")
    config = spec.kitty_config()
    assert config.layer_boost == tuple(ratios)
    pages = sum(page_layout(KITTY2.replace(boost_ratio=r), shape.head_dim).page_bytes for r in ratios)
    assert pages == shape.full * page_layout(KITTY2, shape.head_dim).page_bytes     # head_dim 128: no padding
    stage = stage_layout(config, shape.head_dim, shape.kv_heads, 2)
    assert stage.block_bytes == shape.kv_heads * page_layout(KITTY2.replace(boost_ratio=0.0), shape.head_dim).page_bytes
    for n in (PAGE, 4624, 32768):
        blocks = -(-n // PAGE) + stage.blocks_needed(n)
        assert kitty_bytes(shape, config, n) == blocks * shape.kv_heads * pages
    # The smaller staging blocks: one more per request (11 blocks for 10 at 128 tokens, 47 for 46 at 4,624).
    figures, plain = cache_figures(spec, shape, (4624, 32768)), cache_figures(CacheSpec.parse("kitty2"), shape,
                                                                               (4624, 32768))
    assert figures["bits_per_element"] == plain["bits_per_element"]
    for n, ratio in plain["capacity_vs_auto"].items():
        assert 0.97 * ratio < figures["capacity_vs_auto"][n] < ratio
    # The simulation's lever with the same profile counts as the runtime does; another model's shape has no figures.
    lever = CacheSpec.parse(f"kitty2:lever=layer-boost={tmp_path / 'profile.yaml'}")
    assert cache_figures(lever, shape, (4624, 32768)) == figures
    smollm2 = next(s for s in EVAL_MODELS if s.model == "SmolLM2-135M")
    assert cache_figures(spec, smollm2, (4624,)) is None and cache_figures(lever, smollm2, (4624,)) is None


def test_docs_lever_screen_tables_are_the_study_json():
    """docs/accuracy.md shows the screen's tables as kitty_vllm.tools.study prints its JSON."""
    from kitty_vllm.tools.study import markdown_table

    result = json.loads((SCREEN / "study.json").read_text())
    assert markdown_table(result) in (ROOT / "docs" / "accuracy.md").read_text()
    assert markdown_table(result) in (SCREEN / "README.md").read_text()


# ----------------------------------------------------------------------------- per-layer boost ratios

TINY_LAYERS = 4


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return build_tiny_model(num_layers=TINY_LAYERS)


def tiny_tokens(model_dir: Path, count: int = 300) -> list[int]:
    """``count`` calibration tokens: two complete pages, read quantized from position 160 on."""
    from transformers import AutoTokenizer

    return calibrate.calibration_tokens(AutoTokenizer.from_pretrained(model_dir), count)


def write_profile(path: Path, ratios, model: str = "smollm2", base: float = 0.25) -> Path:
    return LayerBoostProfile(model, base, tuple(ratios), {}).to_yaml(path)


def test_the_greedy_spends_the_base_channels_on_the_most_sensitive_layers():
    counts = [0, 8, 16, 24, 32]
    errors = [[4.0, 2.0, 1.0, 0.5, 0.25],        # sensitive: gains 2, 1, 0.5, 0.25 per step
              [0.4, 0.2, 0.1, 0.05, 0.025],      # ten times less
              [1.0, 0.5, 0.45, 0.44, 0.43]]      # one large first step, then little
    chosen = calibrate.assign(errors, counts, 16)
    assert sum(chosen) == 16 * len(errors) and chosen == [32, 8, 8]
    assert calibrate.assign(errors, counts, 0) == [0, 0, 0]
    with pytest.raises(ValueError, match="outside the allowed"):
        calibrate.assign(errors, [0, 8], 16)


def test_calibrate_writes_a_profile_that_averages_to_the_preset_ratio_and_the_eval_loads(tiny_dir, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setattr(calibrate.assets, "model_path", lambda key: tiny_dir)
    out = tmp_path / "tiny-profile.yaml"
    calibrate.main(["--model", "smollm2", "--out", str(out), "--tokens", "300"])
    profile = LayerBoostProfile.load(out)
    assert profile.model == "smollm2" and len(profile.ratios) == TINY_LAYERS
    assert profile.boost_ratio == KITTY2.boost_ratio
    assert sum(profile.ratios) / TINY_LAYERS == pytest.approx(KITTY2.boost_ratio, abs=1e-12)
    assert set(profile.ratios) <= set(calibrate.RATIOS) and len(set(profile.ratios)) > 1
    errors = profile.calibration["errors"]
    assert len(errors) == TINY_LAYERS and all(row[0] > row[-1] > 0 for row in errors)
    assert profile.calibration["boost_policy"] == KITTY2.boost_policy
    # Calibrated for another policy, the same layers' errors are those of pages that boost other channels.
    ranged = tmp_path / "tiny-profile-range.yaml"
    calibrate.main(["--model", "smollm2", "--out", str(ranged), "--tokens", "300", "--boost-policy", "range"])
    by_range = LayerBoostProfile.load(ranged).calibration
    assert by_range["boost_policy"] == "range" and by_range["errors"] != errors
    spec = CacheSpec.parse(f"kitty2:lever=hadamard-v,layer-boost={out}")
    assert spec.levers == ("hadamard-v", f"layer-boost={out}")
    assert spec.label == "kitty2 (hadamard-v + layer-boost=tiny-profile)"
    # Equal average bits, up to the 16-byte alignment of each page's index of boosted channels.
    layout = page_layout(KITTY2, 64)
    assert abs(profile.bits_per_element(KITTY2, 64) - layout.effective_bits) <= 16 * 8 / (2 * PAGE * 64)


def test_calibrate_a_model_directory(tiny_dir, tmp_path, capsys):
    """A user's model: --model takes its directory, and the profile is named after it."""
    out = tmp_path / "mine.yaml"
    calibrate.main(["--model", str(tiny_dir), "--out", str(out), "--tokens", "300"])
    assert LayerBoostProfile.load(out).model == tiny_dir.name
    with pytest.raises(SystemExit):
        calibrate.main(["--model", str(tmp_path), "--out", str(out)])
    assert "neither one of the eval's models" in capsys.readouterr().err


def test_layer_boost_changes_exactly_the_layers_whose_ratio_differs(tiny_dir, tmp_path):
    """Through the oracle, each layer quantizes its Keys at its own ratio: the layers at the preset's ratio
    attend as plain kitty2 (with hadamard-v, as hadamard-v alone), the others not."""
    profile = write_profile(tmp_path / "p.yaml", [0.5, 0.25, 0.25, 0.0])
    tokens = tiny_tokens(tiny_dir)
    changed: dict[int, list[bool]] = {}

    def spy(*args, **kwargs):
        layer = levers.current_layer()
        lever = f"layer-boost={profile}"
        pairs = (([lever], None), (["hadamard-v", lever], ["hadamard-v"]))
        for lever, plain in pairs:
            out = levers.attention(*args, **kwargs, levers=lever)
            base = levers.attention(*args, **kwargs, levers=plain) if plain else R.reference_attention(*args, **kwargs)
            changed.setdefault(layer, []).append(not torch.equal(out, base))
        return R.reference_attention(*args, **kwargs)

    with levers.layer_indices(oracle.load_model(tiny_dir)):
        oracle.kitty_logits(tiny_dir, tokens, EXACT, attention=spy)
    assert changed == {0: [True, True], 1: [False, False], 2: [False, False], 3: [True, True]}
    with pytest.raises(RuntimeError, match="layer_indices"):
        oracle.kitty_logits(tiny_dir, tokens, EXACT, attention=levers.lever_attention([f"layer-boost={profile}"]))


@pytest.mark.parametrize("text, message", [
    (None, "no such layer-boost profile"),
    ("- 0.25\n", "a mapping with model, boost_ratio and ratios"),
    ("model: smollm2\nboost_ratio: 0.25\n", "a mapping with model, boost_ratio and ratios"),
    ("model: smollm2\nboost_ratio: 0.25\nratios: [0.25, x]\n", "must be numbers in \\[0, 1\\]"),
    ("model: smollm2\nboost_ratio: 0.25\nratios: [0.5, 0.5, 0.25, 0]\n", "average 0.3125, not boost_ratio 0.25"),
    ("model: [smollm2\n", "not YAML"),
])
def test_a_bad_profile_file_is_refused_with_the_command_that_makes_one(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    for attempt in (lambda: LayerBoostProfile.load(path),
                    lambda: CacheSpec.parse(f"kitty2:lever=layer-boost={path}")):
        with pytest.raises(ValueError, match=message) as error:
            attempt()
        assert f"python -m kitty_vllm.tools.calibrate --model MODEL --out {path}" in str(error.value)
    for lever in ("layer-boost", "layer-boost="):
        with pytest.raises(ValueError, match="takes a profile file"):
            levers.parse(lever)


@pytest.mark.parametrize("ratios, model, preset, message", [
    ([0.25] * TINY_LAYERS, "qwen-0.5b", "kitty2", "a profile of qwen-0.5b, not smollm2"),
    ([0.25] * 3, "smollm2", "kitty2", "3 ratios for smollm2's 4 layers"),
    ([0.25] * TINY_LAYERS, "smollm2", "kitty2-lite", "for a preset of boost_ratio 0.125"),
    ([0.3, 0.2, 0.25, 0.25], "smollm2", "kitty2", "layer 0: boost_ratio=0.3"),
])
def test_the_eval_refuses_a_profile_that_does_not_fit_the_model_or_preset(tmp_path, ratios, model, preset, message):
    from kitty_vllm.tools.eval import check_layer_profile

    path = write_profile(tmp_path / "p.yaml", ratios, model=model)
    spec = CacheSpec.parse(f"{preset}:lever=layer-boost={path}")
    model_config = SimpleNamespace(num_hidden_layers=TINY_LAYERS, head_dim=64)
    with pytest.raises(SystemExit, match=message) as error:
        check_layer_profile(spec, "smollm2", model_config)
    assert f"python -m kitty_vllm.tools.calibrate --model smollm2 --out {path}" in str(error.value)
    check_layer_profile(CacheSpec.parse("kitty2:lever=hadamard-v"), "smollm2", model_config)


def test_docs_layer_boost_tables_are_the_study_json():
    """The layer-boost screen's README shows the study's tables, docs/accuracy.md its perplexity table, as
    kitty_vllm.tools.study prints its JSON; bits.txt holds the profile's bits as the lever computes them."""
    from kitty_vllm.tools.study import markdown_table

    folder = ROOT / "benchmarks/results/lever-layer-boost-2026-12-07"
    table = markdown_table(json.loads((folder / "study.json").read_text()))
    assert table in (folder / "README.md").read_text()
    assert table.split("\n\n")[0] in (ROOT / "docs" / "accuracy.md").read_text()
    profile = LayerBoostProfile.load(folder / "smollm2-layer-boost.yaml")
    assert f"smollm2-layer-boost: {profile.bits_per_element(KITTY2, 64):.4f}" in (folder / "bits.txt").read_text()
