# The exact commands of this folder, run from the repository root on the CPU (2 cores, shared with other
# work), vLLM 0.32.0 CPU build, torch 2.13. The same 8 windows of 2,048 tokens as
# ../lever-first-layers-2026-12-07 (--ppl-window 2048 --ppl-windows 8), scored by the float32 decode-time
# simulation (--reference) instead of vLLM; the levers run there only. Two eval runs into one file.
.venv/bin/python -m kitty_vllm.tools.eval --model smollm2 --reference --tasks perplexity \
    --ppl-window 2048 --ppl-windows 8 \
    --kv-cache-dtypes auto kitty2 \
    --json benchmarks/results/lever-screen-2026-12-07/perplexity-smollm2-float32-sim.json
.venv/bin/python -m kitty_vllm.tools.eval --model smollm2 --reference --tasks perplexity \
    --ppl-window 2048 --ppl-windows 8 \
    --kv-cache-dtypes kitty2:lever=value-lag kitty2:lever=hadamard-v kitty2:lever=value-lag,hadamard-v \
    --json benchmarks/results/lever-screen-2026-12-07/perplexity-smollm2-float32-sim.json
.venv/bin/python -m kitty_vllm.tools.study \
    --eval-json benchmarks/results/lever-screen-2026-12-07/perplexity-smollm2-float32-sim.json \
    --kv-cache-dtypes auto kitty2 kitty2:lever=value-lag kitty2:lever=hadamard-v kitty2:lever=value-lag,hadamard-v \
    --json benchmarks/results/lever-screen-2026-12-07/study.json
# The value lag's capacity if its kernels kept Keys and Values of 256 tokens in the ring (128 more of each,
# as many bytes as 256 more Values alone), instead of 128 more Values alone (the study's figure):
.venv/bin/python -c "
from kitty_vllm.config import KittyConfig
from kitty_vllm.tools.capacity import EVAL_MODELS, auto_bytes, kitty_bytes
config = KittyConfig.from_preset('kitty2')
for shape in EVAL_MODELS:
    for n in (4624, 32768):
        ratio = auto_bytes(shape, n) / kitty_bytes(shape, config, n, lagged_values=2 * config.page_size)
        print(f'{shape.model} {n}: {ratio:.2f}x auto')
" > benchmarks/results/lever-screen-2026-12-07/value-lag-ring-of-256-tokens.txt
# Both levers paired against the Hadamard rotation alone (what the value lag adds to it), as the study pairs:
.venv/bin/python -c "
import json
from kitty_vllm.tools.study import paired_difference
records = {r['kv_cache_dtype']: r for r in json.load(open(
    'benchmarks/results/lever-screen-2026-12-07/perplexity-smollm2-float32-sim.json'))}
d = paired_difference(records['kitty2 (value-lag + hadamard-v)']['window_nlls'],
                      records['kitty2 (hadamard-v)']['window_nlls'])
low, high = d['perplexity_change_ci95']
print(f\"value-lag + hadamard-v vs hadamard-v: {d['perplexity_change']:+.2%} [{low:+.2%}, {high:+.2%}], \"
      f\"{d['windows_worse']} of 8 windows worse\")
" > benchmarks/results/lever-screen-2026-12-07/both-vs-hadamard-v.txt
