"""kitty_vllm as a user installs it: the wheel that ``python -m build`` makes, installed non-editable into
a fresh virtual environment, run from a directory outside the checkout.

The environment is new (``python -m venv``) and gets the wheel with ``--no-deps``; it reuses this
environment's vLLM through a path file appended after its own site-packages, whose ``.pth`` files (this
checkout's editable install among them) are not processed. So ``kitty_vllm`` there is the wheel's copy
and its entry points are the wheel's (the first distribution of a name on the path wins). There:

* ``vllm serve --kv-cache-dtype kitty2`` answers a completion and lists kitty's gauges on ``/metrics``
  (the presets, the general plugin and the stat-logger plugin all come from the wheel);
* ``LLM(..., kv_cache_dtype="kitty2")`` with a user's own ``KITTY_CONFIG`` file runs that config, and
  with ``--additional-config`` fields on top of it, in the engine-core process's worker too (its pages
  are smaller with fewer boosted channels, so the same memory holds more tokens).
"""

import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from kitty_vllm.tools.soak import VllmServer, metric
from tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parent.parent
SERVE_ARGS = ["--kv-cache-dtype", "kitty2", "--max-model-len", "512", "--enforce-eager", "--dtype", "float32",
              "--kv-cache-memory-bytes", str(1 << 26)]
KITTY_GAUGES = ("kitty:staging_blocks_held", "kitty:pages_packed", "kitty:full_precision_bytes",
                "kitty:packed_bytes")
# Run in the wheel's environment: the config the engine resolved, and a few greedy tokens.
OFFLINE_RUN = """
import json, sys
from vllm import LLM, SamplingParams
import kitty_vllm
llm = LLM(model=sys.argv[1], kv_cache_dtype="kitty2", max_model_len=512, enforce_eager=True,
          dtype="float32", kv_cache_memory_bytes=1 << 26, additional_config=json.loads(sys.argv[2]))
out = llm.generate([list(range(5, 300))], SamplingParams(max_tokens=8, temperature=0))
print("RESULT", json.dumps({"module": kitty_vllm.__file__, "tokens": list(out[0].outputs[0].token_ids),
                            "kitty": llm.llm_engine.vllm_config.additional_config["kitty"]}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built through an sdist as ``python -m build`` does by default (so no stale build
    directory of the checkout can leak into it)."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], check=True,
                   capture_output=True, text=True, timeout=600)
    (wheel,) = out.glob("kitty_vllm-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel_python(wheel, tmp_path_factory) -> Path:
    """The interpreter of a fresh environment holding the wheel, and this environment's vLLM behind it."""
    env = tmp_path_factory.mktemp("wheel-env") / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--disable-pip-version-check", str(wheel)], check=True, timeout=300)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "reuse-vllm.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("user-dir")


def test_the_wheel_holds_the_presets_and_requires_the_installed_vllm(wheel):
    from packaging.requirements import Requirement
    from vllm import __version__ as vllm_version

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = Parser().parsestr(zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for preset in ("kitty2", "kitty2-lite", "kivi2"):
        assert f"kitty_vllm/presets/{preset}.yaml" in names
    assert "kitty_vllm/tools/ablations/boost-random.yaml" in names
    assert not any(n.startswith(("tests/", "benchmarks/", "configs/")) for n in names)
    assert "kitty_vllm = kitty_vllm:register" in entry_points
    assert "kitty_vllm = kitty_vllm.metrics:KittyStatLogger" in entry_points
    # pip keeps the user's vLLM: the requirement admits it, and names no other release
    vllm = next(Requirement(r) for r in metadata.get_all("Requires-Dist") if Requirement(r).name == "vllm")
    assert vllm.specifier.contains(vllm_version.split("+")[0])


def test_vllm_serve_from_the_wheel(wheel_python, outside, tmp_path):
    model = build_tiny_model()
    srv = VllmServer(model, SERVE_ARGS, tmp_path / "serve.log", env={"KITTY_CONFIG": None, "PYTHONPATH": None},
                     python=wheel_python, cwd=outside)
    try:
        srv.wait_healthy(600)
        assert str(REPO / "kitty_vllm") not in srv.log()     # nothing was imported from the checkout
        reply = srv.post("/v1/completions", {"model": str(model), "prompt": list(range(5, 300)),
                                             "max_tokens": 8, "temperature": 0})
        assert reply["usage"]["completion_tokens"] == 8
        samples = srv.metrics()
        for gauge in KITTY_GAUGES:
            metric(samples, gauge)
        assert metric(samples, "kitty:pages_packed") >= 2     # the 295-token prompt's two full pages
    finally:
        srv.stop()


def test_user_config_file_and_additional_config_from_the_wheel(wheel_python, outside):
    user_file = outside / "my-kitty.yaml"
    user_file.write_text("boost_ratio: 0.5\nboost_policy: variance\n")
    runs = {}
    for name, additional in (("file", {}), ("file+option", {"kitty": {"boost_ratio": 0.125}})):
        out = subprocess.run([str(wheel_python), "-c", OFFLINE_RUN, str(build_tiny_model()), json.dumps(additional)],
                             cwd=outside, capture_output=True, text=True, timeout=900,
                             env={**_clean_env(), "KITTY_CONFIG": str(user_file)})
        assert out.returncode == 0, out.stderr[-4000:]
        result = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
        runs[name] = json.loads(result.removeprefix("RESULT "))
        # Logged by the engine-core process from the specs its worker built.
        runs[name]["kv_tokens"] = int(re.search(r"[GC]PU KV cache size: ([\d,]+) tokens",
                                                out.stdout + out.stderr).group(1).replace(",", ""))
    for run in runs.values():
        assert not run["module"].startswith(str(REPO)), run["module"]
        assert len(run["tokens"]) == 8
    assert (runs["file"]["kitty"]["boost_ratio"], runs["file"]["kitty"]["boost_policy"]) == (0.5, "variance")
    assert (runs["file+option"]["kitty"]["boost_ratio"], runs["file+option"]["kitty"]["boost_policy"]) == (
        0.125, "variance")
    # The worker process sized its pages with the option: fewer boosted channels, smaller pages.
    assert runs["file+option"]["kv_tokens"] > runs["file"]["kv_tokens"]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KITTY_CONFIG")}
