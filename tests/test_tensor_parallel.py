"""Tensor parallelism with kitty2 through vLLM's own executors: TP=2 decodes TP=1's greedy tokens, every
rank runs the plugin with its share of the KV heads, and the KV-cache capacity scales with the ranks.

With ``tensor_parallel_size=2`` each rank builds its layers with half the KV heads. The checks:

* every rank's KV-cache specs are kitty's (so the plugin's patches ran in that worker process, also a
  Ray actor), with the per-rank head count and page bytes from kitty_vllm.layout;
* the same per-rank KV-cache budget holds twice the blocks (packed pages and staging blocks are both
  half as large), so the capacity in tokens doubles;
* greedy tokens equal TP=1's. TP=2 adds partial products in another order, and kitty's rounding is
  discontinuous, so a code can flip; where kitty2's tokens differ, ``auto`` runs too and kitty2 may
  differ in no more prompts than ``auto`` does (the issue's rule).

Cases: the tiny Llama (tests/tiny_model.py) with head_dim 64 and 2 KV heads (one per rank) and with
head_dim 128 and 4 KV heads (two per rank), each through the ``mp`` and the ``ray`` executor. CI's CPU
runs the first with ``mp`` (two CPU workers of one core each, about a minute); the rest need 2 CUDA
GPUs, and Ray for ``ray``. Everything runs in float32 on essay prompts, like tests/test_vllm_e2e.py.
SmolLM2-135M cannot take part: vLLM cannot split its 9 query heads over 2 ranks, whatever the
KV-cache dtype.

With $KITTY_RESULTS_DIR set, every engine's figures (KV heads and block bytes per rank, blocks, KV
tokens per rank, start time and, on GPUs, output tokens per second) and every comparison go to
``tensor_parallel.json`` there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from engine import prompt_inputs, torch_threads, vllm_engine
from kitty_vllm.tools.assets import token_windows
from kitty_vllm.block_manager import KittyPackedSpec, KittyStageSpec
from kitty_vllm.config import load_config
from kitty_vllm.layout import page_layout
from kitty_vllm.stage import STAGE_SUFFIX
from tiny_model import build_tiny_model

TP = 2
ON_GPU = torch.cuda.is_available()
MODELS = {
    "tiny-d64-kv2": dict(head_dim=64, num_kv_heads=2, num_heads=4),
    "tiny-d128-kv4": dict(head_dim=128, num_kv_heads=4, num_heads=8),
}
NEW_TOKENS = 32
PROMPT_LENS = (40, 120, 300, 740)  # one never completes a page, the others pack pages
FIRST_WINDOW = 2                   # as in tests/test_vllm_e2e.py: its greedy choices are no near-ties
MAX_MODEL_LEN = 1024
KV_CACHE_BYTES = 1 << 28           # per rank
# Throughput, on GPUs only (the CPU runs the kitty kernels in Triton's interpreter): this many
# requests of this many prompt tokens, each decoding this many tokens.
THROUGHPUT_REQUESTS, THROUGHPUT_PROMPT, THROUGHPUT_TOKENS = 64, 256, 128


def _case(model: str, backend: str):
    marks = []
    if ON_GPU or (model, backend) != ("tiny-d64-kv2", "mp"):
        marks.append(pytest.mark.cuda)
        marks.append(pytest.mark.skipif(torch.cuda.device_count() < TP, reason=f"needs {TP} CUDA GPUs"))
    if backend == "ray":
        marks.append(pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray"))
    return pytest.param(model, backend, marks=marks, id=f"{model}-{backend}")


CASES = [_case(model, backend) for model in MODELS for backend in ("mp", "ray")]


@dataclass
class EngineRun:
    """What one engine gave: greedy tokens, each rank's KV-cache specs and the engine's figures."""

    outputs: list[list[int]]
    rank_specs: list[dict] = field(repr=False)
    figures: dict


@contextlib.contextmanager
def cpu_workers_bound(tp: int):
    """vLLM's CPU executor pins each worker's OpenMP threads; its automatic choice wants a NUMA node per
    worker, so give each worker one core of its own (or no binding where there are too few)."""
    with pytest.MonkeyPatch.context() as mp:
        cores = sorted(os.sched_getaffinity(0))
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND",
                  "|".join(map(str, cores[:tp])) if len(cores) >= tp else "nobind")
        yield


def run_engine(model_dir: Path, prompts: list[list[int]], kv_cache_dtype: str, tp: int,
               backend: str) -> EngineRun:
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

    kwargs = dict(kv_cache_dtype=kv_cache_dtype, dtype="float32", max_model_len=MAX_MODEL_LEN,
                  kv_cache_memory_bytes=KV_CACHE_BYTES, max_num_seqs=THROUGHPUT_REQUESTS,
                  tensor_parallel_size=tp)
    if tp > 1:
        kwargs["distributed_executor_backend"] = backend
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    binding = cpu_workers_bound(tp) if tp > 1 and not ON_GPU else contextlib.nullcontext()
    start = time.perf_counter()
    with binding, vllm_engine(model_dir, **kwargs) as llm:
        started = time.perf_counter() - start
        rank_specs = llm.collective_rpc("get_kv_cache_spec")
        outputs = [list(o.outputs[0].token_ids)
                   for o in llm.generate(prompt_inputs(prompts), greedy, use_tqdm=False)]
        vllm_config = llm.llm_engine.vllm_config
        kv_cache_config = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config
        kv_tokens, concurrency = get_kv_cache_capacity(vllm_config, kv_cache_config)
        spec = next(iter(rank_specs[0].values()))  # every layer's spec has the same heads and page bytes
        figures = dict(model=model_dir.name, kv_cache_dtype=kv_cache_dtype, tp=tp,
                       backend=backend if tp > 1 else "uni", device=_device_name(),
                       kv_heads_per_rank=spec.num_kv_heads, block_bytes_per_rank=spec.page_size_bytes,
                       kv_cache_bytes_per_rank=KV_CACHE_BYTES, num_blocks=kv_cache_config.num_blocks,
                       kv_tokens_per_rank=kv_tokens,
                       max_concurrency_at_max_model_len=round(concurrency, 2),
                       engine_start_s=round(started, 1))
        if ON_GPU:
            figures["output_tokens_per_s"] = round(_throughput(llm), 1)
    if backend == "ray" and tp > 1:
        import ray

        ray.shutdown()  # the next Ray engine starts its own local cluster
    print(f"\n[tp] {figures}")
    return EngineRun(outputs, rank_specs, figures)


def _throughput(llm) -> float:
    """Output tokens per second over a batch of THROUGHPUT_REQUESTS requests (prefill included), timed on
    the second run: the first compiles the Triton kernels for the batch's shapes."""
    from vllm import SamplingParams

    prompts = [[(7 * r + j) % 1000 + 3 for j in range(THROUGHPUT_PROMPT)] for r in range(THROUGHPUT_REQUESTS)]
    params = SamplingParams(temperature=0.0, max_tokens=THROUGHPUT_TOKENS, ignore_eos=True)
    llm.generate(prompt_inputs(prompts), params, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompt_inputs(prompts), params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def _device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "cpu"


class Runs:
    """Engines by (model, kv_cache_dtype, tp, backend), each started once per module; TP=1 runs in
    process (vLLM's ``uni`` executor) whatever the case's backend."""

    def __init__(self):
        self.runs: dict[tuple, EngineRun] = {}
        self.comparisons: list[dict] = []

    def get(self, model: str, kv_cache_dtype: str, tp: int, backend: str) -> EngineRun:
        key = (model, kv_cache_dtype, tp, backend if tp > 1 else "uni")
        if key not in self.runs:
            model_dir = build_tiny_model(**MODELS[model])
            self.runs[key] = run_engine(model_dir, prompts_for(model_dir), kv_cache_dtype, tp, backend)
        return self.runs[key]

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        result = dict(engines=[run.figures for run in self.runs.values()], comparisons=self.comparisons)
        (directory / "tensor_parallel.json").write_text(json.dumps(result, indent=2) + "\n")


def prompts_for(model_dir: Path) -> list[list[int]]:
    """BOS + essay text of PROMPT_LENS tokens, each from its own window."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    windows = token_windows(tokenizer, FIRST_WINDOW + len(PROMPT_LENS), max(PROMPT_LENS))[FIRST_WINDOW:]
    return [[tokenizer.bos_token_id] + window[: n - 1] for window, n in zip(windows, PROMPT_LENS)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """TP=1 runs in this process (see tests/engine.py torch_threads); TP=2's workers bind their own."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def runs():
    runs = Runs()
    yield runs
    if os.environ.get("KITTY_RESULTS_DIR"):
        runs.write(Path(os.environ["KITTY_RESULTS_DIR"]))


def differing_prompts(a: EngineRun, b: EngineRun) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a.outputs, b.outputs, strict=True)) if x != y]


@pytest.mark.parametrize("model, backend", CASES)
def test_tp2_kitty2_matches_tp1(runs, model, backend):
    one, two = runs.get(model, "kitty2", 1, backend), runs.get(model, "kitty2", TP, backend)
    comparison = dict(model=model, backend=backend, kitty2_prompts_differing=differing_prompts(one, two))
    if comparison["kitty2_prompts_differing"]:
        comparison["auto_prompts_differing"] = differing_prompts(runs.get(model, "auto", 1, backend),
                                                                 runs.get(model, "auto", TP, backend))
    runs.comparisons.append(comparison)
    print(f"\n[tp] {comparison}")
    assert len(comparison["kitty2_prompts_differing"]) <= len(comparison.get("auto_prompts_differing", ()))


@pytest.mark.parametrize("model, backend", CASES)
def test_tp2_ranks_hold_half_the_kv_heads(runs, model, backend):
    """Each rank's specs are kitty's (the plugin ran in every worker), with its share of the KV heads,
    and the same per-rank budget holds twice TP=1's blocks."""
    one, two = runs.get(model, "kitty2", 1, backend), runs.get(model, "kitty2", TP, backend)
    params = MODELS[model]
    heads = params["num_kv_heads"] // TP
    page_bytes = page_layout(load_config("kitty2"), params["head_dim"]).page_bytes
    assert len(two.rank_specs) == TP
    for specs in two.rank_specs:
        packed = {name: s for name, s in specs.items() if isinstance(s, KittyPackedSpec)}
        stage = {name: s for name, s in specs.items() if isinstance(s, KittyStageSpec)}
        assert packed and set(specs) == set(packed) | set(stage)
        assert set(stage) == {f"{name}.{STAGE_SUFFIX}" for name in packed}
        for spec in (*packed.values(), *stage.values()):
            assert spec.num_kv_heads == heads
            assert spec.page_size_bytes == heads * page_bytes
        assert specs == two.rank_specs[0]
    assert two.figures["num_blocks"] // TP == one.figures["num_blocks"]
