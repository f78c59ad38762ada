# The exact commands of this folder, run from the repository root on the CPU (2 cores, shared with other
# work), vLLM 0.32.0 CPU build, torch 2.13. The same 8 windows of 2,048 tokens as
# ../lever-screen-2026-12-07 (--ppl-window 2048 --ppl-windows 8), scored by the float32 decode-time
# simulation (--reference). auto, kitty2 and that screen's levers are its records, copied; the eval merges
# the new variants into the copy. Two eval runs (eval.log, eval-control.log).
D=benchmarks/results/lever-layer-boost-2026-12-07
# The profile: SmolLM2-135M's per-layer boost ratios, from the last 512 tokens of the essays (the windows
# are the first 16,384).
.venv/bin/python -m kitty_vllm.tools.calibrate --model smollm2 --out $D/smollm2-layer-boost.yaml
cp benchmarks/results/lever-screen-2026-12-07/perplexity-smollm2-float32-sim.json $D/
.venv/bin/python -m kitty_vllm.tools.eval --model smollm2 --reference --tasks perplexity \
    --ppl-window 2048 --ppl-windows 8 \
    --kv-cache-dtypes kitty2:lever=layer-boost=$D/smollm2-layer-boost.yaml \
        kitty2:lever=layer-boost=$D/smollm2-layer-boost.yaml,hadamard-v \
    --json $D/perplexity-smollm2-float32-sim.json > $D/eval.log 2>&1
# A control: the profile mirrored around kitty2's ratio (0 <-> 0.5, 0.125 <-> 0.375), the same average and
# here the same ratios, but the most boost to the layers the calibration found least sensitive:
.venv/bin/python -c "
from kitty_vllm.tools.levers import LayerBoostProfile
profile = LayerBoostProfile.load('$D/smollm2-layer-boost.yaml')
LayerBoostProfile(profile.model, profile.boost_ratio, tuple(2 * profile.boost_ratio - r for r in profile.ratios),
                  {'made': 'smollm2-layer-boost.yaml mirrored around boost_ratio (2 * boost_ratio - ratio), a control',
                   'command': 'benchmarks/results/lever-layer-boost-2026-12-07/commands.sh'}
                  ).to_yaml('$D/smollm2-layer-boost-mirrored.yaml')
"
.venv/bin/python -m kitty_vllm.tools.eval --model smollm2 --reference --tasks perplexity \
    --ppl-window 2048 --ppl-windows 8 \
    --kv-cache-dtypes kitty2:lever=layer-boost=$D/smollm2-layer-boost-mirrored.yaml \
    --json $D/perplexity-smollm2-float32-sim.json > $D/eval-control.log 2>&1
# How much the profile depends on the calibration's length: profiles from the last 256 and 1,024 tokens
# against the 512-token one (not evaluated):
.venv/bin/python -c "
from transformers import AutoTokenizer
from kitty_vllm.tools import assets, calibrate
from kitty_vllm.tools.levers import LayerBoostProfile
ratios = LayerBoostProfile.load('$D/smollm2-layer-boost.yaml').ratios
model_dir = assets.model_path('smollm2')
tokenizer = AutoTokenizer.from_pretrained(model_dir)
for count in (256, 1024):
    other = calibrate.calibrate(model_dir, 'smollm2', calibrate.calibration_tokens(tokenizer, count)).ratios
    moved = [abs(a - b) for a, b in zip(ratios, other, strict=True)]
    print(f'{count} tokens: ratios {[f\"{r:g}\" for r in other]}; {sum(m > 0 for m in moved)} of {len(ratios)} layers '
          f'differ from the 512-token profile, {sum(m > 0.125 for m in moved)} by more than one step (0.125)')
" > $D/profile-stability.txt
# The 1,024-token profile, evaluated too (is the gain robust to the calibration's noise?):
.venv/bin/python -m kitty_vllm.tools.calibrate --model smollm2 --tokens 1024 --out $D/smollm2-layer-boost-1024.yaml
.venv/bin/python -m kitty_vllm.tools.eval --model smollm2 --reference --tasks perplexity \
    --ppl-window 2048 --ppl-windows 8 \
    --kv-cache-dtypes kitty2:lever=layer-boost=$D/smollm2-layer-boost-1024.yaml \
    --json $D/perplexity-smollm2-float32-sim.json > $D/eval-1024.log 2>&1
.venv/bin/python -m kitty_vllm.tools.study \
    --eval-json $D/perplexity-smollm2-float32-sim.json \
    --kv-cache-dtypes auto kitty2 kitty2:lever=layer-boost=$D/smollm2-layer-boost.yaml \
        kitty2:lever=layer-boost=$D/smollm2-layer-boost-mirrored.yaml \
        kitty2:lever=layer-boost=$D/smollm2-layer-boost-1024.yaml kitty2:lever=hadamard-v \
        kitty2:lever=layer-boost=$D/smollm2-layer-boost.yaml,hadamard-v \
    --json $D/study.json
# The profiles' bits per element, each layer's page averaged, against kitty2's (SmolLM2's head_dim 64):
.venv/bin/python -c "
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import page_layout
from kitty_vllm.tools.levers import LayerBoostProfile
config = KittyConfig.from_preset('kitty2')
print(f'kitty2: {page_layout(config, 64).effective_bits:.4f} bits per element')
for name in ('smollm2-layer-boost', 'smollm2-layer-boost-mirrored', 'smollm2-layer-boost-1024'):
    profile = LayerBoostProfile.load(f'$D/{name}.yaml')
    layers = ', '.join(f'{profile.ratios.count(r)} at {r:g}' for r in sorted(set(profile.ratios)))
    print(f'{name}: {profile.bits_per_element(config, 64):.4f}, the mean of its {len(profile.ratios)} layers\' pages '
          f'({layers})')
for r in (0, 0.125, 0.25, 0.375, 0.5):
    layout = page_layout(config.replace(boost_ratio=r), 64)
    print(f'ratio {r:g}: {layout.page_bytes} bytes a page and KV head, {layout.effective_bits:.4f} bits per element')
" > $D/bits.txt
# The profile with hadamard-v paired against hadamard-v alone (what the profile adds to the rotation), as the
# study pairs:
.venv/bin/python -c "
import json
from kitty_vllm.tools.study import paired_difference
records = {r['kv_cache_dtype']: r for r in json.load(open('$D/perplexity-smollm2-float32-sim.json'))}
d = paired_difference(records['kitty2 (hadamard-v + layer-boost=smollm2-layer-boost)']['window_nlls'],
                      records['kitty2 (hadamard-v)']['window_nlls'])
low, high = d['perplexity_change_ci95']
print(f\"hadamard-v + layer-boost vs hadamard-v: {d['perplexity_change']:+.2%} [{low:+.2%}, {high:+.2%}], \"
      f\"{d['windows_worse']} of 8 windows worse\")
" > $D/both-vs-hadamard-v.txt
