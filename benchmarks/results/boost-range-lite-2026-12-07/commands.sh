# The exact commands of this folder, run from the repository root on the CPU (2 cores), vLLM 0.32.0 CPU build,
# torch 2.13: issue 30's boost policy `range` at kitty2-lite's 12.5% ratio, in the float32 decode-time
# simulation (--reference) on the same 8 windows of 2,048 tokens per model as ../boost-range-2026-12-07.
D=benchmarks/results/boost-range-lite-2026-12-07
# SmolLM2's kitty2-lite row ran first, in a run with `kitty2-lite:boost-range` beside it, which was kitty2's
# range ablation under kitty2-lite's label (23.051, ../boost-range-2026-12-07's kitty2:boost-range to the
# digit): eval now refuses that name on kitty2-lite. The kitty2-lite row alone was kept:
#   .venv/bin/python -m kitty_vllm.tools.eval --model smollm2 --reference --tasks perplexity \
#       --ppl-window 2048 --ppl-windows 8 --kv-cache-dtypes kitty2-lite --json $D/perplexity-smollm2-float32-sim.json
.venv/bin/python -m kitty_vllm.tools.eval --model smollm2 --reference --tasks perplexity --ppl-window 2048 \
    --ppl-windows 8 --kv-cache-dtypes kitty2-lite:$D/kitty2-lite-range.yaml \
    --json $D/perplexity-smollm2-float32-sim.json > $D/eval-smollm2-range.log 2>&1
for m in qwen-0.5b qwen-1.5b; do
  .venv/bin/python -m kitty_vllm.tools.eval --model $m --reference --tasks perplexity --ppl-window 2048 \
      --ppl-windows 8 --kv-cache-dtypes kitty2-lite kitty2-lite:$D/kitty2-lite-range.yaml \
      --json $D/perplexity-$m-float32-sim.json > $D/eval-$m.log 2>&1
done
bash $D/merge_and_study.sh smollm2 qwen-0.5b qwen-1.5b
