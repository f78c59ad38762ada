"""Per-layer boost ratios (KittyConfig.layer_boost, issue 30), calibrated offline on a few hundred tokens of
text.

    python -m kitty_vllm.tools.calibrate --model MODEL --out PROFILE.yaml [--preset kitty2] [--tokens 512]

``MODEL``: one of the eval's models (``smollm2``, ``qwen-0.5b``, ...) or a Hugging Face model directory. It
writes a :class:`kitty_vllm.boost_profile.LayerBoostProfile`: one boost ratio per layer, from ``--ratios``
(fractions of head_dim whose channel counts the page can hold, multiples of 4), averaging to the preset's
``boost_ratio``, so that the cache keeps the preset's bits. vLLM serves with it through
``--additional-config '{"kitty": {"layer_boost": "PROFILE.yaml"}}'``; ``kitty2:lever=layer-boost=PROFILE.yaml``
runs it in ``python -m kitty_vllm.tools.eval --reference``.

The text is the last ``--tokens`` tokens of Paul Graham's essays: the eval's perplexity windows are cut
from the start of the same text, so the two share no token.

The measure, for layer ``l`` at ratio ``r``: the mean over tokens of ``|W_o (A_r - A)|^2 / |h|^2``, where
``A`` is the layer's attention output with every Key in full precision, ``A_r`` the same with the Keys read
as the cache schedule gives them (``exact_prefill``: what decoding reads), quantized at ``r``, ``W_o`` the
output projection and ``h`` the residual stream entering the layer. That is what the layer's quantized Keys
add to the stream the following layers read, relative to the stream, which each of them normalizes
(RMSNorm) before reading: a perturbation counts for as much as it is large against it. Values stay in full
precision, so only the Keys' error counts, which is all the ratio changes. It needs one forward pass of
the model (capturing every layer's queries, Keys, Values and input) and then only attention over the
captured tensors per layer and ratio, where the next-token KL of each layer quantized alone would need a
forward pass per layer and ratio. The layers' errors are taken to add up, as first-order perturbations do.

The assignment is greedy on those errors: every layer starts at the smallest ratio, and the step up (to a
layer's next ratio) that removes the most error per boosted channel is taken, again and again, until the
channels of the preset's ratio times the number of layers are spent: the most sensitive layers get the
most boost. Ties go to the lower layer. Only full-attention models are calibrated: a sliding-window layer
keeps its window in full precision and has no ratio to give.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from kitty_vllm.boost_profile import LayerBoostProfile
from kitty_vllm.config import BOOST_POLICIES, PRESETS, KittyConfig, KittyConfigError
from kitty_vllm.reference import quantized_sequence, reference_attention, schedule_attention
from kitty_vllm.tools import assets, levers, oracle

RATIOS = (0.0, 0.125, 0.25, 0.375, 0.5)
TOKENS = 512


def calibration_tokens(tokenizer, count: int) -> list[int]:
    """The last ``count`` tokens of the essays (the eval's windows come from their start)."""
    ids = tokenizer.encode(assets.paul_graham_text(), add_special_tokens=False)
    if count < 1 or count > len(ids) // 2:
        raise ValueError(f"{count} calibration tokens: the essays give {len(ids)}; take at most half, so that "
                         "they stay clear of the eval's windows")
    return list(ids[-count:])


@torch.no_grad()
def layer_errors(model_dir: str | Path, token_ids: Sequence[int], config: KittyConfig,
                 ratios: Sequence[float]) -> list[list[float]]:
    """[layer][ratio]: the measure of the module docstring for each layer at each of ``ratios``, under
    ``config``'s schedule (exact_prefill)."""
    model = oracle.load_model(model_dir)
    config = config.replace(exact_prefill=True)
    captured: dict[int, tuple] = {}

    def capture(query, keys, values, plain, query_positions, scale, soft_cap, sinks):
        captured[levers.current_layer()] = (query, keys, values, query_positions, scale, soft_cap, sinks)
        return reference_attention(query, keys, values, plain, query_positions, scale, soft_cap, sinks)

    ids = torch.tensor([list(token_ids)])
    with levers.layer_indices(model), oracle.kitty_attention(oracle.plain_config(len(token_ids)), attention=capture):
        hidden = model(input_ids=ids, position_ids=torch.arange(len(token_ids))[None],
                       output_hidden_states=True).hidden_states
    num_layers = model.config.num_hidden_layers
    if sorted(captured) != list(range(num_layers)):
        raise ValueError(f"{model_dir}: layers {sorted(set(range(num_layers)) - set(captured))} attend over a "
                         "sliding window; only full-attention models are calibrated")
    errors = []
    for layer in range(num_layers):
        query, keys, values, positions, scale, soft_cap, sinks = captured[layer]
        o_proj = model.get_decoder().layers[layer].self_attn.o_proj.weight.float()
        stream = hidden[layer][0].float().square().sum(-1)

        def output(keys_read: torch.Tensor, layer_config: KittyConfig) -> torch.Tensor:
            out = schedule_attention(query, keys, values, keys_read, values.float(), positions, layer_config,
                                     scale, soft_cap, sinks)
            return out.reshape(len(positions), -1) @ o_proj.T

        exact = output(keys.float(), config)
        row = []
        for ratio in ratios:
            layer_config = config.replace(boost_ratio=ratio)
            keys_q = quantized_sequence(keys, values, layer_config)[0]
            row.append(float(((output(keys_q, layer_config) - exact).square().sum(-1) / stream).mean()))
        errors.append(row)
    return errors


def assign(errors: Sequence[Sequence[float]], counts: Sequence[int], base: int) -> list[int]:
    """Boosted channels per layer, from the ascending ``counts``, adding up to ``base`` per layer: the
    greedy of the module docstring over ``errors`` [layer][count]."""
    if not counts[0] <= base <= counts[-1]:
        raise ValueError(f"the base ratio's {base} channels lie outside the allowed {counts[0]} to {counts[-1]}")
    num_layers = len(errors)
    budget = (base - counts[0]) * num_layers
    step = [0] * num_layers   # index into counts per layer
    while budget:
        best = None
        for layer in range(num_layers):
            i = step[layer]
            if i + 1 < len(counts) and counts[i + 1] - counts[i] <= budget:
                gain = (errors[layer][i] - errors[layer][i + 1]) / (counts[i + 1] - counts[i])
                if best is None or gain > best[0]:
                    best = (gain, layer)
        if best is None:
            raise ValueError(f"no step of the allowed counts {list(counts)} spends the last {budget} channels")
        layer = best[1]
        budget -= counts[step[layer] + 1] - counts[step[layer]]
        step[layer] += 1
    return [counts[i] for i in step]


def calibrate(model_dir: str | Path, model: str, token_ids: Sequence[int], preset: str = "kitty2",
              ratios: Sequence[float] = RATIOS, boost_policy: str | None = None) -> LayerBoostProfile:
    """The profile of ``model`` (its eval key; ``model_dir`` holds it) for ``preset`` from ``token_ids``, its
    pages' channels chosen by ``boost_policy`` (None: the preset's)."""
    from transformers import AutoConfig

    config = KittyConfig.from_preset(preset)
    config = config.replace(boost_policy=boost_policy or config.boost_policy)
    model_config = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    ratios = sorted(set(ratios))
    try:
        counts = [config.replace(boost_ratio=r).num_boost_channels(head_dim) for r in ratios]
        base = config.num_boost_channels(head_dim)
    except KittyConfigError as e:
        raise ValueError(f"--ratios: {e}") from None
    errors = layer_errors(model_dir, token_ids, config, ratios)
    chosen = assign(errors, counts, base)
    return LayerBoostProfile(
        model=model, boost_ratio=config.boost_ratio, ratios=tuple(c / head_dim for c in chosen),
        calibration={
            "command": "python -m kitty_vllm.tools.calibrate",
            "preset": preset, "boost_policy": config.boost_policy, "head_dim": head_dim, "tokens": len(token_ids),
            "text": "the last tokens of Paul Graham's essays (the eval's windows come from their start)",
            "measure": "mean over tokens of |W_o (A_r - A)|^2 / |h|^2: the attention output's error with the "
                       "layer's Keys quantized at ratio r (Values in full precision), through the output "
                       "projection, relative to the residual stream entering the layer",
            "assignment": "greedy: from the smallest ratio, the step up removing the most error per boosted "
                          "channel, until the preset's channels times the layers are spent",
            "allowed_ratios": list(ratios),
            "errors": [[float(f"{e:.4g}") for e in row] for row in errors],
        })


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kitty_vllm.tools.calibrate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True,
                        help=f"one of the eval's models ({', '.join(sorted(assets.MODELS))}) or a model directory")
    parser.add_argument("--out", type=Path, required=True, help="the profile file to write (YAML)")
    parser.add_argument("--preset", default="kitty2", choices=PRESETS, help="whose boost_ratio the layers average")
    parser.add_argument("--boost-policy", choices=BOOST_POLICIES,
                        help="how pages pick their boosted channels (default: the preset's)")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="calibration tokens, from the end of the essays")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS),
                        help="the ratios a layer may get (fractions of head_dim, multiples of 4 channels)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    if args.model not in assets.MODELS and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: neither one of the eval's models ({', '.join(sorted(assets.MODELS))}) "
                     "nor a directory with a Hugging Face config.json")
    model_dir = assets.model_path(args.model) if args.model in assets.MODELS else Path(args.model)
    model = args.model if args.model in assets.MODELS else model_dir.resolve().name
    try:
        tokens = calibration_tokens(AutoTokenizer.from_pretrained(model_dir), args.tokens)
        profile = calibrate(model_dir, model, tokens, args.preset, args.ratios, args.boost_policy)
    except ValueError as e:
        parser.error(str(e))
    profile.to_yaml(args.out)
    LayerBoostProfile.load(args.out)   # what a config will read
    mean = math.fsum(profile.ratios) / len(profile.ratios)
    print(f"{args.out}: {model}, {len(profile.ratios)} layers, ratios {list(profile.ratios)} "
          f"(mean {mean:g} = {args.preset}'s boost_ratio {profile.boost_ratio:g})")


if __name__ == "__main__":
    main()
