"""Accuracy of KV-cache dtypes on real models, through vLLM's offline ``LLM`` API.

    python -m kitty_vllm.tools.eval --model qwen-1.5b \\
        --kv-cache-dtypes auto fp8 int4_per_token_head kitty2 kitty2-lite kivi2 \\
        --tasks gsm8k perplexity needle [--ablations] [--limit N] [--json PATH]

Tasks (one engine per KV-cache dtype runs all of them, except as said for perplexity):

* ``gsm8k``: the test set (``--limit`` keeps the first N problems), 8-shot chain of thought, greedy,
  exact match on the final number (kitty_vllm.tools.gsm8k); score = accuracy.
* ``perplexity``: ``--ppl-windows`` consecutive windows of ``--ppl-window`` tokens of Paul Graham's
  essays, each scored with vLLM's prompt log-probabilities in one prefill; score = perplexity over
  every token after each window's first. These must be the log-probabilities that decoding with
  teacher forcing gives. By default the tokens of a kitty prefill step read each other in full
  precision (kitty_vllm.reference), so prompt log-probabilities would see less quantization than
  decoding does, and depend on ``--max-num-batched-tokens``. A kitty dtype therefore scores
  perplexity in an engine of its own with ``exact_prefill`` on (KITTY_CONFIG set to a temporary copy
  of its config), where the query at position p reads every token older than its window
  dequantized, in prefill exactly as in decode (tests/test_accuracy.py checks that on the tiny model, prefill against
  decode steps through vLLM). The record keeps the dtype's label.
* ``needle``: a pass key at 5 depths of 4k, 8k, 16k and 32k-token contexts (kitty_vllm.tools.needle);
  score = fraction retrieved, one record per context length. Lengths beyond the model's context are
  skipped.

GSM8K and needle run each dtype as users get it (its config as it stands: the presets leave
``exact_prefill`` off).

``DTYPE:FILE.yaml`` runs ``DTYPE`` with ``KITTY_CONFIG=FILE.yaml`` (kitty_vllm.config), labelled
``DTYPE:FILE``; plain kitty dtypes run their preset (an inherited KITTY_CONFIG is refused, since it
would silently change every kitty dtype). ``DTYPE:skip=LAYERS`` runs a quantized dtype (vLLM's or a
kitty preset) with the comma-separated ``LAYERS`` (indices from 0) left unquantized, in the model's
dtype (vLLM's ``kv_cache_dtype_skip_layers``; a kitty dtype keeps them beside its pages, sharing the
block pool: kitty_vllm.block_manager.mixed), labelled e.g. ``fp8 (layer 0 unquantized)``.
``DTYPE:lever=NAMES`` runs a kitty preset with the comma-separated accuracy levers of issue 30 that only
the float32 simulation implements (kitty_vllm.tools.levers: ``value-lag``, ``hadamard-v``,
``layer-boost=PROFILE.yaml``, the per-layer boost ratios of a profile that ``python -m
kitty_vllm.tools.calibrate`` makes for the model), labelled e.g. ``kitty2 (value-lag + hadamard-v)`` or
``kitty2 (hadamard-v + layer-boost=PROFILE)``; it needs ``--reference``, since the kernels do not implement
them.
``--ablations`` adds the GSM8K ablations of the boost: policy (magnitude = kitty2, variance, random;
25% of channels) and ratio (0 = kivi2, 12.5% = kitty2-lite, 25% = kitty2, 50%), from
kitty_vllm/tools/ablations/.

``--reference`` scores perplexity with the float32 decode-time simulation instead of vLLM: the
model in transformers with every attention layer reading the cache through kitty_vllm.reference with
``exact_prefill`` (kitty_vllm.tools.oracle), on the same windows; compare
it with a vLLM run in ``--dtype float32``.

Results merge into ``--json`` (default ``<--results-dir>/accuracy-<gpu>-<yyyy-mm-dd>.json``, the directory
``benchmarks/results`` of the working directory unless given) as
records ``{"model", "task", "kv_cache_dtype", "n", "score", "ci95", "window_nlls", "hits"}`` (``window_nlls``:
perplexity's mean negative log-likelihood of each window, in order, and ``hits`` GSM8K's and the needle's
correctness of each problem or trial, in order, "1" or "0" a character: for paired comparisons between
dtypes (kitty_vllm.tools.study); None for the other tasks; a new record replaces one with
the same model, task and dtype), written after every dtype with the file's markdown table beside it
(``.md``, also printed at the end). ``ci95`` is the half-width of a 95% interval: 1.96 standard
errors of the mean over problems, trials or windows (perplexity: over windows' mean log-likelihood,
mapped through exp).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kitty_vllm.tools import assets, gsm8k, needle
from kitty_vllm.config import CONFIG_FILE_ENV, PRESETS, KittyConfig

logger = logging.getLogger("kitty_vllm.tools.eval")

ABLATION_DIR = Path(__file__).resolve().parent / "ablations"
ABLATION_PRESET = "kitty2"   # every ablation file is kitty2 with one field changed
TASKS = ("gsm8k", "perplexity", "needle")
KV_CACHE_DTYPES = ("auto", "fp8", "int4_per_token_head", "kitty2", "kitty2-lite", "kivi2")
# GSM8K ablations beyond the presets: boost policy at kitty2's 25% ratio, and a 50% ratio.
ABLATIONS = ("kitty2:boost-variance", "kitty2:boost-range", "kitty2:boost-random", "kitty2:boost-ratio-50")
Z95 = 1.96
CPU_KV_CACHE_GIB = 2.0
SKIP_PREFIX = "skip="
LEVER_PREFIX = "lever="


@dataclass(frozen=True)
class Score:
    n: int
    score: float
    ci95: float | None
    window_nlls: tuple[float, ...] | None = None
    hits: str | None = None   # proportion's items: "1" for each one correct, "0" otherwise


@dataclass(frozen=True)
class Record:
    model: str
    task: str
    kv_cache_dtype: str
    n: int
    score: float
    ci95: float | None
    window_nlls: tuple[float, ...] | None = None
    hits: str | None = None


@dataclass(frozen=True)
class CacheSpec:
    """A ``--kv-cache-dtype`` value, with the kitty config file that replaces its preset (if any), the
    layers that vLLM leaves unquantized (if any, sorted) or the simulation's accuracy levers (if any, in
    kitty_vllm.tools.levers.LEVERS' order). ``exact_prefill``: run the kitty config with exact_prefill on
    (the perplexity task's engine; the label stays the dtype's)."""

    kv_cache_dtype: str
    config_file: Path | None = None
    skip_layers: tuple[int, ...] = ()
    exact_prefill: bool = False
    levers: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> CacheSpec:
        dtype, _, file = text.partition(":")
        if not file:
            return cls(dtype)
        if file.startswith(SKIP_PREFIX):   # "fp8:skip=0" is no file name
            return cls(dtype, skip_layers=_skip_layers(text, dtype, file.removeprefix(SKIP_PREFIX)))
        if dtype not in PRESETS:
            what = "a lever" if file.startswith(LEVER_PREFIX) else "a config file"
            raise ValueError(f"{text}: {what} applies to kitty dtypes only ({', '.join(PRESETS)})")
        if file.startswith(LEVER_PREFIX):
            from kitty_vllm.tools import levers

            return cls(dtype, levers=levers.parse(file.removeprefix(LEVER_PREFIX)))
        path = Path(file)
        if path.suffix != ".yaml":   # "kitty2:boost-random" names ablations/boost-random.yaml here
            if dtype != ABLATION_PRESET:
                raise ValueError(f"{text}: the ablations are whole {ABLATION_PRESET} configs, so on {dtype} it "
                                 f"would run {ABLATION_PRESET}'s; write a config file of the fields to change "
                                 f"and run {dtype}:FILE.yaml")
            path = ABLATION_DIR / f"{file}.yaml"
        KittyConfig.from_yaml(path)   # refuse a bad file now, not in the middle of a run
        return cls(dtype, path)

    @property
    def label(self) -> str:
        if self.levers:
            from kitty_vllm.tools import levers

            return f"{self.kv_cache_dtype} ({' + '.join(map(levers.label, self.levers))})"
        if self.skip_layers:
            layers = ("layers " if len(self.skip_layers) > 1 else "layer ") + ",".join(map(str, self.skip_layers))
            return f"{self.kv_cache_dtype} ({layers} unquantized)"
        return self.kv_cache_dtype if self.config_file is None else f"{self.kv_cache_dtype}:{self.config_file.stem}"

    def kitty_config(self) -> KittyConfig | None:
        """The kitty config this spec runs; None for vLLM's own dtypes."""
        if self.kv_cache_dtype not in PRESETS:
            return None
        config = (KittyConfig.from_yaml(self.config_file) if self.config_file
                  else KittyConfig.from_preset(self.kv_cache_dtype))
        return config.replace(exact_prefill=True) if self.exact_prefill else config

    def llm_kwargs(self) -> dict[str, Any]:
        """The cache's arguments to ``vllm.LLM``. vLLM matches skipped layers by ``str(index)``. Levers
        are refused: only the float32 simulation implements them."""
        if self.levers:
            raise ValueError(f"{self.label}: {LEVER_PREFIX}{','.join(self.levers)} runs in the float32 simulation "
                             "only (--reference); the kernels do not implement it yet")
        kwargs: dict[str, Any] = {"kv_cache_dtype": self.kv_cache_dtype}
        if self.skip_layers:
            kwargs["kv_cache_dtype_skip_layers"] = [str(i) for i in self.skip_layers]
        return kwargs


def _skip_layers(text: str, dtype: str, layers: str) -> tuple[int, ...]:
    """The sorted layer indices of ``DTYPE:skip=LAYERS``, for vLLM's quantized dtypes and the kitty
    dtypes alike."""
    if dtype == "auto":
        raise ValueError(f"{text}: auto is unquantized already; skip= applies to the quantized dtypes")
    if not re.fullmatch(r"\d+(,\d+)*", layers):
        raise ValueError(f"{text}: {SKIP_PREFIX}LAYERS takes comma-separated layer indices, e.g. {dtype}:skip=0,1")
    return tuple(sorted({int(i) for i in layers.split(",")}))


# ----------------------------------------------------------------------------------------- scores

def proportion(hits: Sequence[bool]) -> Score:
    """Accuracy and the half-width of its 95% interval (normal approximation, sample variance), with the
    items' hits."""
    n = len(hits)
    p = sum(hits) / n
    ci = Z95 * math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None
    return Score(n, p, ci, hits="".join("01"[bool(h)] for h in hits))


def perplexity(window_nlls: Sequence[float]) -> Score:
    """Perplexity over equal-length windows from each window's mean negative log-likelihood; ci95
    from the spread of those means (delta method: d exp(x) = exp(x) dx)."""
    n = len(window_nlls)
    mean = statistics.fmean(window_nlls)
    ppl = math.exp(mean)
    ci = Z95 * ppl * statistics.stdev(window_nlls) / math.sqrt(n) if n > 1 else None
    return Score(n, ppl, ci, tuple(window_nlls))


# ------------------------------------------------------------------------------------------ tasks

def score_gsm8k(llm, problems: Sequence[dict[str, str]], use_tqdm: bool = True) -> tuple[Score, list[str]]:
    """GSM8K accuracy of ``llm`` (greedy) on ``problems``, and its completions."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=gsm8k.MAX_NEW_TOKENS, stop=list(gsm8k.STOP))
    outputs = llm.generate([gsm8k.prompt(p["question"]) for p in problems], params, use_tqdm=use_tqdm)
    completions = [out.outputs[0].text for out in outputs]
    hits = [gsm8k.is_correct(c, p["answer"]) for c, p in zip(completions, problems, strict=True)]
    return proportion(hits), completions


def window_nlls(llm, windows: Sequence[Sequence[int]], use_tqdm: bool = True) -> list[float]:
    """Mean negative log-likelihood of each window's tokens after its first, from prompt log-probs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(w)) for w in windows], params,
                           use_tqdm=use_tqdm)
    nlls = []
    for out, window in zip(outputs, windows, strict=True):
        # prompt_logprobs[i] maps token ids to log-probabilities at position i (None at 0); with
        # prompt_logprobs=0 it holds the prompt's own token there.
        logprobs = [pos[token].logprob for pos, token in zip(out.prompt_logprobs[1:], window[1:], strict=True)]
        nlls.append(-math.fsum(logprobs) / len(logprobs))
    return nlls


def reference_window_nlls(model_dir: Path, windows: Sequence[Sequence[int]], spec: CacheSpec) -> list[float]:
    """``window_nlls`` of the float32 decode-time simulation (kitty_vllm.tools.oracle) of ``spec``'s cache,
    its levers included (kitty_vllm.tools.levers)."""
    import torch

    if spec.kv_cache_dtype != "auto" and spec.kv_cache_dtype not in PRESETS:
        raise ValueError(f"the float32 simulation covers auto and the kitty dtypes, not {spec.kv_cache_dtype}")
    from kitty_vllm.tools import oracle
    from kitty_vllm.tools.levers import layer_indices, lever_attention

    config = spec.kitty_config()
    if config is not None:
        config = config.replace(exact_prefill=True)   # decode-time, as the perplexity engine runs it
    attention = lever_attention(spec.levers)
    nlls = []
    with layer_indices(oracle.load_model(model_dir)):   # the layer-boost lever's layer
        for i, window in enumerate(windows):
            start = time.perf_counter()
            logits = oracle.kitty_logits(model_dir, list(window), config, attention=attention)
            logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(window[1:])[:, None])
            nlls.append(-float(logprobs.double().mean()))
            logger.info("  simulation window %d/%d: nll %.4f (%.0f s)", i + 1, len(windows), nlls[-1],
                        time.perf_counter() - start)
    return nlls


def score_needle(llm, trials: Sequence[needle.Trial], use_tqdm: bool = True) -> dict[int, Score]:
    """Retrieval rate per context length."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=needle.MAX_NEW_TOKENS)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=t.prompt_token_ids) for t in trials], params,
                           use_tqdm=use_tqdm)
    hits: dict[int, list[bool]] = {}
    for trial, out in zip(trials, outputs, strict=True):
        hits.setdefault(trial.context_length, []).append(trial.is_correct(out.outputs[0].text))
    return {length: proportion(h) for length, h in hits.items()}


# ----------------------------------------------------------------------------------------- engine

@contextlib.contextmanager
def kitty_config_env(spec: CacheSpec) -> Iterator[None]:
    """KITTY_CONFIG set to ``spec``'s file (or unset) for the block, or with ``spec.exact_prefill`` to
    a temporary copy of its config with exact_prefill on; engine processes inherit it."""
    previous = os.environ.pop(CONFIG_FILE_ENV, None)
    try:
        with tempfile.TemporaryDirectory(prefix="kitty-eval-") as tmp:
            if spec.exact_prefill:
                path = spec.kitty_config().to_yaml(Path(tmp) / f"{spec.kv_cache_dtype}-exact-prefill.yaml")
                os.environ[CONFIG_FILE_ENV] = str(path)
            elif spec.config_file is not None:
                os.environ[CONFIG_FILE_ENV] = str(spec.config_file)
            yield
    finally:
        os.environ.pop(CONFIG_FILE_ENV, None)
        if previous is not None:
            os.environ[CONFIG_FILE_ENV] = previous


@contextlib.contextmanager
def engine(model_dir: Path, spec: CacheSpec, **kwargs) -> Iterator[Any]:
    """A ``vllm.LLM`` for ``model_dir`` with ``spec``'s KV cache, shut down (and vLLM's process-wide
    state reset) on exit so that the next one starts clean. ``kwargs`` go to ``LLM``."""
    from vllm import LLM

    # The parent has touched CUDA (torch.cuda.is_available), so a forked engine core could not use it.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    with kitty_config_env(spec):
        start = time.perf_counter()
        llm = LLM(model=str(model_dir), **spec.llm_kwargs(), **kwargs)
        logger.info("[%s] engine%s started in %.0f s", spec.label,
                    " with exact_prefill" if spec.exact_prefill else "", time.perf_counter() - start)
        try:
            yield llm
        finally:
            shutdown(llm)


def shutdown(llm) -> None:
    """Stop an in-process ``vllm.LLM`` and reset vLLM's process-wide state, so the next engine starts
    clean in the same process."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


# ---------------------------------------------------------------------------------------- results

def device_name() -> str:
    """``nvidia-h100-80gb-hbm3`` for "NVIDIA H100 80GB HBM3" (the slug benchmarks/report.py uses),
    ``cpu`` without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def default_json_path(results_dir: Path) -> Path:
    return results_dir / f"accuracy-{device_name()}-{datetime.date.today().isoformat()}.json"


def merge_records(path: Path, new: Sequence[Record]) -> list[dict[str, Any]]:
    """Write ``path`` atomically: its records, with those sharing (model, task, dtype) with ``new``
    replaced by them. Returns every record now in the file."""
    old = json.loads(path.read_text()) if path.is_file() else []
    keys = {(r.model, r.task, r.kv_cache_dtype) for r in new}
    merged = [r for r in old if (r["model"], r["task"], r["kv_cache_dtype"]) not in keys]
    merged += [asdict(r) for r in new]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(merged, f, indent=1)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return merged


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """One row per (model, task), one column per KV-cache dtype: KV_CACHE_DTYPES' first, in that order,
    then the others (ablations, mitigated formats) as they come. Accuracies in percent; perplexities
    with their change against ``auto`` of the same row."""
    seen = dict.fromkeys(r["kv_cache_dtype"] for r in records)
    dtypes = [d for d in KV_CACHE_DTYPES if d in seen] + [d for d in seen if d not in KV_CACHE_DTYPES]
    rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in records:
        rows.setdefault((r["model"], r["task"]), {})[r["kv_cache_dtype"]] = r
    lines = ["| model | task | n | " + " | ".join(dtypes) + " |", "|---|---|---|" + "---|" * len(dtypes)]
    for (model, task), cells in rows.items():
        n = "/".join(sorted({str(c["n"]) for c in cells.values()}))
        lines.append(f"| {model} | {task} | {n} | "
                     + " | ".join(_cell(task, cells.get(d), cells.get("auto")) for d in dtypes) + " |")
    return "\n".join(lines)


def _cell(task: str, record: dict[str, Any] | None, auto: dict[str, Any] | None) -> str:
    if record is None:
        return ""
    ci = record["ci95"]
    if task.startswith("perplexity"):
        text = f"{record['score']:.3f}" + (f" ± {ci:.3f}" if ci is not None else "")
        if auto is not None and auto is not record:
            text += f" ({record['score'] / auto['score'] - 1:+.1%})"
        return text
    return f"{100 * record['score']:.1f}" + (f" ± {100 * ci:.1f}" if ci is not None else "")


# ---------------------------------------------------------------------------------------- driver

def _tokens(count: int) -> str:
    """``8k`` for 8192, else the number."""
    return f"{count // 1024}k" if count % 1024 == 0 else str(count)


def _model_label(args: argparse.Namespace) -> str:
    return args.model if args.dtype == "auto" else f"{args.model}/{args.dtype}"


def run_tasks(llm, tasks: Sequence[str], problems, windows, trials, ppl_task: str) -> Iterator[tuple[str, Score]]:
    """(task name, score) for each task on one engine: ``gsm8k``, ``perplexity-<window>``, and
    ``needle-<length>`` per context length."""
    for task in tasks:
        if task == "gsm8k":
            yield task, score_gsm8k(llm, problems)[0]
        elif task == "perplexity":
            yield ppl_task, perplexity(window_nlls(llm, windows))
        else:
            for length, score in score_needle(llm, trials).items():
                yield f"needle-{_tokens(length)}", score


def engine_runs(spec: CacheSpec, tasks: Sequence[str]) -> list[tuple[CacheSpec, tuple[str, ...]]]:
    """The engines that run ``tasks`` for ``spec``, with their tasks: one, except that a kitty dtype
    whose config leaves exact_prefill off scores perplexity with it on (module docstring), in an engine
    of its own if other tasks run too."""
    config = spec.kitty_config()
    if config is None or config.exact_prefill or "perplexity" not in tasks:
        return [(spec, tuple(tasks))]
    rest = tuple(t for t in tasks if t != "perplexity")
    return [(spec, rest)] * bool(rest) + [(replace(spec, exact_prefill=True), ("perplexity",))]


def reference_tasks(model_dir: Path, windows, spec: CacheSpec, ppl_task: str) -> Iterator[tuple[str, Score]]:
    """``run_tasks`` for the float32 simulation, which scores perplexity only."""
    yield ppl_task, perplexity(reference_window_nlls(model_dir, windows, spec))


def check_layer_profile(spec: CacheSpec, model: str, model_config: Any) -> None:
    """Exit unless the layer-boost profile of ``spec`` (if any) fits ``model`` and ``spec``'s preset."""
    from kitty_vllm.tools.levers import layer_profile

    found = layer_profile(spec.levers)
    if found is None:
        return
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    try:
        found[0].check(spec.kitty_config(), model, model_config.num_hidden_layers, head_dim, found[1])
    except ValueError as e:
        raise SystemExit(f"{spec.label}: {e}") from None


def evaluate(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import AutoConfig, AutoTokenizer

    model_dir = assets.model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model_config = AutoConfig.from_pretrained(model_dir)
    max_positions = model_config.max_position_embeddings
    for spec in args.specs:
        if spec.skip_layers and spec.skip_layers[-1] >= model_config.num_hidden_layers:
            raise SystemExit(f"{spec.label}: {args.model} has layers 0 to {model_config.num_hidden_layers - 1}")
        check_layer_profile(spec, args.model, model_config)
    label = _model_label(args)
    ppl_task = f"perplexity-{_tokens(args.ppl_window)}" + ("-sim" if args.reference else "")

    problems = list(assets.gsm8k_test()[: args.limit]) if "gsm8k" in args.tasks else []
    if "perplexity" in args.tasks and args.ppl_window >= max_positions:
        raise SystemExit(f"--ppl-window {args.ppl_window}: {args.model} has {max_positions} positions, and vLLM "
                         f"needs one more than the window (use at most {max_positions - 1})")
    windows = assets.token_windows(tokenizer, args.ppl_windows, args.ppl_window) if "perplexity" in args.tasks else []
    lengths = tuple(n for n in args.needle_lengths if n <= max_positions)
    if "needle" in args.tasks and len(lengths) < len(args.needle_lengths):
        logger.warning("%s has %d positions: needle lengths %s skipped", args.model, max_positions,
                       [n for n in args.needle_lengths if n > max_positions])
    trials = needle.build_trials(tokenizer, lengths) if "needle" in args.tasks else []
    needed = [len(tokenizer.encode(gsm8k.prompt(p["question"]))) + gsm8k.MAX_NEW_TOKENS for p in problems]
    needed += [args.ppl_window + 1] * bool(windows) + [t.context_length for t in trials]
    max_model_len = min(max_positions, max(needed))

    runs = [run for spec in args.specs for run in engine_runs(spec, args.tasks)]
    if args.ablations:
        runs += [(CacheSpec.parse(a), ("gsm8k",)) for a in ABLATIONS]
    path = args.json or default_json_path(args.results_dir)
    records: list[dict[str, Any]] = []
    for spec, tasks in runs:
        new = []
        with contextlib.ExitStack() as stack:
            if args.reference:
                results = reference_tasks(model_dir, windows, spec, ppl_task)
            else:
                llm = stack.enter_context(engine(model_dir, spec, **_engine_kwargs(args, max_model_len)))
                results = run_tasks(llm, tasks, problems, windows, trials, ppl_task)
            start = time.perf_counter()
            for task, score in results:
                new.append(Record(label, task, spec.label, score.n, score.score, score.ci95, score.window_nlls,
                                  score.hits))
                logger.info("[%s] %s: %.4g ± %s (n=%d, %.0f s)", spec.label, task, score.score,
                            "-" if score.ci95 is None else f"{score.ci95:.2g}", score.n, time.perf_counter() - start)
                start = time.perf_counter()
        records = merge_records(path, new)
        path.with_suffix(".md").write_text(markdown_table(records) + "\n")
    logger.info("results in %s (table: %s)", path, path.with_suffix(".md"))
    return records


def _engine_kwargs(args: argparse.Namespace, max_model_len: int) -> dict[str, Any]:
    kwargs = dict(dtype=args.dtype, max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=not args.compile,
                  enable_prefix_caching=not args.no_prefix_caching, seed=0, disable_log_stats=True,
                  # FlashInfer's autotuning adds ~80 s to each GPU start and changes no result.
                  kernel_config={"enable_flashinfer_autotune": False})
    import torch

    if args.kv_cache_gib is not None or not torch.cuda.is_available():
        # On the CPU vLLM would otherwise reserve gpu_memory_utilization x the machine's RAM.
        kwargs["kv_cache_memory_bytes"] = int((args.kv_cache_gib or CPU_KV_CACHE_GIB) * 2**30)
    else:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    return kwargs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kitty_vllm.tools.eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(assets.MODELS))
    parser.add_argument("--kv-cache-dtypes", nargs="+", default=list(KV_CACHE_DTYPES), metavar="DTYPE[:CONFIG]",
                        help="CONFIG: a kitty config (FILE.yaml or an ablation's name), skip=LAYERS "
                             "(these layers unquantized, e.g. fp8:skip=0, kitty2:skip=0,1) or lever=NAMES "
                             "(--reference only, e.g. kitty2:lever=value-lag,hadamard-v or "
                             "kitty2:lever=layer-boost=PROFILE.yaml)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--ablations", action="store_true", help="add the GSM8K boost ablations")
    parser.add_argument("--limit", type=int, default=None, help="first N GSM8K problems (default: all 1,319)")
    parser.add_argument("--ppl-window", type=int, default=8192, help="tokens per perplexity window")
    parser.add_argument("--ppl-windows", type=int, default=4, help="number of perplexity windows")
    parser.add_argument("--needle-lengths", type=int, nargs="+", default=list(needle.CONTEXT_LENGTHS))
    parser.add_argument("--reference", action="store_true",
                        help="perplexity of the float32 decode-time simulation instead of vLLM")
    parser.add_argument("--dtype", default="auto", help="model dtype (auto: the checkpoint's bf16)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="tokens per engine step (the prefill chunk)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                        help="vLLM's share of the GPU, for each engine (one per dtype, in turn)")
    parser.add_argument("--kv-cache-gib", type=float, default=None,
                        help=f"fixed KV-cache size (default on the CPU: {CPU_KV_CACHE_GIB})")
    parser.add_argument("--compile", action="store_true", help="torch.compile and CUDA graphs (default: eager)")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="turn vLLM's prefix caching off (its default: on); needs --json, so that these "
                             "records do not replace those of a default run")
    parser.add_argument("--results-dir", type=Path, default=Path("benchmarks/results"),
                        help="where the default results file goes (relative to the working directory)")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: RESULTS_DIR/"
                        "accuracy-<gpu>-<date>.json)")
    args = parser.parse_args(argv)
    if os.environ.get(CONFIG_FILE_ENV):
        parser.error(f"{CONFIG_FILE_ENV} is set; pass DTYPE:FILE.yaml instead, so that each result says "
                     "which config it used")
    if args.reference:
        if set(args.tasks) != {"perplexity"}:
            parser.error("--reference scores perplexity only: add --tasks perplexity")
        if args.dtype not in ("auto", "float32"):
            parser.error("--reference is a float32 simulation; --dtype must be float32")
        args.dtype = "float32"
    try:
        args.specs = [CacheSpec.parse(d) for d in args.kv_cache_dtypes]
    except ValueError as e:   # KittyConfigError included
        parser.error(str(e))
    if args.reference and any(spec.skip_layers for spec in args.specs):
        parser.error("--reference: the float32 simulation quantizes every layer; it cannot run skip=LAYERS")
    leveled = [spec.label for spec in args.specs if spec.levers]
    if leveled and not args.reference:
        parser.error(f"{', '.join(leveled)}: {LEVER_PREFIX}NAMES runs in the float32 simulation only (the kernels "
                     "do not implement the levers yet): add --reference --tasks perplexity --dtype float32")
    if args.ablations and "gsm8k" not in args.tasks:
        parser.error("--ablations are GSM8K runs: add gsm8k to --tasks")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be positive")
    if args.no_prefix_caching and args.json is None:
        parser.error("--no-prefix-caching: write its records to a file of their own with --json")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    records = evaluate(parse_args(argv))
    print(markdown_table(records))


if __name__ == "__main__":
    main()
