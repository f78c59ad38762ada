#!/usr/bin/env bash
# Runs ON the lent GPU machine, from the repo root: installs the vLLM 0.32.0 bundle that
# scripts/make_gpu_bundle.sh cut into chunk folders .gpu-bundle/01, 02, ... (one device call carries at most
# 64 MiB, so the chunks come over several calls, back to back while the machine stays warm).
#
#   bash scripts/gpu_bundle.sh stash                  # in every call that carries chunk folders
#   bash scripts/gpu_bundle.sh install [--python PY]  # stashes too; once every chunk has been carried
#   bash scripts/gpu_bundle.sh verify  [--python PY]  # the import check alone
#
# stash copies the carried chunks' parts into $KITTY_BUNDLE_STASH (default /tmp/kitty-bundle) and says which
# chunks are still missing. install checks every part against the MANIFEST (size, sha256), unpacks the
# payloads (xz tarballs of pip-installed wheels: deps + flashinfer + torchvision, vLLM, triton, torch) into
# $KITTY_BUNDLE_TARGET (default /opt/vsite), pip-installs any NVIDIA wheels in the bundle there, and imports
# torch, triton and vllm with PYTHONPATH=$KITTY_BUNDLE_TARGET:$PWD. A second install of the same bundle does
# nothing. Afterwards, in every call: . /opt/vsite/env.sh   (PYTHONPATH=/opt/vsite:$PWD, and LD_PRELOAD of the
# NCCL shim where the image's NCCL is older than torch's: see nccl_shim below)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${KITTY_BUNDLE_DIR:-.gpu-bundle}
STASH=${KITTY_BUNDLE_STASH:-/tmp/kitty-bundle}
TARGET=${KITTY_BUNDLE_TARGET:-/opt/vsite}
TARGET=${TARGET%/}
PY=${KITTY_BUNDLE_PYTHON:-python3}
T0=$SECONDS

say() { echo "[gpu_bundle] $*"; }
die() { echo "[gpu_bundle] ERROR: $*" >&2; exit 1; }

cmd=${1:-}
[ $# -gt 0 ] && shift
while [ $# -gt 0 ]; do
  case "$1" in
    --python) [ $# -ge 2 ] || die "--python needs a path"; PY=$2; shift 2 ;;
    --python=*) PY=${1#--python=}; shift ;;
    *) die "unknown argument: $1" ;;
  esac
done

field() { awk -v k="$1" '$1 == k { print $2; exit }' "$2"; }   # e.g. field bundle MANIFEST

# Parts of the stashed MANIFEST that are not (yet) in the stash with their full size, as "CHUNK FILE".
missing_parts() {
  local chunk file size
  while read -r chunk file size; do
    [ "$(stat -c %s "$STASH/$file" 2>/dev/null || echo -1)" = "$size" ] || echo "$chunk $file"
  done < <(awk '$1 == "part" { print $2, $3, $6 }' "$STASH/MANIFEST")
}

stash() {
  mkdir -p "$STASH"
  local carried=() d id
  for d in "$SRC"/[0-9][0-9]; do [ -f "$d/MANIFEST" ] && carried+=("$d"); done
  if [ ${#carried[@]} -gt 0 ]; then
    id=$(field bundle "${carried[0]}/MANIFEST")
    for d in "${carried[@]}"; do
      [ "$(field bundle "$d/MANIFEST")" = "$id" ] \
        || die "$d belongs to another bundle than ${carried[0]}: rebuild and carry chunks of one build"
    done
    if [ -f "$STASH/MANIFEST" ] && [ "$(field bundle "$STASH/MANIFEST")" != "$id" ]; then
      say "the stash holds bundle $(field bundle "$STASH/MANIFEST"), the carried chunks are bundle $id: starting over"
      find "$STASH" -mindepth 1 -maxdepth 1 -name '*.part[0-9][0-9]' -delete
      rm -f "$STASH/MANIFEST" "$STASH/.verified"
    fi
    cp "${carried[0]}/MANIFEST" "$STASH/MANIFEST.tmp" && mv "$STASH/MANIFEST.tmp" "$STASH/MANIFEST"
    local f base n=0
    for d in "${carried[@]}"; do
      for f in "$d"/*.part[0-9][0-9]; do
        [ -e "$f" ] || continue
        base=${f##*/}
        [ "$(stat -c %s "$STASH/$base" 2>/dev/null || echo -1)" = "$(stat -c %s "$f")" ] && continue
        cp "$f" "$STASH/$base.tmp" && mv "$STASH/$base.tmp" "$STASH/$base"
        n=$((n + 1))
      done
    done
    say "stashed ${carried[*]} ($n new parts) in $STASH"
  else
    say "no chunk folder ($SRC/NN) was carried in this call"
  fi
  [ -f "$STASH/MANIFEST" ] || { say "nothing stashed yet: carry .gpu-bundle/01 (made by scripts/make_gpu_bundle.sh)"; return 0; }
  local total missing
  total=$(field chunks "$STASH/MANIFEST")
  missing=$(missing_parts | cut -d' ' -f1 | sort -u | tr '\n' ' ')
  if [ -z "$missing" ]; then
    say "bundle $(field bundle "$STASH/MANIFEST"): all $total chunks are stashed; next: bash scripts/gpu_bundle.sh install"
  else
    say "bundle $(field bundle "$STASH/MANIFEST"): chunks still missing: ${missing% } (of $total)"
  fi
}

verify() {
  local ver
  ver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || die "no Python at $PY"
  if [ "$ver" != 3.12 ] || [ "$(uname -m)" != x86_64 ]; then
    say "import check skipped: $PY is Python $ver on $(uname -m), the bundle is for CPython 3.12 on x86_64"
    return 0
  fi
  say "import check ($PY, $(grep -o 'LD_PRELOAD' "$TARGET/env.sh" 2>/dev/null || echo "no preload"), PYTHONPATH=$TARGET:$PWD)"
  # The import line, then where the modules came from and the requirements of vLLM/torch that this Python does
  # not meet (only a warning: some are left out on purpose, see scripts/gpu-bundle-deps.txt).
  [ -f "$TARGET/env.sh" ] || die "$TARGET/env.sh is missing: install the bundle (bash scripts/gpu_bundle.sh install)"
  (. "$TARGET/env.sh" && PYTHONPATH="$TARGET:$PWD" "$PY" - "$TARGET" "$(field omitted "$TARGET/.kitty-bundle.MANIFEST" 2>/dev/null || true)" <<'PY'
import torch, triton, vllm; print(torch.__version__, triton.__version__, vllm.__version__, torch.cuda.is_available())
import importlib.metadata as md, os, sys
target, omitted = sys.argv[1], set(filter(None, sys.argv[2].split(",")))
for m in (torch, triton, vllm):
    if not os.path.realpath(m.__file__).startswith(os.path.realpath(target) + os.sep):
        print(f"[gpu_bundle] WARNING: {m.__name__} comes from {m.__file__}, not from {target}")
if torch.cuda.is_available():   # which CUDA libraries torch 2.13 got, and whether cuBLAS runs
    info = [torch.cuda.get_device_name(), f"CUDA {torch.version.cuda}"]
    checks = (("cuDNN", torch.backends.cudnn.version),
              ("NCCL", lambda: ".".join(map(str, torch.cuda.nccl.version()))),
              ("cuBLAS matmul", lambda: "ok" if (torch.ones(64, 64, device="cuda", dtype=torch.bfloat16)
                                                 @ torch.ones(64, 64, device="cuda", dtype=torch.bfloat16)
                                                 )[0, 0].item() == 64 else "WRONG RESULT"))
    for label, fn in checks:
        try:
            info.append(f"{label} {fn()}")
        except Exception as e:
            info.append(f"{label} FAILED: {str(e).splitlines()[0][:200]}")
    print("[gpu_bundle] GPU:", " | ".join(info))
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:
    sys.exit(0)
unmet, left_out = [], []
for dist in ("vllm", "flashinfer-python", "torch", "torchvision"):
    for s in md.requires(dist) or []:
        r = Requirement(s)
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(r.name)
        except md.PackageNotFoundError:
            have = None
        if have is not None and r.specifier.contains(have, prereleases=True):
            continue
        if canonicalize_name(r.name) in omitted:
            left_out.append(r.name)
        else:
            unmet.append(f"{r} ({dist}; found {have or 'none'})")
if left_out:
    print("[gpu_bundle] left out on purpose:", ", ".join(sorted(set(left_out))))
for u in sorted(set(unmet)):
    print("[gpu_bundle] requirement not met:", u)
PY
  )
}

# torch 2.13 imports NCCL 2.29 entry points (ncclSignal, ncclCommSuspend, ...) that an older libnccl.so.2 of the
# image lacks, and the import of torch fails on the first undefined symbol. Unless the bundle brings NCCL
# (--with-cuda-libs=nccl), the missing ones get stubs, compiled here into a library that env.sh preloads: one
# GPU never calls them (vLLM creates NCCL communicators only for tensor or pipeline parallelism), and a call
# returns ncclInvalidUsage with a message that names the fix. Writes $1/env.sh either way.
nccl_shim() {
  local dir=$1 torch_cuda=$1/torch/lib/libtorch_cuda.so nccl="" preload=""
  if [ ! -e "$dir/nvidia/nccl/lib/libnccl.so.2" ]; then
    nccl=$(PYTHONPATH= "$PY" -c 'import glob, os, nvidia
print(next(iter(sorted(f for p in nvidia.__path__ for f in glob.glob(os.path.join(p, "nccl/lib/libnccl.so.2")))), ""))' \
      2>/dev/null || true)
    [ -n "$nccl" ] || nccl=$(ldconfig -p 2>/dev/null | awk '$1 == "libnccl.so.2" { print $NF; exit }')
  fi
  if [ -n "$nccl" ] && [ -e "$torch_cuda" ]; then
    command -v nm >/dev/null || die "nm (binutils) is needed to compare torch's NCCL symbols with $nccl"
    local missing
    missing=$(comm -23 <(nm -D --undefined-only "$torch_cuda" | awk '$2 ~ /^nccl/ { print $2 }' | sort -u) \
                       <(nm -D --defined-only "$nccl" | awk '{ print $3 }' | sort -u))
    if [ -n "$missing" ]; then
      mkdir -p "$dir/nccl-shim"
      { echo '#include <stdio.h>'
        echo 'static int missing(const char *name) {'
        echo '  fprintf(stderr, "kitty NCCL shim: %s is not in this machine'"'"'s libnccl.so.2 ('"$nccl"'); "'
        echo '          "bundle NCCL with scripts/make_gpu_bundle.sh --with-cuda-libs=nccl\n", name);'
        echo '  return 5;  /* ncclInvalidUsage */'
        echo '}'
        for s in $missing; do echo "int $s(void) { return missing(\"$s\"); }"; done
      } > "$dir/nccl-shim/shim.c"
      "${CC:-cc}" -shared -fPIC -O2 -o "$dir/nccl-shim/libkitty_nccl_shim.so" "$dir/nccl-shim/shim.c" \
        || die "could not compile the NCCL shim ($dir/nccl-shim/shim.c)"
      preload=$dir/nccl-shim/libkitty_nccl_shim.so
      say "the image's NCCL ($nccl) lacks $(echo $missing | wc -w) symbols of torch's: stubbed ($(echo $missing))"
    fi
  fi
  { echo "# Written by scripts/gpu_bundle.sh install: source it in every call (. $TARGET/env.sh)."
    echo "export PYTHONPATH=$TARGET:\$PWD\${PYTHONPATH:+:\$PYTHONPATH}"
    [ -z "$preload" ] || echo "export LD_PRELOAD=${preload/#$dir/$TARGET}\${LD_PRELOAD:+:\$LD_PRELOAD}"
  } > "$dir/env.sh"
}

install() {
  stash
  [ -f "$STASH/MANIFEST" ] || die "nothing stashed: carry the chunk folders first"
  local id; id=$(field bundle "$STASH/MANIFEST")
  if [ "$(cat "$TARGET/.kitty-bundle" 2>/dev/null)" = "$id" ]; then
    say "bundle $id is already installed in $TARGET: nothing to do"
    return 0
  fi
  local missing; missing=$(missing_parts | cut -d' ' -f1 | sort -u | tr '\n' ' ')
  [ -z "$missing" ] || die "chunks still missing: ${missing% }; carry them (bash scripts/gpu_bundle.sh stash) first"
  if [ -e "$TARGET" ] && [ -n "$(ls -A "$TARGET" 2>/dev/null)" ] && [ ! -f "$TARGET/.kitty-bundle.MANIFEST" ] \
     && [ ! -d "$TARGET/vllm" ] && [ ! -d "$TARGET/torch" ]; then
    die "$TARGET holds something else than a vLLM bundle; empty it or set KITTY_BUNDLE_TARGET"
  fi

  # 1. Every part against the MANIFEST (sizes were checked above). Once checked, a part is not hashed again.
  if [ "$(cat "$STASH/.verified" 2>/dev/null)" != "$id" ]; then
    awk '$1 == "part" { print $7 "  " $3 }' "$STASH/MANIFEST" | sort -k2 > "$STASH/SHA256SUMS"
    (cd "$STASH" && awk '{ print $2 }' SHA256SUMS | xargs -P 8 -n 2 sha256sum | sort -k2) > "$STASH/SHA256SUMS.got"
    if ! cmp -s "$STASH/SHA256SUMS" "$STASH/SHA256SUMS.got"; then
      # Drop the damaged parts, so that stash takes them again from the chunks that carry them.
      local bad; bad=$(diff "$STASH/SHA256SUMS" "$STASH/SHA256SUMS.got" | awk '/^>/ { print $3 }' | sort -u || true)
      (cd "$STASH" && rm -f $bad)
      die "sha256 mismatch in $(echo $bad): carry chunk(s) $(for b in $bad; do awk -v f="$b" '$1 == "part" && $3 == f { print $2 }' "$STASH/MANIFEST"; done | sort -u | tr '\n' ' ')again"
    fi
    rm -f "$STASH/SHA256SUMS.got"
    echo "$id" > "$STASH/.verified"
    say "all $(grep -c '' "$STASH/SHA256SUMS") parts match the MANIFEST ($((SECONDS - T0)) s)"
  fi

  # 2. Unpack the tarballs side by side into a fresh folder; then pip-install any wheels there.
  local new="$TARGET.installing"
  rm -rf "$new"; mkdir -p "$new"
  local name pids=() names=() wheels=()
  unxz() { if command -v xz >/dev/null; then xz -dc -T0; else "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 20)'; fi; }
  while read -r name; do
    local files=()
    mapfile -t files < <(awk -v p="$name" -v s="$STASH" '$1 == "part" && $4 == p { print s "/" $3 }' "$STASH/MANIFEST")
    case "$name" in
      *.tar.xz)
        ( cat "${files[@]}" | unxz | tar -C "$new" -xf - ) &
        pids+=($!); names+=("$name") ;;
      *.whl)
        mkdir -p "$STASH/wheels"
        cat "${files[@]}" > "$STASH/wheels/$name"
        wheels+=("$STASH/wheels/$name") ;;
      *) die "unknown payload type: $name" ;;
    esac
  done < <(awk '$1 == "payload" { print $2 }' "$STASH/MANIFEST")
  local i failed=0
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || { echo "[gpu_bundle] unpacking ${names[$i]} failed" >&2; failed=1; }; done
  [ "$failed" = 0 ] || { rm -rf "$new"; die "unpacking failed"; }
  say "unpacked ${names[*]} ($((SECONDS - T0)) s)"
  if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      --target "$new" "${wheels[@]}" > "$STASH/pip.log" 2>&1 \
      || { cat "$STASH/pip.log" >&2; rm -rf "$new"; die "pip could not install the NVIDIA wheels"; }
    rm -rf "$STASH/wheels"
    say "pip-installed ${#wheels[@]} NVIDIA wheels ($((SECONDS - T0)) s)"
  fi
  cp "$STASH/MANIFEST" "$new/.kitty-bundle.MANIFEST"
  nccl_shim "$new"
  if [ -e "$TARGET" ]; then rm -rf "$TARGET"; fi
  mv "$new" "$TARGET"
  say "bundle $id unpacked into $TARGET ($((SECONDS - T0)) s)"
  verify
  echo "$id" > "$TARGET/.kitty-bundle"   # only now: a failed import check leaves the bundle to be installed again
  say "bundle $id installed in $((SECONDS - T0)) s; in every later call: . $TARGET/env.sh"
}

case "$cmd" in
  stash) stash ;;
  install) install ;;
  verify) verify ;;
  *) sed -n 2,15p "$0"; exit 2 ;;
esac
