"""The environment CI builds really holds vLLM 0.32.0 (CPU) with kitty_vllm registered as its plugin."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path


def test_vllm_0_32_imports():
    import vllm

    assert vllm.__version__ == "0.32.0"
    assert importlib.metadata.version("vllm").startswith("0.32.0")


def test_vllm_cli_reports_its_version():
    cli = Path(sys.executable).with_name("vllm")
    out = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("0.32.0")


def test_kitty_is_a_vllm_general_plugin():
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert [ep.value for ep in plugins if ep.name == "kitty_vllm"] == ["kitty_vllm:register"]


def test_the_plugin_imports_no_tools():
    """register() and every runtime module (backend, kernels, block managers, stage, metrics) load
    without the evaluation, soak, demo or asset code of kitty_vllm.tools."""
    code = ("import sys, kitty_vllm; kitty_vllm.register()\n"
            "import kitty_vllm.backend, kitty_vllm.stage, kitty_vllm.metrics, kitty_vllm.block_manager\n"
            "print(sorted(m for m in sys.modules if m.startswith('kitty_vllm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    assert out.returncode == 0, out.stderr[-3000:]
    modules = out.stdout.strip().splitlines()[-1]
    assert "kitty_vllm.backend" in modules and "kitty_vllm.kernels" in modules
    assert "kitty_vllm.tools" not in modules, modules
