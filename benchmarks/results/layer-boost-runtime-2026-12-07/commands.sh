# The exact commands of this folder, run from the repository root on the CPU (2 cores, shared with other
# work), vLLM 0.32.0 CPU build, torch 2.13, one at a time, under nice -n 19.
D=benchmarks/results/layer-boost-runtime-2026-12-07
P=$D/qwen-1.5b-layer-boost.yaml
# Qwen2.5-Coder-1.5B-Instruct's profile (the first call also downloaded and converted the model; 127 s in all):
nice -n 19 .venv/bin/python -m kitty_vllm.tools.calibrate --model qwen-1.5b --out $P
# The float32 decode-time simulation (--reference), 8 windows of 2,048 tokens, as ../lever-screen-qwen-0.5b-2026-12-07:
for v in auto kitty2 kitty2:lever=layer-boost=$P; do
  echo "=== $(date -u +%H:%M:%S) start $v" >> $D/eval.log
  nice -n 19 .venv/bin/python -m kitty_vllm.tools.eval --model qwen-1.5b --reference --tasks perplexity \
    --ppl-window 2048 --ppl-windows 8 --kv-cache-dtypes $v \
    --json $D/perplexity-qwen-1.5b-float32-sim.json >> $D/eval.log 2>&1
  echo "=== $(date -u +%H:%M:%S) end $v rc=$?" >> $D/eval.log
done
.venv/bin/python -m kitty_vllm.tools.study --eval-json $D/perplexity-qwen-1.5b-float32-sim.json \
    --kv-cache-dtypes auto kitty2 kitty2:lever=layer-boost=$P --json $D/study.json
# The same windows through vLLM on the CPU (its kitty backend on the reference path, float32), the profile
# served by the runtime: kitty2-layer-boost-qwen-1.5b.yaml holds `layer_boost: qwen-1.5b-layer-boost.yaml`.
for v in auto kitty2 kitty2:$D/kitty2-layer-boost-qwen-1.5b.yaml; do
  echo "=== $(date -u +%H:%M:%S) start $v" >> $D/eval-vllm.log
  nice -n 19 .venv/bin/python -m kitty_vllm.tools.eval --model qwen-1.5b --dtype float32 --tasks perplexity \
    --ppl-window 2048 --ppl-windows 8 --kv-cache-dtypes $v \
    --json $D/perplexity-qwen-1.5b-float32-vllm.json >> $D/eval-vllm.log 2>&1
  echo "=== $(date -u +%H:%M:%S) end $v rc=$?" >> $D/eval-vllm.log
done
.venv/bin/python -m kitty_vllm.tools.study --eval-json $D/perplexity-qwen-1.5b-float32-vllm.json \
    --kv-cache-dtypes auto kitty2 kitty2:$D/kitty2-layer-boost-qwen-1.5b.yaml --json $D/study-vllm.json
