# The exact commands of this folder, run from the repository root on the CPU (2 cores), vLLM 0.32.0 CPU build,
# torch 2.13, one at a time: issue 30's boost policy, screened in the float32 decode-time simulation
# (--reference) on the same 8 windows of 2,048 tokens per model as ../lever-screen-2026-12-07 (SmolLM2),
# ../lever-screen-qwen-0.5b-2026-12-07 and ../layer-boost-runtime-2026-12-07 (Qwen2.5-Coder-1.5B).
D=benchmarks/results/boost-range-2026-12-07
# SmolLM2-135M: every row run here (auto and kitty2 reproduce the earlier screen's 22.543 and 23.220).
.venv/bin/python -m kitty_vllm.tools.eval --model smollm2 --reference --tasks perplexity \
    --ppl-window 2048 --ppl-windows 8 --kv-cache-dtypes auto kitty2 kitty2:boost-range kitty2:boost-variance \
    --json $D/perplexity-smollm2-float32-sim.json > $D/eval-smollm2.log 2>&1
# The Qwen models: auto's and kitty2's records are copied from the earlier screens' jsons (the simulation's
# code for them has not changed since: only the range policy was added to kitty_vllm/reference.py), then
# the new rows run into the same file.
python3 - <<'PY'
import json
for model, src in [("qwen-0.5b", "lever-screen-qwen-0.5b-2026-12-07"), ("qwen-1.5b", "layer-boost-runtime-2026-12-07")]:
    records = json.load(open(f"benchmarks/results/{src}/perplexity-{model}-float32-sim.json"))
    json.dump([r for r in records if r["kv_cache_dtype"] in ("auto", "kitty2")],
              open(f"benchmarks/results/boost-range-2026-12-07/perplexity-{model}-float32-sim.json", "w"), indent=1)
PY
.venv/bin/python -m kitty_vllm.tools.eval --model qwen-0.5b --reference --tasks perplexity \
    --ppl-window 2048 --ppl-windows 8 --kv-cache-dtypes kitty2:boost-range kitty2:boost-variance \
    --json $D/perplexity-qwen-0.5b-float32-sim.json > $D/eval-qwen-0.5b.log 2>&1
.venv/bin/python -m kitty_vllm.tools.eval --model qwen-1.5b --reference --tasks perplexity \
    --ppl-window 2048 --ppl-windows 8 --kv-cache-dtypes kitty2:boost-range \
    --json $D/perplexity-qwen-1.5b-float32-sim.json > $D/eval-qwen-1.5b.log 2>&1
for m in smollm2 qwen-0.5b qwen-1.5b; do
  v="auto kitty2 kitty2:boost-range"; [ $m != qwen-1.5b ] && v="$v kitty2:boost-variance"
  .venv/bin/python -m kitty_vllm.tools.study --eval-json $D/perplexity-$m-float32-sim.json \
      --kv-cache-dtypes $v --json $D/study-$m.json
done
