# The exact commands of this folder, run from the repository root on the CPU (2 cores), vLLM 0.32.0 CPU build,
# torch 2.13, main at 5a3b197.
.venv/bin/python -m kitty_vllm.tools.eval --model smollm2 --dtype float32 --tasks perplexity \
    --ppl-window 2048 --ppl-windows 8 --kv-cache-dtypes auto kitty2 kitty2:value-rotation \
    --json benchmarks/results/value-rotation-vllm-cpu-2026-12-07/perplexity-smollm2-float32.json
.venv/bin/python -m kitty_vllm.tools.study \
    --eval-json benchmarks/results/value-rotation-vllm-cpu-2026-12-07/perplexity-smollm2-float32.json \
    --kv-cache-dtypes auto kitty2 kitty2:value-rotation \
    --json benchmarks/results/value-rotation-vllm-cpu-2026-12-07/study.json
