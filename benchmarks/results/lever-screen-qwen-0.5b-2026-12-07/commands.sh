# The exact commands of this folder, run from the repository root on the CPU (2 cores, shared with other
# work), vLLM 0.32.0 CPU build, torch 2.13, every command under `nice -n 19` (written below for the
# calibration and the evals), one at a time.
# Qwen2.5-Coder-0.5B-Instruct (the eval's qwen-0.5b), 8 windows of 2,048 tokens (--ppl-window 2048
# --ppl-windows 8, the first 16,384 tokens of the essays in Qwen's tokenizer), scored by the float32
# decode-time simulation (--reference), as ../lever-screen-2026-12-07 and ../lever-layer-boost-2026-12-07
# did for SmolLM2. One eval run per variant, each merging its record into the one json (eval.log).
D=benchmarks/results/lever-screen-qwen-0.5b-2026-12-07
P=$D/qwen-0.5b-layer-boost.yaml
# The profile (the first call also downloaded and converted the model: 58 s in all, calibrate.log):
(time nice -n 19 .venv/bin/python -m kitty_vllm.tools.calibrate --model qwen-0.5b --out $P) > $D/calibrate.log 2>&1
# (Before it, a timing run of 1 window of auto and kitty2 into a scratch json outside the repository:
# 39 s and 34 s a window; not kept.)
for v in auto kitty2 kitty2:lever=hadamard-v kitty2:lever=layer-boost=$P kitty2:lever=hadamard-v,layer-boost=$P; do
  echo "=== $(date -u +%H:%M:%S) start $v" >> $D/eval.log
  nice -n 19 .venv/bin/python -m kitty_vllm.tools.eval --model qwen-0.5b --reference --tasks perplexity \
    --ppl-window 2048 --ppl-windows 8 --kv-cache-dtypes $v \
    --json $D/perplexity-qwen-0.5b-float32-sim.json >> $D/eval.log 2>&1
  echo "=== $(date -u +%H:%M:%S) end $v rc=$?" >> $D/eval.log
done
echo "=== ALL DONE $(date -u +%H:%M:%S)" >> $D/eval.log
.venv/bin/python -m kitty_vllm.tools.study \
    --eval-json $D/perplexity-qwen-0.5b-float32-sim.json \
    --kv-cache-dtypes auto kitty2 kitty2:lever=hadamard-v kitty2:lever=layer-boost=$P \
        kitty2:lever=hadamard-v,layer-boost=$P \
    --json $D/study.json
# The profile's bits per element, each layer's page averaged, against kitty2's (Qwen2.5-Coder-0.5B's
# head_dim 64, as SmolLM2's):
.venv/bin/python -c "
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import page_layout
from kitty_vllm.tools.levers import LayerBoostProfile
config = KittyConfig.from_preset('kitty2')
print(f'kitty2: {page_layout(config, 64).effective_bits:.4f} bits per element')
for name in ('qwen-0.5b-layer-boost',):
    profile = LayerBoostProfile.load(f'$D/{name}.yaml')
    layers = ', '.join(f'{profile.ratios.count(r)} at {r:g}' for r in sorted(set(profile.ratios)))
    print(f'{name}: {profile.bits_per_element(config, 64):.4f}, the mean of its {len(profile.ratios)} layers\' pages '
          f'({layers})')
for r in (0, 0.125, 0.25, 0.375, 0.5):
    layout = page_layout(config.replace(boost_ratio=r), 64)
    print(f'ratio {r:g}: {layout.page_bytes} bytes a page and KV head, {layout.effective_bits:.4f} bits per element')
" > $D/bits.txt
# Further pairs, as the study pairs: the two levers together against each alone, and each window's
# difference of hadamard-v against kitty2 (how many windows it is better on):
.venv/bin/python -c "
import json
from kitty_vllm.tools.study import paired_difference
records = {r['kv_cache_dtype']: r for r in json.load(open('$D/perplexity-qwen-0.5b-float32-sim.json'))}
both = 'kitty2 (hadamard-v + layer-boost=qwen-0.5b-layer-boost)'
for a, b in ((both, 'kitty2 (hadamard-v)'), (both, 'kitty2 (layer-boost=qwen-0.5b-layer-boost)'),
             ('kitty2 (hadamard-v)', 'kitty2'), ('kitty2 (layer-boost=qwen-0.5b-layer-boost)', 'kitty2'),
             (both, 'kitty2')):
    d = paired_difference(records[a]['window_nlls'], records[b]['window_nlls'])
    low, high = d['perplexity_change_ci95']
    print(f\"{a} vs {b}: {d['perplexity_change']:+.2%} [{low:+.2%}, {high:+.2%}], \"
          f\"{d['windows_worse']} of 8 windows worse\")
" > $D/pairs.txt
# kitty2's capacity for Qwen2.5-Coder-0.5B's own shape (config.json: 24 layers, 2 KV heads x 64), which the
# study's table (the eval models of kitty_vllm.tools.capacity: SmolLM2 and Qwen2.5-Coder-1.5B) lacks; no
# lever here changes the page, so it holds for all four kitty2 rows (the profile: its mean page, bits.txt):
.venv/bin/python -c "
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import page_layout
from kitty_vllm.tools.capacity import ModelShape, auto_bytes, kitty_bytes
shape = ModelShape('Qwen2.5-Coder-0.5B', 'Qwen2.5', full=24, kv_heads=2, head_dim=64)
config = KittyConfig.from_preset('kitty2')
print(f'{shape.model} ({shape.layers}): kitty2 {page_layout(config, 64).effective_bits:.2f} bits per element; '
      + ', '.join(f'{auto_bytes(shape, n) / kitty_bytes(shape, config, n):.2f}x auto at {n:,}' for n in (4624, 32768)))
" > $D/capacity-qwen-0.5b.txt
