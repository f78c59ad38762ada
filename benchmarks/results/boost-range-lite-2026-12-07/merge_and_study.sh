# auto's, kitty2's and kitty2:boost-range's records from ../boost-range-2026-12-07 (the same 8 windows, code
# unchanged since), beside this folder's kitty2-lite rows; then the paired studies.
D=benchmarks/results/boost-range-lite-2026-12-07
for m in "$@"; do
  python3 - "$m" <<'PY'
import json, sys
m = sys.argv[1]
D = "benchmarks/results/boost-range-lite-2026-12-07"
base = [r for r in json.load(open(f"benchmarks/results/boost-range-2026-12-07/perplexity-{m}-float32-sim.json"))
        if r["kv_cache_dtype"] in ("auto", "kitty2", "kitty2:boost-range")]
lite = json.load(open(f"{D}/perplexity-{m}-float32-sim.json"))
json.dump(base + [r for r in lite if r["kv_cache_dtype"].startswith("kitty2-lite")], open(f"{D}/merged-{m}.json", "w"),
          indent=1)
PY
  .venv/bin/python -m kitty_vllm.tools.study --eval-json $D/merged-$m.json --kv-cache-dtypes auto kitty2 \
      kitty2:boost-range kitty2-lite kitty2-lite:$D/kitty2-lite-range.yaml --json $D/study-$m.json
done
