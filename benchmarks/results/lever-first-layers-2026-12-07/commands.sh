# The exact commands of this folder, run from the repository root on the CPU (2 cores, shared with a CI
# run), vLLM 0.32.0 CPU build, torch 2.13.
.venv/bin/python -m kitty_vllm.tools.eval --model smollm2 --dtype float32 --tasks perplexity \
    --ppl-window 2048 --ppl-windows 8 \
    --kv-cache-dtypes auto kitty2 kitty2:skip=0 kitty2:skip=0,1 kitty2-lite \
    --json benchmarks/results/lever-first-layers-2026-12-07/perplexity-smollm2-float32.json
.venv/bin/python -m kitty_vllm.tools.study \
    --eval-json benchmarks/results/lever-first-layers-2026-12-07/perplexity-smollm2-float32.json \
    --kv-cache-dtypes auto kitty2 kitty2:skip=0 kitty2:skip=0,1 kitty2-lite \
    --json benchmarks/results/lever-first-layers-2026-12-07/study.json
