"""One lever of the accuracy study (issue 30) against ``auto``: decode-time perplexity, GSM8K and the
needle as paired differences, bits per element and capacity, from the records of a ``kitty_vllm.tools.eval``
run.

    python -m kitty_vllm.tools.study --eval-json RUN.json --kv-cache-dtypes auto kitty2 kitty2:skip=0 \\
        --json STUDY.json [--tokens 4624 32768]

``--kv-cache-dtypes`` are the eval's own (``DTYPE``, ``DTYPE:skip=LAYERS``, ``DTYPE:FILE.yaml``,
``DTYPE:lever=NAMES``); each must have a perplexity record with its windows' log-likelihoods
(``window_nlls``) in ``--eval-json``.
For each, against ``auto`` on the same windows:

* the per-window differences of mean negative log-likelihood per token (positive: worse than ``auto``),
  their mean, and the perplexity change ``exp(mean) - 1`` with a 95% paired-bootstrap interval
  (windows resampled with replacement, ``--resamples`` times, fixed seed); the same against the plain
  dtype (``kitty2`` for ``kitty2:skip=0`` or ``kitty2:lever=value-lag``) where that is in the run too, the
  lever's own effect;
* where the run has GSM8K and needle records with their ``hits``: the accuracy difference in points on
  the same problems (trials), with a 95% paired-bootstrap interval (problems resampled with replacement),
  and how many problems each of the two gets right that the other does not, against ``auto`` and the
  plain dtype;
* for each model of ``kitty_vllm.tools.capacity.EVAL_MODELS``: bits per K or V element averaged over
  the layers (a skipped layer at bf16's 16 bits, the others at the kitty page's bits, metadata included)
  and the capacity against ``auto`` at each of ``--tokens`` tokens per request, computed from the layouts
  for bf16 on a GPU as kitty_vllm.tools.capacity does: how many times ``auto``'s maximum concurrency
  vLLM reports. Skipped layers are taken to be full-attention layers, as in these models. The levers of
  kitty_vllm.tools.levers leave the page, so its bits, as they are; the value lag's full-precision Values
  beyond the ring count in the capacity (kitty_vllm.tools.capacity.kitty_bytes' ``lagged_values``). Per-layer
  boost ratios (``layer_boost`` in a config file, or the ``layer-boost`` lever's profile) count as the
  runtime stores them, each layer's page at its own size, for the model of as many layers as the ratios
  (``n/a`` for the others).

Writes ``--json`` and the markdown table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy

from kitty_vllm.layout import model_page_layouts
from kitty_vllm.tools.capacity import EVAL_MODELS, ModelShape, auto_bytes, kitty_bytes
from kitty_vllm.tools.eval import CacheSpec
from kitty_vllm.tools.levers import lagged_values, layer_profile

BF16_BITS = 16
RESAMPLES = 10_000
TOKENS = (4624, 32768)


def paired_difference(nlls: Sequence[float], base_nlls: Sequence[float], resamples: int = RESAMPLES,
                      seed: int = 0) -> dict[str, Any]:
    """Per-window differences ``nlls - base_nlls``, their mean, the perplexity change with the 2.5th and
    97.5th percentiles of the bootstrap means (windows resampled with replacement), and how many windows
    are worse than the base."""
    if len(nlls) != len(base_nlls):
        raise ValueError(f"{len(nlls)} windows against {len(base_nlls)}: not the same windows")
    diffs = [a - b for a, b in zip(nlls, base_nlls, strict=True)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    low, high = means[int(0.025 * resamples)], means[math.ceil(0.975 * resamples) - 1]
    mean = statistics.fmean(diffs)
    return {"window_nll_differences": diffs, "mean_nll_difference": mean,
            "perplexity_change": math.expm1(mean), "perplexity_change_ci95": [math.expm1(low), math.expm1(high)],
            "windows_worse": sum(d > 0 for d in diffs)}


def paired_hits(hits: str, base_hits: str, resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Accuracy against the base on the same items (``hits`` as kitty_vllm.tools.eval records them), the
    difference in points with the 2.5th and 97.5th percentiles of the bootstrap means (items resampled with
    replacement), and the items each gets right that the other does not (``gained``, ``lost``)."""
    if len(hits) != len(base_hits):
        raise ValueError(f"{len(hits)} items against {len(base_hits)}: not the same problems")
    n = len(hits)
    gained = sum(a > b for a, b in zip(hits, base_hits))
    lost = sum(a < b for a, b in zip(hits, base_hits))
    # An item's difference is +1, -1 or 0: a resample's counts of each are one multinomial draw.
    counts = numpy.random.default_rng(seed).multinomial(n, [gained / n, lost / n, (n - gained - lost) / n],
                                                         size=resamples)
    means = sorted(100 * (counts[:, 0] - counts[:, 1]) / n)
    low, high = means[int(0.025 * resamples)], means[math.ceil(0.975 * resamples) - 1]
    return {"accuracy": hits.count("1") / n, "n": n, "difference_points": 100 * (gained - lost) / n,
            "difference_ci95_points": [float(low), float(high)], "gained": gained, "lost": lost}


def hit_rows(records: Sequence[dict[str, Any]], specs: Sequence[CacheSpec], task: str,
             resamples: int = RESAMPLES) -> list[dict[str, Any]]:
    """paired_hits of each spec with a ``task`` record against ``auto`` and its plain dtype (empty without
    ``auto``'s record)."""
    found = {r["kv_cache_dtype"]: r for r in records if r["task"] == task and r.get("hits")}
    if "auto" not in found:
        return []
    rows = []
    for spec in specs:
        record = found.get(spec.label)
        if record is None:
            continue
        row = {"kv_cache_dtype": spec.label, **paired_hits(record["hits"], found["auto"]["hits"], resamples)}
        plain = found.get(spec.kv_cache_dtype)
        if plain is not None and plain is not record:
            row["against"] = {"kv_cache_dtype": spec.kv_cache_dtype,
                              **paired_hits(record["hits"], plain["hits"], resamples)}
        rows.append(row)
    return rows


def cache_figures(spec: CacheSpec, shape: ModelShape, tokens: Sequence[int]) -> dict[str, Any] | None:
    """Bits per element averaged over ``shape``'s layers and capacity against ``auto`` at ``tokens``, as kitty's
    runtime stores them; None for per-layer boost ratios (KittyConfig.layer_boost, or the layer-boost lever's
    profile) of a model with another number of layers."""
    config = spec.kitty_config()
    if config is None:
        if spec.kv_cache_dtype != "auto":
            raise ValueError(f"{spec.label}: capacity is computed for auto and the kitty dtypes only")
        return {"bits_per_element": float(BF16_BITS), "capacity_vs_auto": {str(n): 1.0 for n in tokens}}
    profile = layer_profile(spec.levers)
    if profile is not None:
        config = config.replace(layer_boost=profile[0].ratios)
    if config.layer_boost and len(config.layer_boost) != shape.full:
        return None
    skipped, lagged = len(spec.skip_layers), lagged_values(spec.levers, config)
    pages = model_page_layouts(config, shape.head_dim, shape.full)
    page_bits = statistics.fmean(layout.effective_bits for layout in pages)
    bits = ((shape.full - skipped) * page_bits + skipped * BF16_BITS) / shape.full
    return {"bits_per_element": bits, "capacity_vs_auto": {
        str(n): auto_bytes(shape, n) / kitty_bytes(shape, config, n, skipped=skipped, lagged_values=lagged)
        for n in tokens}}


def study(records: Sequence[dict[str, Any]], specs: Sequence[CacheSpec], tokens: Sequence[int],
          resamples: int = RESAMPLES) -> dict[str, Any]:
    """The study's rows, one per spec, from the eval's perplexity records (one model, one task)."""
    found = {r["kv_cache_dtype"]: r for r in records if r["task"].startswith("perplexity")}
    missing = [s.label for s in specs if s.label not in found or not found[s.label].get("window_nlls")]
    if missing or "auto" not in found:
        raise ValueError(f"no perplexity record with window_nlls for {missing or ['auto']}")
    auto = found["auto"]
    rows = []
    for spec in specs:
        record = found[spec.label]
        row = {"kv_cache_dtype": spec.label, "perplexity": record["score"], "windows": record["n"],
               **paired_difference(record["window_nlls"], auto["window_nlls"], resamples)}
        plain = found.get(spec.kv_cache_dtype)
        if plain is not None and plain is not record:
            row["against"] = {"kv_cache_dtype": spec.kv_cache_dtype,
                              **paired_difference(record["window_nlls"], plain["window_nlls"], resamples)}
        row["models"] = {shape.model: cache_figures(spec, shape, tokens) for shape in EVAL_MODELS}
        rows.append(row)
    hit_tasks = sorted({r["task"] for r in records if r["task"] == "gsm8k" or r["task"].startswith("needle-")},
                       key=lambda task: (task != "gsm8k", len(task), task))
    accuracy = {task: task_rows for task in hit_tasks if (task_rows := hit_rows(records, specs, task, resamples))}
    return {"model": auto["model"], "task": auto["task"], "tokens_per_request": list(tokens),
            "capacity": "computed from the layouts, bf16 on a GPU (kitty_vllm.tools.capacity)",
            "bootstrap_resamples": resamples, "rows": rows, **({"accuracy": accuracy} if accuracy else {})}


def markdown_table(result: dict[str, Any]) -> str:
    """Two tables: perplexity against auto, then bits per element and capacity per model."""
    tokens = result["tokens_per_request"]
    lines = [f"| dtype | perplexity ({result['model']}, {result['task']}) | change vs auto [95% paired bootstrap] "
             "| per-window nll difference, min to max | windows worse than auto | change vs the plain dtype |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        diffs = row["window_nll_differences"]
        against = row.get("against")
        lines.append(f"| {row['kv_cache_dtype']} | {row['perplexity']:.3f} | {_change(row)} | "
                     f"{min(diffs):+.4f} to {max(diffs):+.4f} | {row['windows_worse']} of {row['windows']} | "
                     + (f"{_change(against)} ({against['kv_cache_dtype']})" if against else "") + " |")
    header = ["dtype"]
    for shape in EVAL_MODELS:
        header += [f"{shape.model}: bits"] + [f"x auto at {n:,}" for n in tokens]
    lines += ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in result["rows"]:
        cells = [row["kv_cache_dtype"]]
        for shape in EVAL_MODELS:
            figures = row["models"][shape.model]
            if figures is None:   # another model's per-layer ratios
                cells += ["n/a"] * (1 + len(tokens))
                continue
            cells += [f"{figures['bits_per_element']:.2f}"]
            cells += [f"{figures['capacity_vs_auto'][str(n)]:.2f}x" for n in tokens]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("accuracy"):
        lines += ["", "| task | dtype | accuracy | change vs auto, points [95% paired bootstrap] "
                  "| gained / lost vs auto | change vs the plain dtype |", "|---|---|---|---|---|---|"]
        for task, task_rows in result["accuracy"].items():
            for row in task_rows:
                against = row.get("against")
                lines.append(f"| {task} | {row['kv_cache_dtype']} | {row['accuracy']:.1%} ({row['n']}) | "
                             f"{_points(row)} | {row['gained']} / {row['lost']} | "
                             + (f"{_points(against)} ({against['kv_cache_dtype']})" if against else "") + " |")
    return "\n".join(lines)


def _points(paired: dict[str, Any]) -> str:
    low, high = paired["difference_ci95_points"]
    return f"{paired['difference_points']:+.1f} [{low:+.1f}, {high:+.1f}]"


def _change(paired: dict[str, Any]) -> str:
    low, high = paired["perplexity_change_ci95"]
    return f"{paired['perplexity_change']:+.2%} [{low:+.2%}, {high:+.2%}]"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kitty_vllm.tools.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-json", type=Path, required=True, help="records of a kitty_vllm.tools.eval run")
    parser.add_argument("--kv-cache-dtypes", nargs="+", required=True, metavar="DTYPE[:CONFIG]")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="tokens per request")
    parser.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--json", type=Path, required=True, help="where the study goes (and its .md table)")
    args = parser.parse_args(argv)
    try:
        specs = [CacheSpec.parse(text) for text in args.kv_cache_dtypes]
        result = study(json.loads(args.eval_json.read_text()), specs, args.tokens, args.resamples)
    except ValueError as e:
        parser.error(str(e))
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown_table(result)
    args.json.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
