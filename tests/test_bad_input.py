"""What a user sees when kitty cannot run: each mistake is refused early, with the reason in words.

* an unknown ``--kv-cache-dtype`` (preset) is refused by vLLM's argument parser, which lists kitty's
  presets;
* a model with a head size kitty does not implement fails at startup naming the supported sizes, and
  so do a model with MLA attention and an encoder-only model, naming what kitty cannot serve and what to
  serve it with instead (sliding-window and soft-capped models: tests/test_models.py);
* a broken ``KITTY_CONFIG`` file (unknown key, wrong type) fails naming the file and the field;
* a missing ``KITTY_CONFIG`` file fails naming the file;
* a field of ``--additional-config '{"kitty": {...}}'`` that kitty cannot use fails naming the field;
* speculative decoding with vLLM's ``draft_model`` method is refused at start, naming the methods
  that work;
* a running kitty2 server answers bad requests with vLLM's usual HTTP 400 and goes on serving: a prompt
  longer than max_model_len, an empty prompt, ``max_tokens`` 0; a prompt whose max_tokens would run
  past max_model_len gets the tokens that fit.

The startup failures are provoked with an in-process ``LLM`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the
engine raises from kitty's backend selection while the model is being built, before any weights load,
so each takes seconds (the MLA and encoder-only models are a config.json and a tokenizer, without
weights). One broken config also goes through ``vllm serve``, where the API server refuses it while it
builds vLLM's config, before any engine process starts, and exits.
"""

import gc
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kitty_vllm.config import PRESETS
from server import VllmServer
from tiny_model import build_tiny_model

VLLM_CLI = str(Path(sys.executable).with_name("vllm"))
ENGINE_ARGS = dict(kv_cache_dtype="kitty2", max_model_len=512, enforce_eager=True, max_num_seqs=4,
                   kv_cache_memory_bytes=1 << 28)


def test_unknown_kv_cache_dtype_is_refused_by_the_cli():
    # Argument parsing happens before any model is resolved: the model path need not exist.
    out = subprocess.run([VLLM_CLI, "serve", "/nonexistent/model", "--kv-cache-dtype", "kitty3",
                          "--host", "127.0.0.1"],
                         capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    print(out.stderr.strip().splitlines()[-1])
    assert out.returncode == 2, out.stderr[-3000:]
    assert "argument --kv-cache-dtype: invalid choice: 'kitty3'" in out.stderr
    choices = out.stderr.split("invalid choice: 'kitty3' (choose from", 1)[1]
    for preset in (*PRESETS, "auto", "fp8"):
        assert f"'{preset}'" in choices, preset
    assert "Starting to load model" not in out.stderr + out.stdout


@pytest.fixture
def start_engine(monkeypatch):
    """``start_engine(model)`` builds an in-process ``LLM`` with kitty2, which these tests expect to fail.

    vLLM keeps process-wide state that a fresh ``vllm serve`` would not have: the attention-backend
    choice is lru-cached per layer configuration (a successful kitty engine earlier in this process
    would skip kitty's checks), and environment variables are cached once an engine has started.
    Both are reset before the attempt, and distributed state is torn down after it.
    """
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm.envs
    from vllm.v1.attention import selector

    vllm.envs.disable_envs_cache()

    def start(model, **engine_args):
        from vllm import LLM

        selector._cached_get_attn_backend.cache_clear()
        llm = LLM(model=str(model), **{**ENGINE_ARGS, **engine_args})
        llm.llm_engine.engine_core.shutdown()
        return llm

    yield start
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()
    vllm.envs.disable_envs_cache()


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_model()


def startup_error(start_engine, model, **engine_args) -> str:
    """The message of the ValueError that stops the engine from starting."""
    with pytest.raises(ValueError) as info:
        start_engine(model, **engine_args)
    print(f"{type(info.value).__name__}: {info.value}")
    return str(info.value)


def test_unsupported_head_size_names_the_supported_ones(start_engine, monkeypatch):
    """72 is no multiple of 16, so the kitty layout cannot split it (head size 96 serves:
    tests/test_head_sizes.py)."""
    monkeypatch.delenv("KITTY_CONFIG", raising=False)
    message = startup_error(start_engine, build_tiny_model(head_dim=72))
    assert "--kv-cache-dtype kitty2 cannot serve this model" in message
    assert "head size 72 (kitty supports head sizes 64, 80, 96, 112, 128, 160, 192, 256)" in message


def test_value_rotation_needs_a_power_of_two_head_size(start_engine, monkeypatch):
    """The Hadamard rotation of the Values (KittyConfig.value_rotation) has no matrix of size 96."""
    monkeypatch.delenv("KITTY_CONFIG", raising=False)
    message = startup_error(start_engine, build_tiny_model(head_dim=96),
                            additional_config={"kitty": {"value_rotation": "hadamard"}})
    assert ("head size 96 with value_rotation=hadamard (the Hadamard rotation needs a power-of-two head size; "
            "set value_rotation: none)") in message


# The tiny model's config.json turned into architectures kitty cannot serve.
UNSERVABLE_MODELS = {
    # DeepSeek-V2 attention (MLA), with dense MLPs only: every layer precedes first_k_dense_replace.
    "mla": ({"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "kv_lora_rank": 64,
             "q_lora_rank": None, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32,
             "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
             "first_k_dense_replace": 2, "moe_layer_freq": 1, "moe_intermediate_size": 64,
             "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
             "scoring_func": "softmax", "norm_topk_prob": False},
            "MLA attention (DeepSeek-V2/V3-style: its cache is one latent vector per token, while kitty "
            "quantizes per-head Keys and Values; serve it with --kv-cache-dtype auto or fp8)"),
    # BERT: encoder-only attention, bidirectional, with no KV cache to keep (head size 256 / 4 = 64).
    "encoder_only": ({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 256,
                      "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12},
                     "encoder-only attention (BERT-style models) (kitty caches decoder self-attention only; "
                     "serve it with --kv-cache-dtype auto or fp8)"),
}


@pytest.mark.parametrize("case", sorted(UNSERVABLE_MODELS))
def test_unservable_model_fails_at_startup_with_the_reason(case, start_engine, tiny_model, tmp_path,
                                                          monkeypatch):
    monkeypatch.delenv("KITTY_CONFIG", raising=False)
    changes, reason = UNSERVABLE_MODELS[case]
    model = tmp_path / case
    model.mkdir()
    for item in tiny_model.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, model / item.name)
    config = json.loads((tiny_model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))
    message = startup_error(start_engine, model)
    assert "--kv-cache-dtype kitty2 cannot serve this model" in message
    assert reason in message


BROKEN_CONFIGS = {
    # a misspelt field: refused with the allowed field names
    "unknown_key": ("page_size: 128\nsink_tokens: 32\nboost_ratoi: 0.25\n",
                    ["unknown key(s) boost_ratoi", "allowed: boost_bits, boost_policy, boost_ratio,"]),
    # a string where an integer belongs
    "wrong_type": ("page_size: big\n", ["page_size='big': must be an integer, got str"]),
    # a float where an integer belongs
    "float_for_int": ("sink_tokens: 3.5\n", ["sink_tokens=3.5: must be an integer, got float"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CONFIGS))
def test_broken_kitty_config_names_the_file_and_field(case, start_engine, tiny_model, tmp_path,
                                                      monkeypatch):
    text, expected = BROKEN_CONFIGS[case]
    config = tmp_path / f"{case}.yaml"
    config.write_text(text)
    monkeypatch.setenv("KITTY_CONFIG", str(config))
    message = startup_error(start_engine, tiny_model)
    assert f"{config}: " in message
    for piece in expected:
        assert piece in message


def test_missing_kitty_config_names_the_file(start_engine, tiny_model, tmp_path, monkeypatch):
    missing = tmp_path / "no_such_dir" / "kitty.yaml"
    monkeypatch.setenv("KITTY_CONFIG", str(missing))
    message = startup_error(start_engine, tiny_model)
    assert f"cannot read kitty config file {missing}: No such file or directory" in message
    assert not os.path.exists(missing)


@pytest.mark.parametrize("fields_set, expected", [
    ({"boost_ratoi": 0.25}, '--additional-config "kitty": unknown key(s) boost_ratoi; allowed: boost_bits,'),
    # valid alone, but not for this model's head size
    ({"boost_ratio": 0.3}, "--kv-cache-dtype kitty2 cannot serve this model: boost_ratio=0.3 x head_dim=64 = "
                           "19.2 channels"),
])
def test_broken_additional_config_names_the_field(fields_set, expected, start_engine, tiny_model, monkeypatch):
    monkeypatch.delenv("KITTY_CONFIG", raising=False)
    assert expected in startup_error(start_engine, tiny_model, additional_config={"kitty": fields_set})


def test_speculation_with_a_draft_model_is_refused_at_start(start_engine, tiny_model, monkeypatch):
    """vLLM's draft-model proposer reads the first KV-cache group's block table, kitty's pages: refused
    at start, naming the methods that work (kitty_vllm.patches, 6)."""
    monkeypatch.delenv("KITTY_CONFIG", raising=False)
    message = startup_error(start_engine, tiny_model, speculative_config={
        "method": "draft_model", "model": str(tiny_model), "num_speculative_tokens": 3})
    assert "--kv-cache-dtype kitty2 does not support speculative method 'draft_model'" in message
    assert "Speculate with an EAGLE or MTP head (method eagle, eagle3 or mtp) or without draft layers" in message


def test_broken_kitty_config_under_vllm_serve(tiny_model, tmp_path):
    config = tmp_path / "kitty.yaml"
    config.write_text("page_size: 128\nboost_ratoi: 0.25\n")
    args = ["--kv-cache-dtype", "kitty2", "--max-model-len", "512", "--enforce-eager",
            "--kv-cache-memory-bytes", str(1 << 28)]
    srv = VllmServer(tiny_model, args, tmp_path / "serve.log",
                     env={"KITTY_CONFIG": str(config), "VLLM_CPU_KVCACHE_SPACE": None})
    try:
        try:
            returncode = srv.proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vllm serve neither failed nor exited within 240 s:\n{srv.log_tail()}")
        log = srv.log()
    finally:
        srv.stop()
    errors = [line for line in log.splitlines() if "Error" in line]
    print("\n".join(errors))
    assert returncode != 0, srv.log_tail()
    # The API server resolves the config while it builds vLLM's config, which wraps the message.
    kitty_error = f"Value error, {config}: unknown key(s) boost_ratoi; allowed: boost_bits, boost_policy,"
    assert any(kitty_error in line for line in log.splitlines()), srv.log_tail()
    assert "EngineCore" not in log          # refused before any engine or worker process starts
    assert "Application startup complete" not in log


@pytest.fixture(scope="module")
def kitty_server(tiny_model, tmp_path_factory):
    """``vllm serve`` of the tiny model with kitty2 and a max_model_len of 512."""
    args = ["--kv-cache-dtype", "kitty2", "--max-model-len", "512", "--enforce-eager", "--dtype",
            "float32", "--kv-cache-memory-bytes", str(1 << 26)]
    srv = VllmServer(tiny_model, args, tmp_path_factory.mktemp("bad_requests") / "serve.log",
                     env={"KITTY_CONFIG": None, "VLLM_CPU_KVCACHE_SPACE": None})
    try:
        srv.wait_healthy(600)
        yield srv
    finally:
        srv.stop()


def completion(server, **body) -> tuple[int, str]:
    """POST /v1/completions: (HTTP status, the error message or the generated text)."""
    request = urllib.request.Request(
        f"{server.base_url}/v1/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": server.model, "temperature": 0, **body}).encode())
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())["choices"][0]["text"]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]["message"]


BAD_REQUESTS = {
    "prompt_over_max_model_len": (dict(prompt=[5] * 600, max_tokens=4),
                                  "This model's maximum context length is 512 tokens"),
    "empty_prompt": (dict(prompt="", max_tokens=4), "must be provided and non-empty"),
    "empty_token_list": (dict(prompt=[], max_tokens=4), "You must pass at least one prompt"),
    "max_tokens_0": (dict(prompt="Hello", max_tokens=0), "max_tokens must be at least 1, got 0"),
}


def test_output_past_max_model_len_is_cut_to_fit(kitty_server):
    """vLLM 0.32 shortens max_tokens to what fits after the prompt instead of refusing the request
    (vllm/entrypoints/serve/utils/api_utils.get_max_tokens): 500 prompt tokens leave 12 of the 100."""
    request = urllib.request.Request(
        f"{kitty_server.base_url}/v1/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": kitty_server.model, "temperature": 0, "prompt": [5] * 500, "max_tokens": 100,
                         "ignore_eos": True}).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        usage = json.loads(response.read())["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (500, 12)


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_http_400_and_the_server_goes_on(case, kitty_server):
    body, message = BAD_REQUESTS[case]
    status, error = completion(kitty_server, **body)
    print(f"{case}: {status} {error}")
    assert status == 400 and message in error
    assert completion(kitty_server, prompt="The essay", max_tokens=4)[0] == 200


def test_gpus_before_ampere_are_refused_with_the_reason(monkeypatch):
    """On a GPU older than compute capability 8.0 (a T4 is 7.5) kitty names why it cannot serve and what to serve
    with instead, among the reasons that stop the engine at start (the CPU build stands in for the GPU here)."""
    from types import SimpleNamespace

    import torch
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability

    from kitty_vllm.backend import KittyAttentionBackend
    from kitty_vllm.config import KittyConfig

    selector = SimpleNamespace(use_mla=False, use_sparse=False, attn_type=None, head_size=128, dtype=torch.bfloat16)
    config = KittyConfig.from_preset("kitty2")
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    for capability, reasons in [((8, 0), []), ((9, 0), []), ((7, 5), [
            "a GPU of compute capability 7.5 (kitty's kernels need 8.0 or newer, Ampere on: they copy pages with "
            "cp.async and multiply in bfloat16 on tensor cores; serve it with --kv-cache-dtype auto or fp8)"])]:
        monkeypatch.setattr(current_platform, "get_device_capability",
                            lambda device_id=0, capability=capability: DeviceCapability(*capability))
        assert KittyAttentionBackend.unsupported_reasons(selector, config) == reasons
