"""The benchmark scripts' CPU side: their command lines, the results file (merge by measurement), and
the tables and plots drawn from a small synthetic results file. Benchmarks themselves need a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import report  # noqa: E402

ENVIRONMENT = {"gpu": "Test GPU", "vllm_version": "0.26.0", "date": "2026-01-02"}


def serving(benchmark, dtype, max_model_len, **figures):
    return {"benchmark": benchmark, "kv_cache_dtype": dtype, "max_model_len": max_model_len, **figures, **ENVIRONMENT}


def kernel(dtype, batch, context, ms):
    return {"benchmark": "decode_kernel", "kv_cache_dtype": dtype, "batch": batch, "context": context, "ms": ms,
            "gb_s": 1000 / ms, "copy_gb_s": 3000.0, "pct_of_copy": 100 / (3 * ms), **ENVIRONMENT}


def prefill(dtype, requests, new_tokens, context, ms, **figures):
    return {"benchmark": "prefill_kernel", "kv_cache_dtype": dtype, "requests": requests, "new_tokens": new_tokens,
            "context": context, "ms": ms, "tokens_per_s": requests * new_tokens / ms * 1e3, **figures, **ENVIRONMENT}


RECORDS = [
    serving("capacity", "auto", 4624, max_concurrency=85.4, kv_tokens=394_928),
    serving("capacity", "fp8", 4624, max_concurrency=170.7, kv_tokens=789_168),
    serving("capacity", "kitty2", 4624, max_concurrency=427.0, kv_tokens=1_974_448),
    serving("capacity", "auto", 32768, max_concurrency=12.1, kv_tokens=394_928),
    serving("capacity", "turboquant_4bit_nc", 32768, error="RuntimeError: turboquant_* needs FlashAttention 2"),
    serving("w1", "auto", 4624, seconds=66.4, output_tok_s=1974.0, preemptions=0, max_concurrency=85.4,
            kv_tokens=394_928),
    serving("w1", "kitty2", 4624, seconds=40.0, output_tok_s=3276.8, preemptions=3, max_concurrency=427.0,
            kv_tokens=1_974_448),
    kernel("auto-flash", 64, 8192, 0.5),
    kernel("kitty2", 64, 8192, 0.25),
    {"benchmark": "decode_kernel", "kv_cache_dtype": "auto-flash", "batch": 256, "context": 32768,
     "skipped": "needs 90.0 GiB, 70.0 GiB free", **ENVIRONMENT},
    prefill("auto-flash", 2, 4096, 0, 2.0),
    prefill("kitty2", 2, 4096, 0, 4.0, attention_ms=3.0),
    {"benchmark": "prefill_kernel", "kv_cache_dtype": "kitty2", "requests": 1, "new_tokens": 2048, "context": 4096,
     "error": "RuntimeError: boom", **ENVIRONMENT},
    {"benchmark": "step_profile", "kv_cache_dtype": "kitty2", "requests": 512, "context": 2304, "step_ms": 40.0,
     "gpu_ms": 38.0, "idle_ms": 2.0, "scheduler_ms": 1.5, "tok_s": 12800.0, "kitty_attention_ms": 24.0, "kitty_store_ms": 1.0,
     "vllm_attention_ms": 0.0, "cache_write_ms": 0.0, "gemm_ms": 10.0, "other_ms": 3.0,
     "top_kernels_ms": {"page_decode_kernel": 16.0, "nvjet_sm90_gemm": 10.0}, "roofline_ms": 25.0,
     "roofline_ratio": 1.6, **ENVIRONMENT},
    {"benchmark": "speculative", "kv_cache_dtype": "auto", "speculative": "eagle3", "seconds": 20.0,
     "output_tok_s": 1600.0, "acceptance_length": 1.0, "adjusted_tok_s": {"2": 3200.0, "3": 4800.0}, **ENVIRONMENT},
    {"benchmark": "speculative", "kv_cache_dtype": "kitty2", "speculative": "eagle3", "seconds": 16.0,
     "output_tok_s": 2000.0, "acceptance_length": 1.0, "adjusted_tok_s": {"2": 4000.0, "3": 6000.0}, **ENVIRONMENT},
    {"benchmark": "speculative", "kv_cache_dtype": "kitty2", "speculative": "none", "seconds": 12.0,
     "output_tok_s": 2500.0, "acceptance_length": 1.0, "adjusted_tok_s": {"2": 2500.0, "3": 2500.0}, **ENVIRONMENT},
    {"benchmark": "latency", "kv_cache_dtype": "auto", "context": 8192, "ttft_ms": 500.0, "tpot_ms": 8.0,
     **ENVIRONMENT},
    {"benchmark": "latency", "kv_cache_dtype": "kitty2", "context": 8192, "ttft_ms": 550.0, "tpot_ms": 7.0,
     **ENVIRONMENT},
    {"benchmark": "model_capacity", "model": "Gemma-3-12B", "kv_cache_dtype": "auto", "max_model_len": 32768,
     "max_concurrency": 1.6, "computed_max_concurrency": 1.64, "pool_page_bytes": 1048576, **ENVIRONMENT},
    {"benchmark": "model_capacity", "model": "Gemma-3-12B", "kv_cache_dtype": "kitty2", "max_model_len": 32768,
     "max_concurrency": 2.4, "computed_max_concurrency": 2.46, "pool_page_bytes": 262144, **ENVIRONMENT},
]


@pytest.mark.parametrize("script", ["serving.py", "speculative.py", "latency.py", "decode_kernel.py",
                                    "prefill_kernel.py", "step_profile.py", "plot.py", "model_capacity.py"])
def test_help(script):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_serving_arguments():
    import serving

    defaults = serving.parse_args([])
    assert defaults.benchmarks == ["capacity", "w1", "w2"]
    assert defaults.kv_cache_dtypes == list(serving.DTYPES)
    assert defaults.max_model_lens == [4624, 32768]
    args = serving.parse_args(["--benchmarks", "w2", "--kv-cache-dtypes", "kitty2", "--quick", "--out", "/tmp/x"])
    assert (args.benchmarks, args.kv_cache_dtypes, args.quick, args.out) == (["w2"], ["kitty2"], True, Path("/tmp/x"))
    with pytest.raises(SystemExit):
        serving.parse_args(["--benchmarks", "w3"])
    # One engine per dtype serves every workload: each must fit in its max_model_len.
    for workload in (*serving.WORKLOADS.values(), *serving.QUICK_WORKLOADS.values()):
        assert workload.prompt_tokens + workload.output_tokens <= serving.ENGINE_MAX_MODEL_LEN


def test_speculative_arguments_and_summary():
    import serving
    import speculative

    defaults = speculative.parse_args([])
    assert (defaults.kv_cache_dtypes, defaults.methods) == (["auto", "kitty2"], ["eagle3", "none"])
    with pytest.raises(SystemExit):
        speculative.parse_args(["--methods", "medusa"])
    for workload in (speculative.WORKLOAD, speculative.QUICK_WORKLOAD):
        assert workload.prompt_tokens + workload.output_tokens <= serving.ENGINE_MAX_MODEL_LEN
    # The head drafts for the target: same hidden size and vocabulary.
    for key in ("hidden_size", "vocab_size"):
        assert speculative.EAGLE3_HEAD[key] == serving.QWEN3_8B_SHAPE[key]
    record = {"kv_cache_dtype": "kitty2", "speculative": "eagle3", "seconds": 10.0, "output_tok_s": 1000.0,
              "acceptance_length": 1.25, "verification_steps": 400, "accepted_tokens": 100, "draft_tokens": 1200,
              "adjusted_tok_s": {"2": 1600.0, "3": 2400.0}, "max_concurrency": 40.0}
    assert speculative.summary(record) == (
        "kitty2 + eagle3: 10.0 s, 1,000 output tok/s, acceptance length 1.250, 400 steps, 100 of 1,200 drafts "
        "accepted; adjusted tok/s L=2: 1,600, L=3: 2,400; max concurrency 40.0x")


def test_step_profile_arguments_and_categories():
    import step_profile

    names = {"page_decode_kernel": "kitty_attention", "_merge_splits_kernel": "kitty_attention",
             "_store_decode_kernel": "kitty_store", "flash_fwd_splitkv_kernel": "vllm_attention",
             "reshape_and_cache_flash_kernel": "cache_write", "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT": "gemm",
             "_gumbel_sample_kernel": "other"}
    assert {name: step_profile.category(name) for name in names} == names
    assert step_profile.parse_args(["--runs", "kitty2:64", "fp8:8x256"]).runs == [("kitty2", 64, None),
                                                                                  ("fp8", 8, 256)]
    for bad in ("kitty2", "kitty2:0", ":8", "auto:8x", "auto:8x0", "auto:x256", "auto:8x2x2"):
        with pytest.raises(SystemExit):
            step_profile.parse_args(["--runs", bad])


def test_step_profile_steps_a_decode_batch():
    """profile_run prefills every request, then times and profiles decode-only steps, and finishes the
    requests. Without CUDA no kernel is recorded: the whole step is host time."""
    import step_profile
    from engine import vllm_engine
    from tiny_model import build_tiny_model

    with vllm_engine(build_tiny_model(), kv_cache_dtype="kitty2", max_model_len=1024) as llm:
        record = step_profile.profile_run(llm, requests=4, context=200, steps=3)
        assert not llm.llm_engine.has_unfinished_requests()
    assert (record["requests"], record["context"], record["steps"]) == (4, 200, 3)
    assert record["prefill_steps"] == 2      # 800 prompt tokens in steps of 512
    assert record["step_ms"] > 0 and record["gpu_ms"] == 0 and record["idle_ms"] == record["step_ms"]
    assert 0 < record["scheduler_ms"] < record["step_ms"]
    assert record["tok_s"] == pytest.approx(4e3 / record["step_ms"])
    assert record["top_kernels_ms"] == {}


def test_step_roofline_bytes():
    """A decode step's roofline reads the weights but the embedding, and each layer's KV cache of every request:
    kitty's packed pages, sinks and ring, or bf16 Keys and Values (fp8: half of them)."""
    import decode_kernel
    import step_profile
    import torch

    from kitty_vllm.config import load_config

    model = torch.nn.ModuleDict({"embed_tokens": torch.nn.Embedding(100, 8), "proj": torch.nn.Linear(8, 8, bias=False)})
    assert step_profile.weight_bytes_read(model) == 8 * 8 * 4
    bf16 = decode_kernel.bytes_read("flash", None, 2, 1025)
    queries = 2 * decode_kernel.NUM_HEADS * decode_kernel.HEAD_DIM * 2
    assert bf16 - queries == 2 * 1024 * decode_kernel.NUM_KV_HEADS * decode_kernel.HEAD_DIM * 2 * 2
    assert decode_kernel.bytes_read("flash", None, 2, 1025, 1) - queries == (bf16 - queries) // 2
    kitty = decode_kernel.bytes_read("kitty", load_config("kitty2"), 2, 1025) - queries
    assert (bf16 - queries) / 7 < kitty < (bf16 - queries) / 4     # about 2.5 bits per element, and the sinks


def _two_records_then_error(first: int):
    yield {"i": first}
    yield {"i": first + 1}
    raise RuntimeError("boom")


def test_run_in_process_saves_records_and_reports_errors():
    """Each engine runs in a spawned process: every record it yields is saved as it comes, and an exception
    comes back as the error of that dtype's remaining records."""
    import serving

    saved = []
    records, error = serving.run_in_process(_two_records_then_error, (5,), saved.append)
    assert records == saved == [{"i": 5}, {"i": 6}]
    assert error == "RuntimeError: boom"


def test_model_capacity_is_what_the_layer_mix_implies():
    """A Gemma-3-12B-shaped model (8 full and 40 sliding-window layers of 8 KV heads x 256) at 32k tokens:
    vLLM's maximum concurrency, with auto and with kitty2, is what kitty_vllm.tools.capacity computes
    for this platform, so docs/models.md's table is vLLM's own accounting."""
    import model_capacity
    import serving

    records = {}
    for dtype in ("auto", "kitty2"):
        (record,), error = serving.run_in_process(model_capacity.engine_process,
                                                  ("Gemma-3-12B", dtype, 32768, 8192, 6 * 2**30), lambda r: None)
        assert error is None
        records[dtype] = record
        assert record["max_concurrency"] == pytest.approx(record["computed_max_concurrency"], rel=0.01), record
    assert records["kitty2"]["max_concurrency"] > 1.3 * records["auto"]["max_concurrency"]


def test_jit_compiles_counts_the_monitors_events():
    """serving.jit_compiles lists what vLLM's JIT monitor reports inside the block, and only there."""
    import serving
    from vllm.utils import jit_monitor

    with serving.jit_compiles() as compiled:
        jit_monitor._handle_jit_event(backend="Triton", event="kernel JIT compilation", fn_name="_page_kernel")
    jit_monitor._handle_jit_event(backend="Triton", event="kernel JIT compilation", fn_name="later")
    assert compiled == ["Triton: _page_kernel"]


def test_latency_measures_one_request():
    """measure times one request alone for 1 token and for 1 + output tokens: the time to first token and
    the time per output token."""
    import latency
    from engine import vllm_engine
    from tiny_model import build_tiny_model

    assert latency.parse_args([]).contexts == [1024, 2048, 4096, 8192, 16384, 32768]
    with vllm_engine(build_tiny_model(), kv_cache_dtype="kitty2", max_model_len=1024) as llm:
        record = latency.measure(llm, context=300, output_tokens=4, repeats=1)
        assert not llm.llm_engine.has_unfinished_requests()
    assert record["ttft_ms"] > 0 and record["request_ms"] > 0
    assert record["jit_compiles"] == []     # eager engine: vLLM's JIT monitor is not active
    assert record["tpot_ms"] == pytest.approx((record["request_ms"] - record["ttft_ms"]) / 4)


def test_prefill_arguments():
    import prefill_kernel

    defaults = prefill_kernel.parse_args([])
    assert defaults.kernels == ["kitty", "flash"]
    assert [str(cell) for cell in defaults.cells] == ["2x4096@0", "1x2048@4096", "16x512@0", "1x8192@0"]
    args = prefill_kernel.parse_args(["--cells", "3x100@50", "--kernels", "kitty"])
    assert (args.cells, args.kernels) == ([prefill_kernel.Cell(requests=3, new_tokens=100, context=50)], ["kitty"])
    for bad in ("3x100", "0x100@0", "2x0@0", "2x-1@0"):
        with pytest.raises(SystemExit):
            prefill_kernel.parse_args(["--cells", bad])


def test_result_path():
    path = report.result_path("out", "NVIDIA H100 80GB HBM3", "2026-01-02")
    assert path == Path("out/nvidia-h100-80gb-hbm3-2026-01-02.json")
    assert report.result_path("out", "NVIDIA H100", "2026-01-02", quick=True).name == "nvidia-h100-2026-01-02-quick.json"


def test_write_merges_by_measurement(tmp_path):
    path = tmp_path / "results.json"
    report.write_records(path, RECORDS[:3])
    rerun = serving("capacity", "fp8", 4624, max_concurrency=171.0, kv_tokens=790_000)
    merged = report.write_records(path, [rerun, RECORDS[3]])
    assert merged == report.load_records(path) == [RECORDS[0], rerun, RECORDS[2], RECORDS[3]]
    kernels = report.write_records(path, [kernel("kitty2", 1, 1024, 0.1), kernel("kitty2", 1, 8192, 0.2)])
    assert len(kernels) == 6
    assert not list(tmp_path.glob("*.partial"))


def test_prefill_cells_merge_apart(tmp_path):
    """Cells of one kernel at the same context and with as many tokens are distinct measurements."""
    path = tmp_path / "results.json"
    cells = [prefill("kitty2", 2, 4096, 0, 4.0), prefill("kitty2", 1, 8192, 0, 5.0),
             prefill("kitty2", 8, 1024, 0, 3.0)]
    assert report.write_records(path, cells) == cells
    rerun = prefill("kitty2", 1, 8192, 0, 4.5)
    assert report.write_records(path, [rerun]) == [cells[0], rerun, cells[2]]


def test_load_refuses_other_json(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"benchmark": "w1"}))
    with pytest.raises(ValueError, match="not a list of benchmark records"):
        report.load_records(path)


def table_row(table: str, *cells: str) -> list[str]:
    """The cells of the table row that starts with ``cells``."""
    prefix = "| " + " | ".join(cells) + " |"
    rows = [line for line in table.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, table)
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_tables():
    tables = report.markdown_tables(RECORDS)
    assert tables.startswith("Test GPU, vLLM 0.26.0, 2026-01-02")
    kitty_capacity = table_row(tables, "capacity", "4,624", "kitty2")
    assert kitty_capacity[8:10] == [f"{427.0 / 85.4:.2f}x", f"{427.0 / 170.7:.2f}x"]
    assert table_row(tables, "w1", "4,624", "kitty2")[8] == f"{3276.8 / 1974.0:.2f}x"
    assert table_row(tables, "capacity", "32,768", "turboquant_4bit_nc")[-1].startswith("RuntimeError: turboquant")
    assert table_row(tables, "64", "8,192", "kitty2")[-2] == "2.00x"
    assert "needs 90.0 GiB" in table_row(tables, "256", "32,768", "auto-flash")[-1]
    kitty_prefill = table_row(tables, "2", "4,096", "0", "kitty2")
    assert kitty_prefill[4:9] == ["4.000", "3.000", "75.0", f"{8192 / 4e-3:,.0f}", "0.50x"]
    assert table_row(tables, "2", "4,096", "0", "auto-flash")[5:7] == ["", ""]
    assert table_row(tables, "1", "2,048", "4,096", "kitty2")[-1] == "RuntimeError: boom"
    assert table_row(tables, "kitty2", "512", "2,304", "40.00")[4:15] == [
        "12,800", "24.00", "1.00", "0.00", "0.00", "10.00", "3.00", "2.00", "1.50", "25.00", "1.60"]
    assert table_row(tables, "kitty2", "512", "2,304", "page_decode_kernel")[4:] == ["16.00", "40.0"]
    # Speculation: adjusted tok/s against auto with the same draft, and against the dtype without one.
    assert table_row(tables, "kitty2", "eagle3")[5:11] == ["4,000", "1.25x", "1.60x", "6,000", "1.25x", "2.40x"]
    assert table_row(tables, "auto", "eagle3")[5:8] == ["3,200", "1.00x", ""]
    assert table_row(tables, "8,192", "kitty2")[2:5] == ["550.0", "7.00", "0.88x"]
    # Model shapes: vLLM's maximum concurrency and the computed one, each against auto's.
    assert table_row(tables, "Gemma-3-12B", "kitty2")[3:7] == ["2.40", "2.46", "1.50x", "1.50x"]


def test_plot_script(tmp_path):
    path = tmp_path / "test-gpu-2026-01-02.json"
    report.write_records(path, RECORDS)
    result = subprocess.run([sys.executable, str(BENCHMARKS / "plot.py"), str(path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| capacity | 4,624 | kitty2 |" in result.stdout
    markdown = (tmp_path / "test-gpu-2026-01-02.md").read_text()
    assert "| capacity | 4,624 | kitty2 |" in markdown
    assert "| 2 | 4,096 | 0 | kitty2 |" in markdown
    for name in ("capacity", "throughput", "decode_kernel"):
        png = tmp_path / f"test-gpu-2026-01-02-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("preset, head_dim, gluon", [("kitty2", 128, False), ("kitty2", 128, True),
                                                     ("kivi2", 64, True)])
def test_kernel_sass_decode_page_loop_on_an_h100(preset, head_dim, gluon):
    """The decode kernel (Triton, or the Gluon page kernel that GPUs run, which nothing else compiles on
    a CPU) compiled for an H100 (sm_90) on this CPU, for the benchmarks' Qwen3-8B shape: its page loop
    multiplies the packed codes on bfloat16 tensor cores and keeps every value in registers (a spill there
    would put local-memory traffic in every page). kernel_sass compiles for the GPU, so it runs without
    the interpreter that conftest turns on here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import kernel_sass as K; r = K.analyze({preset!r}, {head_dim}, 32, 8, gluon={gluon}); "
            "page, tiles = K.page_loops(r['loops']); "
            "print(page.bf16_tensor_ops(), sum(loop.mix()['spill'] for loop in [page, *tiles]), "
            "r['page_loop_per_token'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=BENCHMARKS, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    tensor_ops, spills, per_token = result.stdout.split()
    assert int(tensor_ops) > 0 and int(spills) == 0 and float(per_token) > 0
