"""Patch 1 (kitty_vllm.patches) admits the kitty cache dtypes on every vLLM release it knows a way for.

vLLM 0.32 checks ``--kv-cache-dtype`` against the ``CacheDType`` Literal, which kitty extends; 0.33 and
0.34 check it against ``KV_CACHE_DTYPES``, a copy of the Literal made at import, which only
``register_kv_cache_dtype`` extends. ``test_vllm_interfaces.py`` compares signatures and cannot see
that; these tests build what vLLM builds from the dtype.

CI runs them against the installed vLLM. They also run against the pure-Python modules of a newer
release, which import on the CPU venv (docs/vllm-0.34-port.md):

    unzip -q vllm-0.34.0-*.whl 'vllm/*.py' -d /tmp/vllm-0.34.0
    PYTHONPATH=/tmp/vllm-0.34.0 .venv/bin/python -m pytest -q tests/test_vllm_versions.py

``apply()`` would refuse such a release (``SUPPORTED_VLLM``), so the patch is applied by itself here.
"""

import pytest
import torch

from kitty_vllm.config import PRESETS


@pytest.fixture(scope="module", autouse=True)
def cache_dtypes():
    from kitty_vllm.patches import _extend_cache_dtypes

    _extend_cache_dtypes()


@pytest.mark.parametrize("preset", PRESETS)
def test_cache_config_accepts_the_presets(preset):
    from vllm.config import CacheConfig
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.kv_cache_interface import KVQuantMode, get_kv_quant_mode

    assert CacheConfig(cache_dtype=preset).cache_dtype == preset
    assert STR_DTYPE_TO_TORCH_DTYPE[preset] is torch.uint8                   # packed bytes
    # What 0.32 computes for a dtype it does not know: no generic quantized-cache path acts on kitty's
    # pages (in 0.33 and 0.34, KVQuantMode.CUSTOM would be OCTAVE_K3V4).
    assert get_kv_quant_mode(preset) is KVQuantMode.NONE


def test_cache_config_still_refuses_an_unknown_dtype():
    from vllm.config import CacheConfig

    with pytest.raises(ValueError, match="kitty3"):
        CacheConfig(cache_dtype="kitty3")


@pytest.mark.parametrize("preset", PRESETS)
def test_the_command_line_takes_the_presets(preset):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    assert parser.parse_args(["--kv-cache-dtype", preset]).kv_cache_dtype == preset
