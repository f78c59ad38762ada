"""A vLLM engine in the test process, for the end-to-end tests (tests/test_vllm_e2e.py and
tests/test_smollm2_perplexity.py).

``vllm_engine(model, **kwargs)`` yields an ``LLM`` that runs its engine core in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no worker process to start, so an engine comes up in seconds
and a failure shows its traceback here), eager (no torch.compile), with a fixed KV-cache budget instead
of a fraction of the machine's memory, and ``seed=0``. On a GPU the engine also claims only a tenth of
the GPU's memory at start-up (vLLM refuses to start while less than ``gpu_memory_utilization`` of it is
free), so that parallel test processes (``pytest -n``) share one GPU; the CPU platform ignores it. On
exit the engine is shut down and vLLM's process-wide state (distributed groups, environment cache) is
reset, so the next engine starts clean.
``exact_prefill=True`` runs a kitty dtype's preset with ``exact_prefill`` on (kitty_vllm.config): what
the tests need that compare prefill with decode, a prefix-cache hit with a miss, or vLLM's prefill
chunks with an oracle that splits the prompt otherwise.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kitty_vllm.config import CONFIG_FILE_ENV, PRESETS, KittyConfig

ENGINE_DEFAULTS = dict(
    enforce_eager=True,
    seed=0,
    kv_cache_memory_bytes=1 << 28,
    gpu_memory_utilization=0.1,
    max_num_batched_tokens=512,
    max_num_seqs=8,
    disable_log_stats=True,
    # FlashInfer's autotuning adds ~80 s to the first GPU start and is irrelevant to these tests.
    kernel_config={"enable_flashinfer_autotune": False},
)


@contextlib.contextmanager
def vllm_engine(model: str | Path, exact_prefill: bool = False, **kwargs) -> Iterator:
    """An in-process ``vllm.LLM`` for ``model``; ``kwargs`` override ENGINE_DEFAULTS. With
    ``exact_prefill``, a kitty ``kv_cache_dtype`` runs its preset with exact_prefill on (other dtypes
    are unaffected)."""
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory(prefix="kitty-engine-") as tmp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        dtype = kwargs.get("kv_cache_dtype")
        if exact_prefill and dtype in PRESETS:
            config = KittyConfig.from_preset(dtype).replace(exact_prefill=True)
            mp.setenv(CONFIG_FILE_ENV, str(config.to_yaml(Path(tmp) / f"{dtype}-exact-prefill.yaml")))
        from vllm import LLM

        from kitty_vllm.tools.eval import shutdown

        start = time.perf_counter()
        llm = LLM(model=str(model), **{**ENGINE_DEFAULTS, **kwargs})
        print(f"\n[engine] {Path(model).name} kv_cache_dtype={dtype or 'auto'}"
              f"{' (exact_prefill)' if exact_prefill else ''} started in {time.perf_counter() - start:.1f} s")
        try:
            yield llm
        finally:
            shutdown(llm)


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Run the block with ``num_threads`` intra-op threads, then restore the previous count.

    Calls ``torch._C.set_num_threads`` because vLLM's CPU worker replaces ``torch.set_num_threads``
    with a no-op in its process, which in-process engines make this process. One thread keeps the
    runtime predictable: on an idle 2-core machine two threads score SmolLM2 about 1.5x faster, but
    on a loaded one (other jobs, parallel test runs) OpenMP's two-thread hand-offs made the tiny model
    and the oracle 10x slower and SmolLM2 5x slower.
    """
    import torch

    before = torch.get_num_threads()
    torch._C.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch._C.set_num_threads(before)


def prompt_inputs(prompts: list[list[int]]) -> list:
    """Token-id prompts as vLLM inputs (used as given: nothing is added)."""
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
