#!/usr/bin/env bash
# Build the vLLM 0.32.0 bundle for the lent GPU machine (H100/H200 image: Python 3.12.3, torch 2.11.0+cu130,
# triton 3.6.0, transformers 5.17.0, CUDA 13 libraries as pip packages, no vLLM, no network).
# vLLM 0.32.0 needs torch 2.13.0, so the bundle carries torch 2.13.0, its triton and torchvision 0.28.0 too;
# everything is installed into /opt/vsite on the device, and `. /opt/vsite/env.sh` (PYTHONPATH) shadows the
# image's torch 2.11. (The 0.26 bundle, ../shared/gpu/make-bundle, is for vLLM 0.26.0 only.)
# --vllm=0.34.0 builds the vLLM 0.34.0 bundle instead (torch 2.14.0, its triton 3.8.0, torchvision 0.29.0,
# and transformers, tokenizers and huggingface_hub, which the image has too old: see the pin sets below).
#
# Usage (here, where PyPI is reachable; downloads are cached under ~/.cache/kitty-gpu-bundle):
#   scripts/make_gpu_bundle.sh [--vllm=VERSION] [--with-fa2] [--with-moe] [--with-cuda-libs[=NAME,...]] [OUT_DIR]
#                                                 (default: 0.32.0 into .gpu-bundle)
#   scripts/make_gpu_bundle.sh [--vllm=VERSION] --derive-deps   # re-derive its deps file (prints it)
#
#   --with-fa2         FlashAttention 2 (vllm_flash_attn/_vllm_fa2_C, 85 MB packed, +1 chunk): vLLM's
#                      turboquant_* KV formats and FA-version overrides need it; Hopper uses FA3 by default.
#   --with-moe         vLLM's MoE kernels (_moe_C_stable_libtorch, +38 MB): only MoE models load them.
#   --with-cuda-libs   the NVIDIA wheels torch 2.13.0 pins (cuda-toolkit 13.0.3 parts, cuDNN, NCCL, cuSPARSELt,
#                      NVSHMEM), for when the image's CUDA 13 libraries do not satisfy torch 2.13. Big (1.9 GB,
#                      ~31 chunks): `--with-cuda-libs=nccl,cudnn` takes only the packages whose names contain
#                      those words (nccl: 206 MB, +3 chunks).
#
# Output: OUT_DIR/01, 02, ... (git-ignored; without options 10 chunks, 600 MB), each < 60 MiB and each with
# the same MANIFEST (every part's chunk, offset, size and sha256). The payloads are xz tarballs of what
# `pip install --target` writes for the wheels (made here with pip, for CPython 3.12 / manylinux x86_64), with
# the debug sections stripped off shared libraries, cut byte-wise over the chunks: 30% smaller than the wheels.
# The first build spends ~15 minutes in xz on 2 cores; payloads are cached. CUDA wheels (--with-cuda-libs)
# travel as they are and are pip-installed on the device.
# On the device, one call per chunk, back to back (the machine goes back after 30 s idle):
#   run(command="bash scripts/gpu_bundle.sh stash", carry=[".gpu-bundle/01"])
#   ...
#   run(command="bash scripts/gpu_bundle.sh install && <command>", carry=[".gpu-bundle/NN"])
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=scripts

# vLLM requirements deliberately not carried (heavy, imported lazily, unused on Hopper for dense text models;
# see the header of gpu-bundle-deps.txt). Written into the MANIFEST, so the device check can name them.
OMIT=tilelang,z3-solver,torch-c-dlpack-ext,nvidia-cutlass-dsl,quack-kernels,tokenspeed-mla,tokenspeed-triton
OMIT=$OMIT,humming-kernels,torchcodec,pynvvideocodec,fastsafetensors,instanttensor,nvidia-cudnn-frontend
OMIT=$OMIT,nccl4py,nccl-extensions,cuda-python,numba
CHUNK_LIMIT=$((60 * 1024 * 1024 - 256 * 1024))   # bytes of parts per chunk; the rest is room for MANIFEST
CACHE=${KITTY_BUNDLE_CACHE:-$HOME/.cache/kitty-gpu-bundle}
PY=${PYTHON:-python3}   # the Python that runs pip here (any version: pip downloads for 3.12)

WITH_FA2=0 WITH_MOE=0 CUDA_LIBS="" DERIVE=0 OUT_DIR=.gpu-bundle VLLM_VERSION=0.32.0
for arg in "$@"; do
  case "$arg" in
    --vllm=*) VLLM_VERSION=${arg#--vllm=} ;;
    --with-fa2) WITH_FA2=1 ;;
    --with-moe) WITH_MOE=1 ;;
    --with-cuda-libs) CUDA_LIBS=all ;;
    --with-cuda-libs=*) CUDA_LIBS=${arg#--with-cuda-libs=} ;;
    --derive-deps) DERIVE=1 ;;
    -h|--help) sed -n 2,32p "$0"; exit 0 ;;
    -*) echo "make_gpu_bundle: unknown option $arg" >&2; exit 2 ;;
    OUT_DIR=*) OUT_DIR=${arg#OUT_DIR=}; OUT_DIR=${OUT_DIR%/} ;;
    *) OUT_DIR=${arg%/} ;;
  esac
done
case "$OUT_DIR" in /*|..*|*/*|"") echo "make_gpu_bundle: OUT_DIR must be a folder name inside the repo" >&2; exit 2 ;; esac

# Pin sets. REPLACE: packages the image has that the bundle carries anyway, in the version vLLM needs.
REPLACE=torch,triton,torchvision
case "$VLLM_VERSION" in
  0.32.0) TORCH_VERSION=2.13.0 FLASHINFER_VERSION=0.7.0.post1 DEPS_FILE=$HERE/gpu-bundle-deps.txt ;;
  # vLLM pins flashinfer-python==0.7.3, which PyPI does not have (0.7.2.post1, then 0.7.4); it needs
  # huggingface_hub>=2 (the image has 1.33.0, and its transformers 5.17.0 wants <2) and tokenizers>=0.23.3.
  0.34.0) TORCH_VERSION=2.14.0 FLASHINFER_VERSION=0.7.4 DEPS_FILE=$HERE/gpu-bundle-deps-0.34.0.txt
          REPLACE=$REPLACE,transformers,tokenizers,huggingface-hub ;;
  *) echo "make_gpu_bundle: no pin set for vLLM $VLLM_VERSION (add one)" >&2; exit 2 ;;
esac

log() { echo "[make_gpu_bundle] $*" >&2; }
PLAT=()
for n in $(seq 39 -1 5); do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
TARGET_PY=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none "${PLAT[@]}")
# PIP_CONSTRAINT= lifts this machine's pip constraints (torch<=2.14.1 and the like).
pipq() { env PIP_CONSTRAINT= PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip "$@" > "$CACHE/pip.log" 2>&1 \
           || { grep -v '^WARNING: Location' "$CACHE/pip.log" | tail -20 >&2; exit 1; }; }
download() { local dir=$1; shift; mkdir -p "$dir"; pipq download --no-deps "${TARGET_PY[@]}" -d "$dir" "$@"; }
mkdir -p "$CACHE"

# The wheel file in DIR for NAME==VERSION (names compared as pip does).
wheel_for() {
  "$PY" - "$@" <<'PY'
import os, sys
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version
d, name, version = sys.argv[1:4]
hits = [f for f in os.listdir(d) if f.endswith(".whl")
        and parse_wheel_filename(f)[0] == canonicalize_name(name) and parse_wheel_filename(f)[1] == Version(version)]
if len(hits) != 1:
    sys.exit(f"make_gpu_bundle: expected one wheel of {name}=={version} in {d}, found {hits}")
print(os.path.join(d, hits[0]))
PY
}
# The wheel of NAME==VERSION in DIR, downloaded first if it is not there.
fetch() {
  local dir=$1 name=$2 version=$3
  wheel_for "$dir" "$name" "$version" 2>/dev/null && return
  log "downloading $name==$version"
  download "$dir" "$name==$version" >&2
  wheel_for "$dir" "$name" "$version"
}
# The exact pin (==X) of NAME in a wheel's Requires-Dist (markers for Linux x86_64, CPython 3.12).
pin_in() {
  "$PY" - "$@" <<'PY'
import sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
whl, name = sys.argv[1:3]
env = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_system": "Linux",
       "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
with zipfile.ZipFile(whl) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in meta.splitlines():
    if line.startswith("Requires-Dist:"):
        r = Requirement(line.split(":", 1)[1].strip())
        if canonicalize_name(r.name) == canonicalize_name(name) and (r.marker is None or r.marker.evaluate(env)):
            (spec,) = r.specifier
            print(spec.version); break
else:
    sys.exit(f"make_gpu_bundle: {whl} pins no {name}")
PY
}

# ---------------------------------------------------------------------------------------------------------
# 1. Downloads
mkdir -p "$CACHE/wheels"
VLLM_WHL=$(fetch "$CACHE/wheels" vllm "$VLLM_VERSION")
FLASHINFER_WHL=$(fetch "$CACHE/wheels" flashinfer-python "$FLASHINFER_VERSION")

if [ "$DERIVE" = 1 ]; then
  # Resolve vllm + torch for the device's Python, then walk vLLM's requirements, stopping at what the image has.
  log "resolving vllm==$VLLM_VERSION for CPython 3.12 (about 2 minutes)"
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  # The image's known versions as constraints, except for the packages the bundle replaces.
  printf '%s\n' transformers==5.17.0 tokenizers==0.23.2 huggingface-hub==1.33.0 safetensors==0.8.0 \
    tiktoken==0.14.0 sentencepiece==0.2.2 torchaudio==2.11.0 | grep -v -E "^(${REPLACE//,/|})==" > "$tmp/image.txt"
  echo "torch==$TORCH_VERSION" >> "$tmp/image.txt"
  # vLLM's requirements, with flashinfer-python at the pin set's version (0.34.0's own pin is not on PyPI).
  "$PY" - "$VLLM_WHL" "$FLASHINFER_VERSION" > "$tmp/vllm.txt" <<'PY'
import sys, zipfile
from packaging.requirements import Requirement
whl, flashinfer = sys.argv[1:3]
with zipfile.ZipFile(whl) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in meta.splitlines():
    if line.startswith("Requires-Dist:"):
        r = line.split(":", 1)[1].strip()
        print(f"flashinfer-python=={flashinfer}" if Requirement(r).name == "flashinfer-python" else r)
PY
  pipq install --dry-run --ignore-installed --target "$tmp/t" "${TARGET_PY[@]}" -c "$tmp/image.txt" \
    --report "$tmp/report.json" -r "$tmp/vllm.txt"
  "$PY" - "$tmp/report.json" "$OMIT" "${KITTY_KINDS_MD:-/work/.library/device/KINDS.md}" "$REPLACE" \
    "$tmp/vllm.txt" <<'PY'
import json, re, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as cn
kinds = open(sys.argv[3]).read()   # the device image's package list
line = next(l for l in kinds.splitlines() if "Packages: absl-py" in l)
image = {cn(x.strip(" .")) for x in line.split("Packages:")[1].split(",")}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_system": "Linux",
       "sys_platform": "linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix"}
pk = {cn(i["metadata"]["name"]): i["metadata"] for i in json.load(open(sys.argv[1]))["install"]}
omit = {cn(x) for x in sys.argv[2].split(",")}
replace = {cn(x) for x in sys.argv[4].split(",")}
pk["vllm"] = {"name": "vllm", "requires_dist": open(sys.argv[5]).read().splitlines()}
handled = {"torch", "triton", "torchvision", "vllm", "flashinfer-python"}   # the script pins these itself
seen, extras, stack = {}, {}, [("vllm", frozenset())]
while stack:
    n, ex = stack.pop()
    if n in seen and ex <= extras[n]:
        continue
    seen[n] = True; extras[n] = extras.get(n, frozenset()) | ex
    for s in pk[n].get("requires_dist", []):
        r = Requirement(s)
        if r.marker and not any(r.marker.evaluate({**env, "extra": e}) for e in ("",) + tuple(extras[n])):
            continue
        c = cn(r.name)
        if c in omit or (c in image and c not in replace):
            continue
        stack.append((c, frozenset(r.extras)))
for n in sorted(set(seen) - handled, key=str.lower):
    print(f"{pk[n]['name']}=={pk[n]['version']}")
PY
  exit 0
fi

TORCH_DIR=$CACHE/torch
mkdir -p "$TORCH_DIR"
TORCH_WHL=$(fetch "$TORCH_DIR" torch "$TORCH_VERSION")    # ~530 MB the first time
TRITON_VERSION=$(pin_in "$TORCH_WHL" triton)
TORCHVISION_VERSION=$(pin_in "$VLLM_WHL" torchvision)
log "torch $TORCH_VERSION pins triton $TRITON_VERSION; vllm pins torchvision $TORCHVISION_VERSION"
TRITON_WHL=$(fetch "$TORCH_DIR" triton "$TRITON_VERSION")
TORCHVISION_WHL=$(fetch "$TORCH_DIR" torchvision "$TORCHVISION_VERSION")

log "downloading the dependencies in $DEPS_FILE"
DEPS_DIR=$CACHE/deps-vllm-$VLLM_VERSION
download "$DEPS_DIR" -r "$DEPS_FILE"
DEP_WHLS=()
while read -r name version; do DEP_WHLS+=("$(wheel_for "$DEPS_DIR" "$name" "$version")"); done \
  < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' -e 's/==/ /' "$DEPS_FILE")

CUDA_WHLS=()
if [ -n "$CUDA_LIBS" ]; then
  # torch's NVIDIA pins: nvidia-* directly, and cuda-toolkit[cublas,...]==V, whose extras pin the rest.
  CUDA_DIR=$CACHE/cuda-libs-torch-$TORCH_VERSION
  tk=$("$PY" - "$TORCH_WHL" <<'PY'
import sys, zipfile
from packaging.requirements import Requirement
env = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_system": "Linux",
       "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in meta.splitlines():
    if line.startswith("Requires-Dist:"):
        r = Requirement(line.split(":", 1)[1].strip())
        if r.name == "cuda-toolkit" and (r.marker is None or r.marker.evaluate(env)):
            print(f"{next(iter(r.specifier)).version} {','.join(sorted(r.extras))}")
PY
)
  download "$CUDA_DIR" "cuda-toolkit==${tk%% *}"
  TK_WHL=$(wheel_for "$CUDA_DIR" cuda-toolkit "${tk%% *}")
  mapfile -t cuda_pins < <("$PY" - "$TORCH_WHL" "$TK_WHL" "${tk#* }" <<'PY'
import sys, zipfile
from packaging.requirements import Requirement
torch_whl, tk_whl, extras = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
env = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_system": "Linux",
       "sys_platform": "linux", "platform_machine": "x86_64"}
def reqs(whl):
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    return [Requirement(l.split(":", 1)[1].strip()) for l in meta.splitlines() if l.startswith("Requires-Dist:")]
pins = {}
def take(r):
    # "==13.1.1.3.*" -> 13.1.1.3; a range ("<14,>=13.0.88") -> its lower bound, the release torch was built with.
    spec = {s.operator: s.version for s in r.specifier}
    pins[r.name] = (spec.get("==") or spec[">="]).removesuffix(".*")
for r in reqs(torch_whl):
    if r.name.startswith("nvidia-") and (r.marker is None or r.marker.evaluate({**env, "extra": ""})):
        take(r)
for r in reqs(tk_whl):
    if r.marker and any(r.marker.evaluate({**env, "extra": e}) for e in extras):
        take(r)
for name, version in sorted(pins.items()):
    print(f"{name}=={version}")
PY
)
  [ ${#cuda_pins[@]} -gt 0 ] || { echo "make_gpu_bundle: found no NVIDIA pins in $TORCH_WHL" >&2; exit 1; }
  sel=()
  for p in "${cuda_pins[@]}"; do
    if [ "$CUDA_LIBS" = all ]; then sel+=("$p"); continue; fi
    for w in ${CUDA_LIBS//,/ }; do case "${p%%==*}" in *"$w"*) sel+=("$p"); break ;; esac; done
  done
  [ ${#sel[@]} -gt 0 ] || { echo "make_gpu_bundle: --with-cuda-libs=$CUDA_LIBS matches none of: ${cuda_pins[*]}" >&2; exit 2; }
  log "downloading NVIDIA wheels: ${sel[*]}"
  download "$CUDA_DIR" "${sel[@]}"
  for p in "${sel[@]}"; do CUDA_WHLS+=("$(wheel_for "$CUDA_DIR" "${p%%==*}" "${p#*==}")"); done
fi

# ---------------------------------------------------------------------------------------------------------
# 2. Payloads: xz tarballs, cached under $CACHE/payloads by the names of what went in (and this script's flags).
PAY=$CACHE/payloads
mkdir -p "$PAY"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
key() { printf '%s\n' "$@" | sha256sum | cut -c1-12; }
# site_payload NAME WHEEL...: pip-install the wheels into a fresh folder for CPython 3.12, drop $PRUNE (paths
# relative to that folder), strip the debug sections off shared libraries (libtriton.so carries 237 MB of them;
# symbols stay), tar it, xz it.
PRUNE=""
site_payload() {
  local name=$1; shift
  local out; out=$PAY/$name-$(key "$@" "prune=$PRUNE" strip-debug).tar.xz
  if [ ! -s "$out" ]; then
    log "packing $name ($(du -shc "$@" | tail -1 | cut -f1) of wheels; xz takes a while on a busy machine)"
    rm -rf "$WORK/stage"
    pipq install --no-index --no-deps --no-compile "${TARGET_PY[@]}" --target "$WORK/stage" "$@"
    rm -rf "$WORK/stage/bin"   # console scripts with this machine's interpreter in their shebang
    local p; for p in $PRUNE; do rm -rf "${WORK:?}/stage/"$p; done
    strip_debug "$WORK/stage"
    tar -C "$WORK/stage" --sort=name --owner=0 --group=0 --numeric-owner -cf - . | xz -T0 -6 > "$out.tmp"
    mv "$out.tmp" "$out"; rm -rf "$WORK/stage"
  fi
  echo "$out"
}
strip_debug() {
  command -v strip >/dev/null && command -v readelf >/dev/null \
    || { log "no strip/readelf here (binutils): shared libraries keep their debug sections"; return 0; }
  local f
  while IFS= read -r -d '' f; do
    if readelf -S "$f" 2>/dev/null | grep -q '\.debug_'; then strip --strip-debug "$f"; fi
  done < <(find "$1" -type f -name '*.so*' -print0)
}
PAYLOADS=()   # "file name-in-bundle" pairs, in install order
add() { PAYLOADS+=("$1 $2"); }

add "$(site_payload site "$FLASHINFER_WHL" "$TORCHVISION_WHL" "${DEP_WHLS[@]}")" site.tar.xz

# vLLM: its package minus what a Hopper GPU never loads: FlashAttention 2 (unless --with-fa2), DeepGEMM,
# the SM100 FMHA kernels, the optional Rust frontend binary, and the MoE kernels (unless --with-moe).
vkey=$(key "$VLLM_WHL" "moe=$WITH_MOE" strip-debug)
VLLM_PAY=$PAY/vllm-$vkey.tar.xz
FA2_PAY=$PAY/vllm-fa2-$(key "$VLLM_WHL" strip-debug).tar.xz
need_fa2=0; [ "$WITH_FA2" = 1 ] && [ ! -s "$FA2_PAY" ] && need_fa2=1
if [ ! -s "$VLLM_PAY" ] || [ "$need_fa2" = 1 ]; then
  unzip -q "$VLLM_WHL" -d "$WORK/vllm"
  strip_debug "$WORK/vllm"
fi
if [ ! -s "$VLLM_PAY" ]; then
  log "packing vllm"
  ex=(--exclude=vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so --exclude=vllm/third_party/deep_gemm
      --exclude=vllm/third_party/fmha_sm100 --exclude=vllm/vllm-rs)
  [ "$WITH_MOE" = 1 ] || ex+=(--exclude=vllm/_moe_C_stable_libtorch.abi3.so)
  tar -C "$WORK/vllm" --sort=name --owner=0 --group=0 --numeric-owner "${ex[@]}" \
    -cf - vllm "vllm-$VLLM_VERSION.dist-info" | xz -T0 -6 > "$VLLM_PAY.tmp"
  mv "$VLLM_PAY.tmp" "$VLLM_PAY"
fi
if [ "$need_fa2" = 1 ]; then
  log "packing FlashAttention 2 (300 MB of library)"
  tar -C "$WORK/vllm" --owner=0 --group=0 --numeric-owner -cf - vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so \
    | xz -T0 -6 > "$FA2_PAY.tmp"
  mv "$FA2_PAY.tmp" "$FA2_PAY"
fi
rm -rf "$WORK/vllm"
add "$VLLM_PAY" vllm.tar.xz
[ "$WITH_FA2" = 1 ] && add "$FA2_PAY" vllm-fa2.tar.xz
# Triton: without its static CUPTI archives (link-time only) and the ptxas for sm_100+ (Hopper uses ptxas).
PRUNE="triton/backends/nvidia/lib/cupti/*.a triton/backends/nvidia/bin/ptxas-blackwell"
add "$(site_payload triton "$TRITON_WHL")" triton.tar.xz
PRUNE=""
add "$(site_payload torch "$TORCH_WHL")" torch.tar.xz
for w in "${CUDA_WHLS[@]}"; do add "$w" "$(basename "$w")"; done   # installed with pip on the device

# ---------------------------------------------------------------------------------------------------------
# 3. Chunks: the payloads one after the other, cut byte-wise into parts that fill each chunk to the limit.
log "writing chunks into $OUT_DIR/"
rm -rf "$OUT_DIR"
"$PY" - "$OUT_DIR" "$CHUNK_LIMIT" "$OMIT" \
  "vllm $VLLM_VERSION, flashinfer-python $FLASHINFER_VERSION, torch $TORCH_VERSION, triton $TRITON_VERSION, torchvision $TORCHVISION_VERSION" \
  "${PAYLOADS[@]}" <<'PY'
import hashlib, os, sys, time
out, limit, omit, what = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
payloads = [p.split(" ", 1) for p in sys.argv[5:]]
def sha(path, off=0, n=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(off); left = os.path.getsize(path) - off if n is None else n
        while left:
            b = f.read(min(left, 1 << 22)); h.update(b); left -= len(b)
    return h.hexdigest()
lines, parts, chunk, used = [], [], 1, 0
for src, name in payloads:
    size = os.path.getsize(src)
    lines.append(f"payload {name} {size} {sha(src)}")
    off, k = 0, 0
    while off < size:
        if used >= limit:
            chunk, used = chunk + 1, 0
        n = min(size - off, limit - used)
        part = f"{name}.part{k:02d}"
        parts.append((chunk, part, src, off, n))
        lines.append(f"part {chunk:02d} {part} {name} {off} {n} {sha(src, off, n)}")
        off, used, k = off + n, used + n, k + 1
bundle = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
manifest = "\n".join([
    "# kitty_vllm GPU bundle, made by scripts/make_gpu_bundle.sh on " + time.strftime("%Y-%m-%d"),
    f"# {what}",
    "# Install on the device: bash scripts/gpu_bundle.sh install (after every chunk was carried and stashed).",
    "# payload NAME SIZE SHA256 | part CHUNK FILE PAYLOAD OFFSET SIZE SHA256",
    f"bundle {bundle}", f"chunks {chunk}", f"omitted {omit}", *lines, ""])
for c in range(1, chunk + 1):
    os.makedirs(f"{out}/{c:02d}")
    with open(f"{out}/{c:02d}/MANIFEST", "w") as f:
        f.write(manifest)
for c, part, src, off, n in parts:
    with open(src, "rb") as f, open(f"{out}/{c:02d}/{part}", "wb") as g:
        f.seek(off)
        while n:
            b = f.read(min(n, 1 << 22)); g.write(b); n -= len(b)
print(f"[make_gpu_bundle] bundle {bundle}: {chunk} chunks")
PY

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx "/$OUT_DIR/" "$exclude" 2>/dev/null || echo "/$OUT_DIR/" >> "$exclude"

max=$((60 * 1024 * 1024))
n=0
for d in "$OUT_DIR"/[0-9][0-9]; do
  size=$(du -sb "$d" | cut -f1)
  [ "$size" -lt "$max" ] || { echo "make_gpu_bundle: $d is $size bytes, over 60 MiB" >&2; exit 1; }
  printf '  %s  %5.1f MiB  %s\n' "$d" "$(awk -v s="$size" 'BEGIN{print s / 1048576}')" "$(cd "$d" && ls | grep -v MANIFEST | tr '\n' ' ')"
  n=$((n + 1))
done
echo
echo "Device calls, back to back (the machine is given back after 30 s idle), one chunk per call:"
ENV=""
[ "$OUT_DIR" = .gpu-bundle ] || ENV="KITTY_BUNDLE_DIR=$OUT_DIR "   # gpu_bundle.sh reads .gpu-bundle by default
i=0
for d in "$OUT_DIR"/[0-9][0-9]; do
  i=$((i + 1))
  if [ "$i" -lt "$n" ]; then
    echo "  run(command=\"${ENV}bash scripts/gpu_bundle.sh stash\", carry=[\"$d\"])"
  else
    echo "  run(command=\"${ENV}bash scripts/gpu_bundle.sh install && <your command>\", carry=[\"$d\"])"
  fi
done
echo "Then, in every later call while the machine stays warm: . /opt/vsite/env.sh"
