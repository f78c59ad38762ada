import dataclasses

import pytest

from kitty_vllm.config import PRESETS, KittyConfig, KittyConfigError, load_config


def test_presets_match_the_method():
    assert KittyConfig.from_preset("kitty2").boost_ratio == 0.25
    assert KittyConfig.from_preset("kitty2-lite").boost_ratio == 0.125
    assert KittyConfig.from_preset("kivi2").boost_ratio == 0.0
    for name in PRESETS:
        config = KittyConfig.from_preset(name)
        assert (config.page_size, config.sink_tokens, config.value_window) == (128, 32, 128)
        assert (config.key_bits, config.boost_bits, config.value_bits) == (2, 4, 2)
        assert config.boost_policy == "magnitude"
        assert config.exact_prefill is False     # a prefill's tokens read each other in full precision


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        KittyConfig().page_size = 64


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(KittyConfigError, match="kitty2, kitty2-lite, kivi2"):
        KittyConfig.from_preset("kitty3")


@pytest.mark.parametrize("text, message", [
    ("page_size: 128\ncolour: blue\n", "unknown key.*colour.*allowed: boost_bits"),
    ("page_size: '128'\n", "page_size='128': must be an integer"),
    ("boost_ratio: fast\n", "boost_ratio='fast': must be a number"),
    ("sink_tokens: true\n", "sink_tokens=True: must be an integer"),
    ("exact_prefill: 1\n", "exact_prefill=1: must be true or false, got int"),
    ("exact_prefill: 'yes'\n", "exact_prefill='yes': must be true or false, got str"),
    ("boost_ratio: 1.5\n", r"boost_ratio=1.5: must be in \[0, 1\]"),
    ("page_size: 100\nvalue_window: 100\n", "page_size=100: must be a positive multiple of 16"),
    ("value_window: 64\n", "value_window=64: must equal page_size=128"),
    ("key_bits: 3\n", "key_bits=3: only 2 is supported"),
    ("boost_policy: largest\n", "boost_policy='largest': must be one of magnitude, variance, range, random"),
    ("value_rotation: random\n", "value_rotation='random': must be one of none, hadamard"),
    ("layer_boost: [0.5, fast]\n", "layer_boost=.*must be a list of numbers, one per layer, or the path"),
    ("layer_boost: [0.5, 1.5]\n", r"layer_boost=\[0.5, 1.5\]: every ratio must be in \[0, 1\]"),
    ("layer_boost: nowhere.yaml\n", "nowhere.yaml: no such layer-boost profile: make it with python -m "
                                   "kitty_vllm.tools.calibrate"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("page_size: [1\n", "not valid YAML"),
])
def test_bad_yaml_names_the_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(KittyConfigError, match=message) as err:
        KittyConfig.from_yaml(path)
    assert str(path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(KittyConfigError, match="cannot read kitty config file .*nope.yaml"):
        KittyConfig.from_yaml(tmp_path / "nope.yaml")


def test_partial_yaml_keeps_defaults(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("boost_ratio: 0.5\nboost_policy: variance\nexact_prefill: true\n")
    config = KittyConfig.from_yaml(path)
    assert config == KittyConfig(boost_ratio=0.5, boost_policy="variance", exact_prefill=True)


def test_to_yaml_reads_back(tmp_path):
    config = KittyConfig.from_preset("kitty2-lite").replace(exact_prefill=True, boost_policy="random")
    assert KittyConfig.from_yaml(config.to_yaml(tmp_path / "copy.yaml")) == config
    config = config.replace(layer_boost=(0.0, 0.25))
    assert KittyConfig.from_yaml(config.to_yaml(tmp_path / "copy.yaml")) == config


def test_layer_boost_from_a_profile(tmp_path):
    """A config points to a calibrated profile (kitty_vllm.boost_profile); the config carries its ratios, so
    that workers need not read the file. Each layer's config has its ratio; a layer the profile does not
    name (a drafter's) keeps boost_ratio."""
    from kitty_vllm.boost_profile import LayerBoostProfile

    path = LayerBoostProfile("tiny", 0.25, (0.5, 0.0, 0.25, 0.25), {}).to_yaml(tmp_path / "profile.yaml")
    config = load_config("kitty2", {"layer_boost": str(path)})
    assert config == KittyConfig.from_preset("kitty2").replace(layer_boost=(0.5, 0.0, 0.25, 0.25))
    assert load_config("kitty2", {"layer_boost": [0.5, 0.0, 0.25, 0.25]}) == config
    assert [config.for_layer(i).boost_ratio for i in range(5)] == [0.5, 0.0, 0.25, 0.25, 0.25]
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("boost_ratio: 0.25", "boost_ratio: 0.5"))
    with pytest.raises(KittyConfigError, match="the ratios average 0.25, not boost_ratio 0.5"):
        load_config("kitty2", {"layer_boost": str(bad)})


def test_the_engine_packs_pages_of_each_layers_size(monkeypatch):
    """With layer_boost the engine checks the ratios against the model's layers and chooses vLLM's
    block-outermost KV-cache layout (kitty_vllm.patches); a layout the user forces otherwise is refused."""
    from vllm.engine.arg_utils import EngineArgs

    from tiny_model import build_tiny_model

    def engine_config(ratios, family="llama", **args):
        return EngineArgs(model=str(build_tiny_model(family=family)), kv_cache_dtype="kitty2", max_model_len=512,
                          additional_config={"kitty": {"layer_boost": ratios}}, **args).create_engine_config()

    vllm_config = engine_config([0.5, 0.0])
    assert vllm_config.cache_config.kv_cache_layout == "BLHNC"
    assert KittyConfig.from_dict(vllm_config.additional_config["kitty"]).layer_boost == (0.5, 0.0)
    # vLLM's pydantic config wraps the error (a ValueError) in its own.
    with pytest.raises(ValueError, match=r"layer_boost has 3 ratios, but .* has 2 layers: calibrate a "
                                               r"profile for this model"):
        engine_config([0.5, 0.0, 0.25])
    for family, args in [("gemma3", {}), ("llama", {"kv_cache_dtype_skip_layers": ["0"]})]:
        with pytest.raises(ValueError, match="layer_boost is not supported yet beside layers that kitty does not "
                                             "store in its pages"):
            engine_config([0.5, 0.0], family, **args)
    monkeypatch.setenv("VLLM_KV_CACHE_LAYOUT", "LBNHC")
    with pytest.raises(ValueError, match="layer_boost needs vLLM's KV-cache layout BLHNC .*, not LBNHC"):
        engine_config([0.5, 0.0])


@pytest.mark.parametrize("head_dim, ratio, expected", [(64, 0.25, 16), (128, 0.25, 32), (256, 0.25, 64),
                                                       (64, 0.125, 8), (96, 0.125, 12), (128, 0.0, 0),
                                                       (128, 0.5, 64)])
def test_boost_channels(head_dim, ratio, expected):
    assert KittyConfig(boost_ratio=ratio).num_boost_channels(head_dim) == expected


@pytest.mark.parametrize("head_dim, ratio, message", [
    (72, 0.25, "head_dim=72: the kitty layout needs a multiple of 16"),
    (512, 0.25, "no larger than 256"),
    (128, 0.1, "= 12.8 channels"),
    (48, 0.125, "= 6 channels: the sparse plane packs 4 channels per byte"),
])
def test_head_sizes_the_layout_cannot_split(head_dim, ratio, message):
    with pytest.raises(KittyConfigError, match=message):
        KittyConfig(boost_ratio=ratio).num_boost_channels(head_dim)


def test_kitty_config_env_overrides_the_preset(tmp_path, monkeypatch):
    path = tmp_path / "override.yaml"
    path.write_text("boost_ratio: 0.5\n")
    monkeypatch.setenv("KITTY_CONFIG", str(path))
    assert load_config("kitty2").boost_ratio == 0.5
    path.write_text("boost_ratio: [0.5]\n")
    with pytest.raises(KittyConfigError, match="override.yaml: boost_ratio"):
        load_config("kitty2")
    monkeypatch.delenv("KITTY_CONFIG")
    assert load_config("kitty2-lite").boost_ratio == 0.125


def test_additional_config_sets_fields_on_top_of_the_preset_or_file(tmp_path, monkeypatch):
    monkeypatch.delenv("KITTY_CONFIG", raising=False)
    assert load_config("kitty2", {"boost_ratio": 0.125}) == KittyConfig.from_preset("kitty2-lite")
    assert load_config("kivi2", {}) == KittyConfig.from_preset("kivi2")
    path = tmp_path / "mine.yaml"
    path.write_text("boost_policy: variance\n")
    monkeypatch.setenv("KITTY_CONFIG", str(path))
    assert load_config("kitty2", {"boost_ratio": 0.5}) == KittyConfig(boost_policy="variance", boost_ratio=0.5)


def test_a_complete_additional_config_reads_no_file(tmp_path, monkeypatch):
    """What the engine hands its workers: every field, so a worker needs neither the file nor the env."""
    every_field = dataclasses.asdict(KittyConfig.from_preset("kitty2-lite"))
    monkeypatch.setenv("KITTY_CONFIG", str(tmp_path / "absent-on-this-node.yaml"))
    assert load_config("kitty2", every_field) == KittyConfig.from_preset("kitty2-lite")


@pytest.mark.parametrize("fields_set, message", [
    ({"boost_ratoi": 0.5}, '--additional-config "kitty": unknown key.*boost_ratoi.*allowed: boost_bits'),
    ({"boost_ratio": [0.5]}, r'--additional-config "kitty": boost_ratio=\[0.5\]: must be a number'),
    ({"page_size": 100}, '--additional-config "kitty": page_size=100: must be a positive multiple of 16'),
    ("boost_ratio=0.5", '"kitty" must be a mapping of field: value, got str'),
])
def test_broken_additional_config_names_the_field(fields_set, message, monkeypatch):
    monkeypatch.delenv("KITTY_CONFIG", raising=False)
    with pytest.raises(KittyConfigError, match=message):
        load_config("kitty2", fields_set)


def test_presets_are_read_from_the_package_not_the_checkout():
    from importlib import resources

    presets = resources.files("kitty_vllm.presets")
    assert sorted(p.name for p in presets.iterdir() if p.name.endswith(".yaml")) == sorted(
        f"{name}.yaml" for name in PRESETS)


def test_the_engine_hands_every_field_to_its_workers(tmp_path, monkeypatch):
    """vLLM's config, as the engine builds it, carries the resolved kitty config in additional_config."""
    from vllm.engine.arg_utils import EngineArgs

    from tiny_model import build_tiny_model

    path = tmp_path / "mine.yaml"
    path.write_text("boost_policy: random\n")
    monkeypatch.setenv("KITTY_CONFIG", str(path))
    args = EngineArgs(model=str(build_tiny_model()), kv_cache_dtype="kitty2", max_model_len=512,
                      additional_config={"kitty": {"boost_ratio": 0.5}, "other_plugin": 1})
    vllm_config = args.create_engine_config()
    assert vllm_config.additional_config == {
        "kitty": dataclasses.asdict(KittyConfig(boost_policy="random", boost_ratio=0.5)), "other_plugin": 1}
    assert args.additional_config == {"kitty": {"boost_ratio": 0.5}, "other_plugin": 1}   # the caller's


def test_pyproject_requires_the_supported_vllm():
    import tomllib
    from pathlib import Path

    from kitty_vllm.patches import SUPPORTED_VLLM

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert f"vllm{SUPPORTED_VLLM}" in pyproject["project"]["dependencies"]


@pytest.mark.parametrize("version, supported", [
    ("0.32.0", True), ("0.32.0+cpu", True), ("0.32.1", True), ("0.26.0", False), ("0.33.0", False),
    ("0.33.0rc1", False), ("0.34.0", False)])
def test_vllm_version_check_names_the_range(version, supported):
    from kitty_vllm.patches import check_vllm_version

    if supported:
        check_vllm_version(version)
        return
    with pytest.raises(RuntimeError, match=rf"tested with vllm>=0.32.0,<0.33, but vLLM {version} is "
                                           r"installed: pip install 'vllm>=0.32.0,<0.33'"):
        check_vllm_version(version)


def test_the_engine_sizes_the_ring_for_the_drafts():
    """With --speculative-config the engine sets draft_tokens (kitty_vllm.patches, 6), so each request's
    ring holds page_size + k tokens and vLLM's capacity count includes them."""
    from vllm.engine.arg_utils import EngineArgs

    from kitty_vllm.layout import stage_layout
    from tiny_model import build_tiny_model

    args = EngineArgs(model=str(build_tiny_model()), kv_cache_dtype="kitty2", max_model_len=512,
                      speculative_config={"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3})
    vllm_config = args.create_engine_config()
    config = KittyConfig.from_dict(vllm_config.additional_config["kitty"])
    assert config == KittyConfig.from_preset("kitty2").replace(draft_tokens=5)
    assert config.ring_slots == 133
    plain, speculative = (stage_layout(c, 64, 2, 4) for c in (KittyConfig(), config))
    assert speculative.ring_blocks * speculative.tokens_per_block >= 133
    assert speculative.blocks_needed(512) == speculative.blocks_per_request > plain.blocks_per_request
