"""What a user sees when kitty cannot run: each mistake is refused early, with the reason in words.

* an unknown ``--kv-cache-dtype`` is refused by vLLM's argument parser, which lists kitty's presets;
* a model with a head size kitty does not implement fails at startup naming the supported sizes;
* a broken ``KITTY_CONFIG`` file (unknown key, wrong type) fails naming the file and the field;
* a missing ``KITTY_CONFIG`` file fails naming the file.

The startup failures are provoked with an in-process ``LLM`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the
engine raises from kitty's backend selection while the model is being built, before any weights load,
so each takes seconds. One broken config also goes through ``vllm serve``, where the message is logged by
the worker process, followed by vLLM's "Engine core initialization failed. See root cause above", and
the server exits instead of hanging.
"""

import gc
import os
import subprocess
import sys
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

    def start(model):
        from vllm import LLM

        selector._cached_get_attn_backend.cache_clear()
        llm = LLM(model=str(model), **ENGINE_ARGS)
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


def startup_error(start_engine, model) -> str:
    """The message of the ValueError that stops the engine from starting."""
    with pytest.raises(ValueError) as info:
        start_engine(model)
    print(f"{type(info.value).__name__}: {info.value}")
    return str(info.value)


def test_unsupported_head_size_names_the_supported_ones(start_engine, monkeypatch):
    monkeypatch.delenv("KITTY_CONFIG", raising=False)
    message = startup_error(start_engine, build_tiny_model(head_dim=96))
    assert "--kv-cache-dtype kitty2 cannot serve this model" in message
    assert "head size 96 (kitty supports head sizes 64, 128, 256)" in message


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
    kitty_error = f"KittyConfigError: {config}: unknown key(s) boost_ratoi; allowed: boost_bits, boost_policy,"
    assert any(kitty_error in line for line in errors), srv.log_tail()
    assert "Engine core initialization failed" in log
    assert "Application startup complete" not in log
