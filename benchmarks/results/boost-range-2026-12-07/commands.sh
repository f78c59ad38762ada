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
# Range with a per-layer profile calibrated under it: the profile, a two-line config, the simulation.
for m in qwen-0.5b smollm2 qwen-1.5b; do
  .venv/bin/python -m kitty_vllm.tools.calibrate --model $m --boost-policy range \
      --out $D/$m-layer-boost-range.yaml > $D/calibrate-$m.log 2>&1
  printf 'boost_policy: range\nlayer_boost: %s-layer-boost-range.yaml\n' $m > $D/kitty2-range-layer-boost-$m.yaml
  .venv/bin/python -m kitty_vllm.tools.eval --model $m --reference --tasks perplexity \
      --ppl-window 2048 --ppl-windows 8 --kv-cache-dtypes kitty2:$D/kitty2-range-layer-boost-$m.yaml \
      --json $D/perplexity-$m-float32-sim.json > $D/eval-$m-range-layer-boost.log 2>&1
done
# The mean-|K| profiles' rows, copied from their screens, and the studies with every row:
python3 - <<'PY'
import json
D = "benchmarks/results/boost-range-2026-12-07"
for model, src, label in [
        ("smollm2", "lever-layer-boost-2026-12-07", "kitty2 (layer-boost=smollm2-layer-boost)"),
        ("qwen-0.5b", "lever-screen-qwen-0.5b-2026-12-07", "kitty2 (layer-boost=qwen-0.5b-layer-boost)"),
        ("qwen-1.5b", "layer-boost-runtime-2026-12-07", "kitty2 (layer-boost=qwen-1.5b-layer-boost)")]:
    records = json.load(open(f"{D}/perplexity-{model}-float32-sim.json"))
    records += [r for r in json.load(open(f"benchmarks/results/{src}/perplexity-{model}-float32-sim.json"))
                if r["kv_cache_dtype"] == label]
    json.dump(records, open(f"{D}/perplexity-{model}-float32-sim.json", "w"), indent=1)
PY
for m in smollm2:lever-layer-boost-2026-12-07 qwen-0.5b:lever-screen-qwen-0.5b-2026-12-07 \
         qwen-1.5b:layer-boost-runtime-2026-12-07; do
  src=${m#*:}; m=${m%%:*}
  v="auto kitty2 kitty2:boost-range"; [ $m != qwen-1.5b ] && v="$v kitty2:boost-variance"
  .venv/bin/python -m kitty_vllm.tools.study --eval-json $D/perplexity-$m-float32-sim.json \
      --kv-cache-dtypes $v kitty2:lever=layer-boost=benchmarks/results/$src/$m-layer-boost.yaml \
      kitty2:$D/kitty2-range-layer-boost-$m.yaml --json $D/study-$m.json
done
# Capacity for each model's own shape, kitty2 and either profile (bf16 on a GPU):
.venv/bin/python -c "
from kitty_vllm.boost_profile import LayerBoostProfile
from kitty_vllm.config import KittyConfig
from kitty_vllm.tools.capacity import ModelShape, auto_bytes, kitty_bytes
shapes = {'smollm2': ModelShape('SmolLM2-135M', 'Llama', full=30, kv_heads=3, head_dim=64),
          'qwen-0.5b': ModelShape('Qwen2.5-Coder-0.5B', 'Qwen2.5', full=24, kv_heads=2, head_dim=64),
          'qwen-1.5b': ModelShape('Qwen2.5-Coder-1.5B', 'Qwen2.5', full=28, kv_heads=2, head_dim=128)}
sources = {'smollm2': 'lever-layer-boost-2026-12-07', 'qwen-0.5b': 'lever-screen-qwen-0.5b-2026-12-07',
           'qwen-1.5b': 'layer-boost-runtime-2026-12-07'}
for m, shape in shapes.items():
    kitty2 = KittyConfig.from_preset('kitty2')
    for label, path in [('kitty2', None), ('layer-boost (mean |K|)', f'benchmarks/results/{sources[m]}/{m}-layer-boost.yaml'),
                        ('layer-boost (range)', f'$D/{m}-layer-boost-range.yaml')]:
        config = kitty2.replace(layer_boost=LayerBoostProfile.load(path).ratios) if path else kitty2
        print(f'{shape.model}, {label}: ' + ', '.join(
            f'{auto_bytes(shape, n) / kitty_bytes(shape, config, n):.2f}x auto at {n:,}' for n in (4624, 32768)))
" > $D/capacity.txt
