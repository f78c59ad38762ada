"""Benchmark results: the JSON file of records, its markdown tables and its PNG plots.

Every benchmark script appends to ``<out>/<gpu>-<yyyy-mm-dd>.json``, a list of flat records such as
``{"benchmark": "w1", "kv_cache_dtype": "kitty2", "max_model_len": 4624, "seconds": ..., "gpu": ...,
"vllm_version": ..., "date": ...}`` (step_profile's also hold one mapping, ``top_kernels_ms``). A record
replaces an earlier one of the same measurement (same benchmark, KV-cache dtype, max_model_len, batch,
requests, new tokens and context), so a benchmark can be rerun, or run in several calls, on the same day.
A record that could not be measured carries ``"error"`` or ``"skipped"`` with the reason instead of
figures.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SERVING_BENCHMARKS = ("capacity", "w1", "w2")
# Table and plot order; dtypes not listed here follow in the order they first appear.
DTYPE_ORDER = ("auto", "auto-flash", "auto-triton", "fp8", "int4_per_token_head", "turboquant_4bit_nc", "kitty2",
               "kitty2-lite", "kivi2")
# The formats every serving figure is compared with, and the decode kernel every kernel is compared with.
SERVING_BASELINES = ("auto", "fp8")
KERNEL_BASELINE = "auto-flash"
KEY_FIELDS = ("benchmark", "model", "kv_cache_dtype", "speculative", "max_model_len", "batch", "requests",
              "new_tokens", "context")


def result_path(out_dir: str | Path, gpu: str, date: str, quick: bool = False) -> Path:
    """``<out_dir>/<gpu slug>-<date>.json`` (``-quick`` before the suffix for scaled-down runs)."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    return Path(out_dir) / f"{slug}-{date}{'-quick' if quick else ''}.json"


def record_key(record: dict) -> tuple:
    return tuple(record.get(field) for field in KEY_FIELDS)


def merge_records(existing: list[dict], new: list[dict]) -> list[dict]:
    """``existing`` with each record of ``new`` replacing the one of the same key in place, or appended."""
    merged = {record_key(r): r for r in existing}
    for record in new:
        merged[record_key(record)] = record
    return list(merged.values())


def load_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = json.loads(path.read_text())
    if not isinstance(records, list) or not all(isinstance(r, dict) and "benchmark" in r for r in records):
        raise ValueError(f"{path} is not a list of benchmark records")
    return records


def write_records(path: str | Path, records: list[dict]) -> list[dict]:
    """Merge ``records`` into the file at ``path`` (created if absent, replaced atomically); return all."""
    path = Path(path)
    merged = merge_records(load_records(path), records)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(partial, path)
    return merged


def record_each(path: Path, measurements: Iterable[Callable[[], dict]], environment: dict,
                describe: Callable[[dict], str]) -> list[dict]:
    """Run each measurement (a callable returning one record), merge its record with ``environment``
    into ``path`` at once (an interrupted run keeps what it measured) and print it. Returns the records."""
    records = []
    for measure in measurements:
        records.append({**measure(), **environment})
        write_records(path, records[-1:])
        print(describe(records[-1]), flush=True)
    return records


def finish(path: Path, table: str) -> None:
    """Print this run's table, then redraw the plots of every record in ``path``."""
    print(f"\n{table}\n\nmerged into {path}")
    for png in plot_records(load_records(path), path.with_suffix("")):
        print(f"wrote {png}")


def _dtype_rank(dtype: str) -> tuple[int, str]:
    return (DTYPE_ORDER.index(dtype), "") if dtype in DTYPE_ORDER else (len(DTYPE_ORDER), dtype)


def _number(value, digits: int = 0) -> str:
    if value is None:
        return ""
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _note(record: dict) -> str:
    reason = record.get("error") or record.get("skipped") or ""
    return reason.replace("|", "/").replace("\n", " ")[:120]


def _ratio(value, base) -> str:
    return f"{value / base:.2f}x" if value and base else ""


def serving_metric(record: dict) -> float | None:
    """The figure the serving ratios compare: maximum concurrency for capacity, output tok/s for W1/W2."""
    return record.get("max_concurrency" if record["benchmark"] == "capacity" else "output_tok_s")


def serving_table(records: list[dict]) -> str:
    """Capacity and throughput, with ratios against ``auto`` and ``fp8`` at the same max_model_len."""
    rows = sorted((r for r in records if r["benchmark"] in SERVING_BENCHMARKS),
                  key=lambda r: (SERVING_BENCHMARKS.index(r["benchmark"]), r.get("max_model_len") or 0,
                                 _dtype_rank(r["kv_cache_dtype"])))
    if not rows:
        return ""
    baselines = {(r["benchmark"], r.get("max_model_len"), r["kv_cache_dtype"]): serving_metric(r) for r in rows}
    lines = ["| benchmark | max_model_len | kv_cache_dtype | max concurrency | KV tokens | seconds | output tok/s "
             "| preemptions | " + " | ".join(f"vs {b}" for b in SERVING_BASELINES) + " | note |",
             "|---" * (9 + len(SERVING_BASELINES)) + "|"]
    for r in rows:
        ratios = [_ratio(serving_metric(r), baselines.get((r["benchmark"], r.get("max_model_len"), b)))
                  for b in SERVING_BASELINES]
        lines.append(f"| {r['benchmark']} | {_number(r.get('max_model_len'))} | {r['kv_cache_dtype']} "
                     f"| {_number(r.get('max_concurrency'), 1)} | {_number(r.get('kv_tokens'))} "
                     f"| {_number(r.get('seconds'), 1)} | {_number(r.get('output_tok_s'))} "
                     f"| {_number(r.get('preemptions'))} | {' | '.join(ratios)} | {_note(r)} |")
    return "\n".join(lines)


def decode_kernel_table(records: list[dict]) -> str:
    """Decode attention time and bandwidth, with the speed-up over FlashAttention on a bf16 cache."""
    rows = sorted((r for r in records if r["benchmark"] == "decode_kernel"),
                  key=lambda r: (r["batch"], r["context"], _dtype_rank(r["kv_cache_dtype"])))
    if not rows:
        return ""
    baseline = {(r["batch"], r["context"]): r.get("ms") for r in rows if r["kv_cache_dtype"] == KERNEL_BASELINE}
    lines = [f"| batch | context | kernel | ms | GB/s | % of copy | speed vs {KERNEL_BASELINE} | note |",
             "|---" * 8 + "|"]
    for r in rows:
        base, ms = baseline.get((r["batch"], r["context"])), r.get("ms")
        speed = f"{base / ms:.2f}x" if base and ms else ""
        lines.append(f"| {r['batch']} | {r['context']:,} | {r['kv_cache_dtype']} | {_number(ms, 3)} "
                     f"| {_number(r.get('gb_s'))} | {_number(r.get('pct_of_copy'), 1)} | {speed} | {_note(r)} |")
    return "\n".join(lines)


def _prefill_cell(record: dict) -> tuple[int, int, int]:
    return record["requests"], record["new_tokens"], record["context"]


def prefill_kernel_table(records: list[dict]) -> str:
    """One layer's prefill step (cache writes included), the share of it that is attention, and the speed-up
    over FlashAttention on a bf16 cache in the same cell."""
    rows = sorted((r for r in records if r["benchmark"] == "prefill_kernel"),
                  key=lambda r: (*_prefill_cell(r), _dtype_rank(r["kv_cache_dtype"])))
    if not rows:
        return ""
    baseline = {_prefill_cell(r): r.get("ms") for r in rows if r["kv_cache_dtype"] == KERNEL_BASELINE}
    lines = ["| requests | new tokens | context | kernel | ms | attention ms | attention % of step | tokens/s "
             f"| speed vs {KERNEL_BASELINE} | note |",
             "|---" * 10 + "|"]
    for r in rows:
        ms, attention = r.get("ms"), r.get("attention_ms")
        share = 100 * attention / ms if attention and ms else None
        speed = _ratio(baseline.get(_prefill_cell(r)), ms)
        lines.append(f"| {r['requests']} | {r['new_tokens']:,} | {r['context']:,} | {r['kv_cache_dtype']} "
                     f"| {_number(ms, 3)} | {_number(attention, 3)} | {_number(share, 1)} "
                     f"| {_number(r.get('tokens_per_s'))} | {speed} | {_note(r)} |")
    return "\n".join(lines)


# step_profile's kernel categories (benchmarks/step_profile.py), in table order.
STEP_CATEGORIES = ("kitty_attention", "kitty_store", "cache_write", "vllm_attention", "gemm", "other")


def _step_profiles(records: list[dict]) -> list[dict]:
    return sorted((r for r in records if r["benchmark"] == "step_profile"),
                  key=lambda r: (r["context"], _dtype_rank(r["kv_cache_dtype"]), r["requests"]))


def step_profile_table(records: list[dict]) -> str:
    """Milliseconds per decode step: wall time, GPU kernel time by category, and time with no kernel running."""
    rows = _step_profiles(records)
    if not rows:
        return ""
    lines = ["| kv_cache_dtype | requests | context | step ms | output tok/s | "
             + " | ".join(f"{c} ms" for c in STEP_CATEGORIES)
             + " | GPU idle ms | scheduler ms | roofline ms | x roofline | note |",
             "|---" * (10 + len(STEP_CATEGORIES)) + "|"]
    for r in rows:
        cells = " | ".join(_number(r.get(f"{c}_ms"), 2) for c in STEP_CATEGORIES)
        lines.append(f"| {r['kv_cache_dtype']} | {r['requests']:,} | {r['context']:,} | {_number(r.get('step_ms'), 2)} "
                     f"| {_number(r.get('tok_s'))} | {cells} | {_number(r.get('idle_ms'), 2)} "
                     f"| {_number(r.get('scheduler_ms'), 2)} "
                     f"| {_number(r.get('roofline_ms'), 2)} | {_number(r.get('roofline_ratio'), 2)} | {_note(r)} |")
    return "\n".join(lines)


def step_kernels_table(records: list[dict]) -> str:
    """The longest kernels of each profiled decode step (``top_kernels_ms``), with their share of the step."""
    rows = [r for r in _step_profiles(records) if r.get("top_kernels_ms")]
    if not rows:
        return ""
    lines = ["| kv_cache_dtype | requests | context | kernel | ms per step | % of step |", "|---" * 6 + "|"]
    for r in rows:
        for kernel, ms in r["top_kernels_ms"].items():
            lines.append(f"| {r['kv_cache_dtype']} | {r['requests']:,} | {r['context']:,} | {kernel[:60]} "
                         f"| {_number(ms, 2)} | {_number(100 * ms / r['step_ms'], 1)} |")
    return "\n".join(lines)


def speculative_table(records: list[dict]) -> str:
    """Speculative decoding (benchmarks/speculative.py): output tok/s as measured and adjusted to each
    acceptance length, against ``auto`` with the same method and against the same dtype without a draft."""
    rows = sorted((r for r in records if r["benchmark"] == "speculative"),
                  key=lambda r: (_dtype_rank(r["kv_cache_dtype"]), r.get("speculative") == "none", r.get("speculative")))
    if not rows:
        return ""
    lengths = sorted({k for r in rows for k in r.get("adjusted_tok_s", {})}, key=float)
    adjusted = {(r["kv_cache_dtype"], r["speculative"]): r.get("adjusted_tok_s", {}) for r in rows}
    lines = ["| kv_cache_dtype | speculation | seconds | output tok/s | acceptance length | "
             + " | ".join(f"tok/s at L={k} | vs auto | vs no draft" for k in lengths) + " | note |",
             "|---" * (6 + 3 * len(lengths)) + "|"]
    for r in rows:
        cells = []
        for k in lengths:
            value = adjusted[(r["kv_cache_dtype"], r["speculative"])].get(k)
            cells += [_number(value), _ratio(value, adjusted.get(("auto", r["speculative"]), {}).get(k)),
                      _ratio(value, adjusted.get((r["kv_cache_dtype"], "none"), {}).get(k))]
        lines.append(f"| {r['kv_cache_dtype']} | {r['speculative']} | {_number(r.get('seconds'), 1)} "
                     f"| {_number(r.get('output_tok_s'))} | {_number(r.get('acceptance_length'), 3)} "
                     f"| {' | '.join(cells)} | {_note(r)} |")
    return "\n".join(lines)


def latency_table(records: list[dict]) -> str:
    """Batch-1 time per output token by context (benchmarks/latency.py), against ``auto``'s."""
    rows = sorted((r for r in records if r["benchmark"] == "latency"),
                  key=lambda r: (r["context"], _dtype_rank(r["kv_cache_dtype"])))
    if not rows:
        return ""
    baseline = {r["context"]: r.get("tpot_ms") for r in rows if r["kv_cache_dtype"] == "auto"}
    lines = ["| context | kv_cache_dtype | time to first token ms | time per output token ms | vs auto | note |",
             "|---" * 6 + "|"]
    for r in rows:
        tpot, base = r.get("tpot_ms"), baseline.get(r["context"])
        lines.append(f"| {r['context']:,} | {r['kv_cache_dtype']} | {_number(r.get('ttft_ms'), 1)} "
                     f"| {_number(tpot, 2)} | {f'{tpot / base:.2f}x' if tpot and base else ''} | {_note(r)} |")
    return "\n".join(lines)


def model_capacity_table(records: list[dict]) -> str:
    """vLLM's maximum concurrency per model shape (benchmarks/model_capacity.py), measured and as
    kitty_vllm.tools.capacity computes it, and the measured and computed ratios against ``auto``."""
    rows = sorted((r for r in records if r["benchmark"] == "model_capacity"),
                  key=lambda r: (r["model"], _dtype_rank(r["kv_cache_dtype"])))
    if not rows:
        return ""
    auto = {r["model"]: r for r in rows if r["kv_cache_dtype"] == "auto"}
    lines = ["| model | kv_cache_dtype | tokens | max concurrency | computed | vs auto | computed vs auto | pool page "
             "bytes | note |", "|---" * 9 + "|"]
    for r in rows:
        base = auto.get(r["model"], {})
        lines.append(f"| {r['model']} | {r['kv_cache_dtype']} | {r['max_model_len']:,} | {_number(r.get('max_concurrency'), 2)} "
                     f"| {_number(r.get('computed_max_concurrency'), 2)} "
                     f"| {_ratio(r.get('max_concurrency'), base.get('max_concurrency'))} "
                     f"| {_ratio(r.get('computed_max_concurrency'), base.get('computed_max_concurrency'))} "
                     f"| {_number(r.get('pool_page_bytes'))} | {_note(r)} |")
    return "\n".join(lines)


def markdown_tables(records: list[dict]) -> str:
    """The tables of every benchmark present, headed by the GPU, vLLM version and date of the records."""
    sources = sorted({(r.get("gpu"), r.get("vllm_version"), r.get("date")) for r in records}, key=str)
    header = "; ".join(f"{gpu}, vLLM {version}, {date}" for gpu, version, date in sources)
    tables = [t for t in (serving_table(records), decode_kernel_table(records), prefill_kernel_table(records),
                          step_profile_table(records), step_kernels_table(records), speculative_table(records),
                          latency_table(records), model_capacity_table(records)) if t]
    return "\n\n".join([header, *tables])


def _measured(records: list[dict], benchmarks: tuple[str, ...], field: str) -> list[dict]:
    return [r for r in records if r["benchmark"] in benchmarks and r.get(field) is not None]


def _grouped_bars(axes, records: list[dict], group_field: str, value_field: str, label: str) -> None:
    """One group of bars per KV-cache dtype, one bar per value of ``group_field``, each labelled with its
    value and its ratio to ``auto`` in the same group."""
    dtypes = sorted({r["kv_cache_dtype"] for r in records}, key=_dtype_rank)
    groups = sorted({r[group_field] for r in records})
    width = 0.8 / len(groups)
    for i, group in enumerate(groups):
        values = {r["kv_cache_dtype"]: r[value_field] for r in records if r[group_field] == group}
        heights = [values.get(dtype, 0) for dtype in dtypes]
        xs = [d + (i - (len(groups) - 1) / 2) * width for d in range(len(dtypes))]
        bars = axes.bar(xs, heights, width, label=f"{label} {group}")
        base = values.get(SERVING_BASELINES[0])
        labels = [f"{h:.0f}" + (f"\n{h / base:.2f}x" if base else "") if dtype in values else ""
                  for dtype, h in zip(dtypes, heights)]
        axes.bar_label(bars, labels, fontsize=7)
    axes.set_xticks(range(len(dtypes)), dtypes, rotation=20)
    axes.margins(y=0.15)
    axes.legend()


def plot_records(records: list[dict], stem: str | Path) -> list[Path]:
    """Draw ``<stem>-capacity.png``, ``<stem>-throughput.png`` and ``<stem>-decode_kernel.png`` for the
    benchmarks that have measured records; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    title = markdown_tables(records).split("\n", 1)[0]
    written = []

    def save(figure, name: str) -> None:
        figure.suptitle(title, fontsize=8)
        figure.tight_layout()
        path = Path(f"{stem}-{name}.png")
        figure.savefig(path, dpi=120)
        pyplot.close(figure)
        written.append(path)

    capacity = _measured(records, ("capacity",), "max_concurrency")
    if capacity:
        figure, axes = pyplot.subplots(figsize=(9, 4.5))
        _grouped_bars(axes, capacity, "max_model_len", "max_concurrency", "max_model_len")
        axes.set_ylabel("vLLM's maximum concurrency (requests)")
        save(figure, "capacity")
    throughput = _measured(records, ("w1", "w2"), "output_tok_s")
    if throughput:
        figure, axes = pyplot.subplots(figsize=(9, 4.5))
        _grouped_bars(axes, throughput, "benchmark", "output_tok_s", "workload")
        axes.set_ylabel("output tokens / s")
        save(figure, "throughput")
    kernels = _measured(records, ("decode_kernel",), "ms")
    if kernels:
        contexts = sorted({r["context"] for r in kernels})
        figure, grid = pyplot.subplots(2, len(contexts), figsize=(4 * len(contexts), 7), squeeze=False)
        for column, context in enumerate(contexts):
            for dtype in sorted({r["kv_cache_dtype"] for r in kernels}, key=_dtype_rank):
                cells = sorted((r for r in kernels if r["context"] == context and r["kv_cache_dtype"] == dtype),
                               key=lambda r: r["batch"])
                batches = [r["batch"] for r in cells]
                grid[0][column].plot(batches, [r["ms"] for r in cells], marker="o", label=dtype)
                grid[1][column].plot(batches, [r["pct_of_copy"] for r in cells], marker="o", label=dtype)
            grid[0][column].set_title(f"context {context:,}")
            grid[0][column].set_ylabel("ms")
            grid[0][column].set_yscale("log")
            grid[1][column].set_ylabel("% of device copy bandwidth")
            for axes in grid[:, column]:
                axes.set_xscale("log", base=2)
                axes.set_xlabel("batch")
                axes.legend(fontsize=7)
        save(figure, "decode_kernel")
    return written
