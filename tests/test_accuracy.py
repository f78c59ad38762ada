"""The accuracy evaluation (kitty_vllm.tools.eval), reduced to what two CPU cores can run: (1) why its
perplexity may come from prompt log-probabilities, (2) a small GSM8K run on SmolLM2, (3) its parts.
The perplexity part of the CPU version is tests/test_smollm2_perplexity.py.

1. Why perplexity may be scored with prompt log-probabilities. With ``exact_prefill``
   (kitty_vllm.config), the eval's setting for perplexity, kitty's cache schedule
   (kitty_vllm.reference) gives the query at position p every token older than its window, dequantized,
   in prefill as in decode. So the log-probabilities of one long prefill equal those that decoding the
   same tokens one step at a time gives. Checked on the tiny model through vLLM: greedy decoding
   returns each new token's log-probability from a decode step; one prefill of prompt + those tokens
   must score them the same. The decode crosses page boundaries, so later steps read packed pages
   (on a GPU through the paged-decode kernel, while prefill reads them through the prefill kernel).
   Without exact_prefill (the presets) a prefill's tokens read each other in full precision, and its
   prompt log-probabilities would flatter the cache.
"""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from engine import prompt_inputs, torch_threads, vllm_engine
from kitty_vllm.tools import gsm8k
from kitty_vllm.tools.assets import token_windows
from tiny_model import build_tiny_model

KITTY_DTYPES = ("kitty2", "kitty2-lite", "kivi2")
PAGE = 128
# The prompt ends inside the first page; decoding fills pages 0, 1 and 2 (at positions 127, 255 and
# 383), so the 272 decode steps after position 127 read one to three packed pages.
PROMPT_TOKENS, NEW_TOKENS = 40, 360
# vLLM's float32 decode and prefill steps differ only in summation order (one query row against a
# batch of 400): measured on the CPU, at most 3e-6 in log-probability with the plain cache and kivi2.
# Now and then that flips an fp16 scale or a code at a rounding boundary, which moves later
# log-probabilities by up to 7e-5 (kitty2) and 2e-4 (kitty2-lite). Quantization itself moves them
# by 0.8 to 1.1 on average (test_the_comparison_sees_quantization).
LOGPROB_ATOL = 1e-3


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_model()


def decode_then_prefill(llm, prompt: list[int]) -> tuple[list[int], list[float], list[float]]:
    """Greedy tokens after ``prompt``, their log-probabilities from the decode steps, and the same
    tokens' log-probabilities from one prefill of prompt + tokens."""
    from vllm import SamplingParams

    decode = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    [out] = llm.generate(prompt_inputs([prompt]), decode, use_tqdm=False)
    tokens = list(out.outputs[0].token_ids)
    decoded = [step[token].logprob for step, token in zip(out.outputs[0].logprobs, tokens, strict=True)]
    return tokens, decoded, prefill_logprobs(llm, prompt, tokens)


def prefill_logprobs(llm, prompt: list[int], tokens: list[int]) -> list[float]:
    """Log-probabilities of ``tokens`` from one prefill of prompt + tokens (prompt log-probs)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    [out] = llm.generate(prompt_inputs([prompt + tokens]), params, use_tqdm=False)
    return [pos[token].logprob for pos, token in zip(out.prompt_logprobs[len(prompt):], tokens, strict=True)]


@pytest.fixture(scope="module")
def tiny_logprobs(tiny_model):
    """``(dtype, "decode" | "prefill")``: log-probabilities (float64 [NEW_TOKENS]) of the greedy
    tokens ``dtype`` decodes, from its decode steps or from one prefill; ``(dtype, "plain")``: the same
    tokens scored by one prefill with the plain cache (``auto``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    prompt = [tokenizer.bos_token_id] + token_windows(tokenizer, 1, PROMPT_TOKENS - 1)[0]
    results, sequences = {}, {}
    with torch_threads(1):
        for kv_cache_dtype in (*KITTY_DTYPES, "auto"):
            # No prefix caching: the prefill must compute every position, not reuse the decode's pages.
            with vllm_engine(tiny_model, exact_prefill=True, dtype="float32", kv_cache_dtype=kv_cache_dtype,
                             max_model_len=PROMPT_TOKENS + NEW_TOKENS + 1, enable_prefix_caching=False,
                             max_num_batched_tokens=PROMPT_TOKENS + NEW_TOKENS) as llm:
                tokens, decoded, prefilled = decode_then_prefill(llm, prompt)
                sequences[kv_cache_dtype] = tokens
                results[kv_cache_dtype, "decode"], results[kv_cache_dtype, "prefill"] = decoded, prefilled
                if kv_cache_dtype == "auto":
                    for other in KITTY_DTYPES:
                        results[other, "plain"] = prefill_logprobs(llm, prompt, sequences[other])
    return {key: torch.tensor(value, dtype=torch.float64) for key, value in results.items()}


@pytest.mark.parametrize("kv_cache_dtype", ["auto", *KITTY_DTYPES])
def test_prompt_logprobs_of_one_prefill_equal_decode_steps(tiny_logprobs, kv_cache_dtype):
    torch.testing.assert_close(tiny_logprobs[kv_cache_dtype, "prefill"], tiny_logprobs[kv_cache_dtype, "decode"],
                               atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize("kv_cache_dtype", KITTY_DTYPES)
def test_the_comparison_sees_quantization(tiny_logprobs, kv_cache_dtype):
    """The comparison above has teeth: the same tokens scored with the plain cache differ by far more
    than LOGPROB_ATOL once the decode has packed its first page."""
    quantized = tiny_logprobs[kv_cache_dtype, "prefill"]
    plain = tiny_logprobs[kv_cache_dtype, "plain"]
    past_first_page = slice(PAGE - PROMPT_TOKENS, None)
    assert float((quantized - plain)[past_first_page].abs().mean()) > 100 * LOGPROB_ATOL


# 2. GSM8K, 8-shot chain of thought, on SmolLM2-135M-Instruct: GSM8K_PROBLEMS problems through vLLM
# with auto and kitty2 (the eval's own prompt, generation and scoring). A 135M model solves few of
# them (SmolLM2-135M-Instruct reports 1.4% on GSM8K), so the run checks what it can: with the 8-shot
# prompt (about 800 tokens, so every answer reads six or seven packed pages) in a kitty2 cache, the
# model still answers in the exemplars' form, as it does without quantization. 12 problems keep
# the module near 5 minutes on two cores.

GSM8K_PROBLEMS = 12
MIN_STATED_ANSWERS = 0.6


@pytest.fixture(scope="module")
def gsm8k_runs():
    """``dtype -> (Score, completions)`` for the first GSM8K_PROBLEMS test problems."""
    from kitty_vllm.tools import assets
    from kitty_vllm.tools.eval import score_gsm8k

    problems = assets.gsm8k_test()[:GSM8K_PROBLEMS]
    runs, lines = {}, []
    with torch_threads(1):
        for kv_cache_dtype in ("auto", "kitty2"):
            start = time.perf_counter()
            with vllm_engine(assets.smollm2_path(), dtype="float32", kv_cache_dtype=kv_cache_dtype,
                             max_model_len=1536, max_num_seqs=GSM8K_PROBLEMS, max_num_batched_tokens=1024,
                             kv_cache_memory_bytes=1 << 29) as llm:
                runs[kv_cache_dtype] = score_gsm8k(llm, problems, use_tqdm=False)
            score = runs[kv_cache_dtype][0]
            lines.append(f"{kv_cache_dtype:<8} {score.score:6.1%} ± {score.ci95:5.1%} "
                         f"{time.perf_counter() - start:7.1f} s")
    print(f"\nSmolLM2-135M-Instruct, GSM8K 8-shot, first {GSM8K_PROBLEMS} problems, float32")
    print("\n".join(lines))
    return runs


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "kitty2"])
def test_gsm8k_completions_follow_the_exemplars(gsm8k_runs, kv_cache_dtype):
    score, completions = gsm8k_runs[kv_cache_dtype]
    assert score.n == GSM8K_PROBLEMS and 0 <= score.score <= 1
    stated = [gsm8k.final_number(c) is not None and "The answer is" in c for c in completions]
    assert sum(stated) >= MIN_STATED_ANSWERS * GSM8K_PROBLEMS, completions


# 3. The evaluation's parts: answer checking, statistics, results file, dtype specs, needle prompts.

@pytest.mark.parametrize("completion, solution, correct", [
    (" 16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is 18.", "... #### 18", True),
    (" The answer is $1,234.00.", "#### 1,234", True),
    (" The answer is 7. Then she has 9 left.", "#### 9", False),   # the stated answer, not the last number
    (" So she has 5 + 3 = 8 dollars left.", "#### 8", True),        # no statement: the last number
    (" The answer is -3.", "#### -3", True),
    (" I do not know.", "#### 3", False),
])
def test_gsm8k_checks_the_final_number(completion, solution, correct):
    assert gsm8k.is_correct(completion, solution) is correct


def test_gsm8k_prompt_is_eight_exemplars_then_the_question():
    from kitty_vllm.tools import assets

    question = assets.gsm8k_test()[0]["question"]
    prompt = gsm8k.prompt(question)
    assert prompt.count("\nA: ") == 8 and prompt.count("The answer is") == 8
    assert prompt.startswith("Q: There are 15 trees") and prompt.endswith(f"Q: {question}\nA:")
    with pytest.raises(ValueError, match="####"):
        gsm8k.reference_answer("no marker")


def test_scores_and_their_intervals():
    from kitty_vllm.tools.eval import perplexity, proportion

    score = proportion([True, False, True, True])
    assert (score.n, score.score) == (4, 0.75)
    assert score.ci95 == pytest.approx(1.96 * (0.75 * 0.25 / 3) ** 0.5)
    ppl = perplexity([1.0, 1.2])
    assert ppl.score == pytest.approx(2.718281828 ** 1.1) and ppl.window_nlls == (1.0, 1.2)
    assert ppl.ci95 == pytest.approx(1.96 * ppl.score * 0.1)   # stdev 0.2 / sqrt(2), over sqrt(2) windows
    assert perplexity([1.0]).ci95 is None


def test_results_merge_and_print_as_a_table(tmp_path):
    from kitty_vllm.tools.eval import Record, markdown_table, merge_records

    path = tmp_path / "results" / "accuracy.json"
    merge_records(path, [Record("m", "gsm8k", "auto", 10, 0.5, 0.3), Record("m", "perplexity-8k", "auto", 2, 20.0, 1.0)])
    records = merge_records(path, [Record("m", "perplexity-8k", "kitty2:boost-random", 2, 22.0, None),
                                   Record("m", "perplexity-8k", "kitty2", 2, 21.0, None),
                                   Record("m", "gsm8k", "auto", 10, 0.6, 0.3)])
    assert records == json.loads(path.read_text())
    assert sorted((r["task"], r["kv_cache_dtype"], r["score"]) for r in records) == [
        ("gsm8k", "auto", 0.6), ("perplexity-8k", "auto", 20.0), ("perplexity-8k", "kitty2", 21.0),
        ("perplexity-8k", "kitty2:boost-random", 22.0)]
    table = markdown_table(records)
    # auto first (though it came second), the presets before the ablations
    assert table.startswith("| model | task | n | auto | kitty2 | kitty2:boost-random |")
    assert "| m | perplexity-8k | 2 | 20.000 ± 1.000 | 21.000 (+5.0%) | 22.000 (+10.0%) |" in table
    assert "| m | gsm8k | 10 | 60.0 ± 30.0 |  |  |" in table


def test_cache_specs_and_ablation_files():
    from kitty_vllm.config import KittyConfig, KittyConfigError
    from kitty_vllm.tools.eval import ABLATIONS, CacheSpec

    assert CacheSpec.parse("fp8") == CacheSpec("fp8") and CacheSpec.parse("fp8").label == "fp8"
    kitty2 = KittyConfig.from_preset("kitty2")
    changed = {}
    for text in ABLATIONS:
        spec = CacheSpec.parse(text)
        assert spec.label == text and spec.kv_cache_dtype == "kitty2"
        config = KittyConfig.from_yaml(spec.config_file)
        changed[spec.config_file.stem] = {k: v for k, v in vars(config).items() if vars(kitty2)[k] != v}
    assert changed == {"boost-variance": {"boost_policy": "variance"}, "boost-range": {"boost_policy": "range"},
                       "boost-random": {"boost_policy": "random"}, "boost-ratio-50": {"boost_ratio": 0.5}}
    rotation = CacheSpec.parse("kitty2:value-rotation")   # issue 30's finalist, for the GPU study
    assert rotation.label == "kitty2:value-rotation"
    assert rotation.kitty_config() == kitty2.replace(value_rotation="hadamard")
    with pytest.raises(ValueError, match="kitty dtypes only"):
        CacheSpec.parse("fp8:boost-random")
    with pytest.raises(KittyConfigError, match="cannot read"):
        CacheSpec.parse("kitty2:no-such-ablation")
    with pytest.raises(ValueError, match="whole kitty2 configs.*kitty2-lite:FILE.yaml"):
        CacheSpec.parse("kitty2-lite:boost-range")   # would silently run kitty2's 25% boost


def test_kitty_perplexity_runs_with_exact_prefill(tmp_path, monkeypatch):
    """Perplexity is decode-time: a kitty dtype scores it in an engine of its own, under its label, with
    KITTY_CONFIG a copy of its config with exact_prefill on; its other tasks, vLLM's dtypes and configs
    that are exact already run as they are, in one engine."""
    from kitty_vllm.config import KittyConfig, load_config
    from kitty_vllm.tools.eval import TASKS, CacheSpec, engine_runs, kitty_config_env

    monkeypatch.delenv("KITTY_CONFIG", raising=False)
    ablation = CacheSpec.parse("kitty2:boost-random")
    (first, rest), (second, ppl) = engine_runs(ablation, TASKS)
    assert (first, rest, ppl) == (ablation, ("gsm8k", "needle"), ("perplexity",))
    assert second.exact_prefill and second.label == ablation.label == "kitty2:boost-random"
    with kitty_config_env(second):
        assert load_config("kitty2") == KittyConfig.from_yaml(ablation.config_file).replace(exact_prefill=True)
    with kitty_config_env(ablation):
        assert load_config("kitty2") == KittyConfig.from_yaml(ablation.config_file)
    assert "KITTY_CONFIG" not in os.environ
    kitty2 = CacheSpec.parse("kitty2")
    assert engine_runs(kitty2, ("perplexity",)) == [(CacheSpec("kitty2", exact_prefill=True), ("perplexity",))]
    assert engine_runs(kitty2, ("gsm8k",)) == [(kitty2, ("gsm8k",))]
    assert engine_runs(CacheSpec.parse("fp8"), TASKS) == [(CacheSpec("fp8"), TASKS)]
    exact_file = tmp_path / "exact.yaml"
    exact_file.write_text("exact_prefill: true\n")
    exact = CacheSpec.parse(f"kivi2:{exact_file}")
    assert engine_runs(exact, TASKS) == [(exact, TASKS)]


def test_skip_specs_label_their_rows_and_reach_vllm():
    """``DTYPE:skip=LAYERS`` is its own row (a label apart from plain DTYPE, the same whatever the order
    of LAYERS) and becomes vLLM's kv_cache_dtype_skip_layers, which vLLM matches by ``str(index)``."""
    from vllm.engine.arg_utils import EngineArgs

    from kitty_vllm.tools.eval import CacheSpec

    fp8 = CacheSpec.parse("fp8:skip=0")
    assert fp8 == CacheSpec("fp8", skip_layers=(0,)) and fp8.label == "fp8 (layer 0 unquantized)"
    int4 = CacheSpec.parse("int4_per_token_head:skip=1,0")
    assert int4 == CacheSpec.parse("int4_per_token_head:skip=0,1")
    assert int4.label == "int4_per_token_head (layers 0,1 unquantized)"
    assert CacheSpec.parse("fp8").llm_kwargs() == {"kv_cache_dtype": "fp8"}
    kwargs = int4.llm_kwargs()
    assert kwargs == {"kv_cache_dtype": "int4_per_token_head", "kv_cache_dtype_skip_layers": ["0", "1"]}
    assert EngineArgs(model="m", **kwargs).kv_cache_dtype_skip_layers == ["0", "1"]


def test_kitty_skip_specs_keep_their_layers_through_the_perplexity_engine(monkeypatch):
    """``kitty2:skip=0,1``: kitty2's preset with layers 0 and 1 in the model's dtype (kitty honours
    vLLM's kv_cache_dtype_skip_layers), in the exact_prefill engine of perplexity too."""
    from kitty_vllm.config import KittyConfig
    from kitty_vllm.tools.eval import CacheSpec, engine_runs, parse_args

    monkeypatch.delenv("KITTY_CONFIG", raising=False)
    spec = CacheSpec.parse("kitty2:skip=1,0")
    assert spec == CacheSpec("kitty2", skip_layers=(0, 1)) and spec.label == "kitty2 (layers 0,1 unquantized)"
    assert CacheSpec.parse("kitty2-lite:skip=0").label == "kitty2-lite (layer 0 unquantized)"
    assert spec.kitty_config() == KittyConfig.from_preset("kitty2")
    [(exact, tasks)] = engine_runs(spec, ("perplexity",))
    assert exact.exact_prefill and exact.label == spec.label and tasks == ("perplexity",)
    assert exact.llm_kwargs() == {"kv_cache_dtype": "kitty2", "kv_cache_dtype_skip_layers": ["0", "1"]}
    assert parse_args(["--model", "smollm2", "--kv-cache-dtypes", "kitty2:skip=0"]).specs == [
        CacheSpec("kitty2", skip_layers=(0,))]


@pytest.mark.parametrize("text, message", [
    ("auto:skip=0", "unquantized already"),
    ("kitty2:skip=a", "comma-separated layer indices"),
    ("fp8:skip=", "comma-separated layer indices"),
    ("fp8:skip=0-1", "comma-separated layer indices"),
])
def test_skip_specs_refuse_what_vllm_cannot_run(text, message):
    from kitty_vllm.tools.eval import CacheSpec

    with pytest.raises(ValueError, match=message):
        CacheSpec.parse(text)


def test_skip_specs_name_layers_the_model_has(monkeypatch):
    """An index past the last layer would match none, and the row would be plain DTYPE under another name."""
    from kitty_vllm.tools.eval import evaluate, parse_args

    monkeypatch.delenv("KITTY_CONFIG", raising=False)
    with pytest.raises(SystemExit, match="smollm2 has layers 0 to 29"):
        evaluate(parse_args(["--model", "smollm2", "--kv-cache-dtypes", "fp8:skip=0,30"]))


def test_needle_prompts_fill_the_context_and_hold_the_pass_key():
    from transformers import AutoTokenizer

    from kitty_vllm.tools import assets, needle

    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_path())
    trials = needle.build_trials(tokenizer, (1024, 4096))
    assert [(t.context_length, t.depth) for t in trials] == [(n, d) for n in (1024, 4096) for d in needle.DEPTHS]
    assert len({t.pass_key for t in trials}) == len(trials)
    for trial in trials:
        budget = trial.context_length - needle.MAX_NEW_TOKENS
        assert budget - 32 <= len(trial.prompt_token_ids) <= budget
        text = tokenizer.decode(trial.prompt_token_ids)
        where = text.index(needle.needle_sentence(trial.pass_key)) / text.index(needle.QUESTION)
        assert abs(where - trial.depth) < 0.05, (trial.depth, where)
        assert trial.is_correct(f" {trial.pass_key}.") and not trial.is_correct(" 1234567")


@pytest.mark.parametrize("argv, message", [
    (["--kv-cache-dtypes", "fp8:boost-random"], "kitty dtypes only"),
    (["--reference", "--tasks", "perplexity", "--kv-cache-dtypes", "kitty2:skip=0"], "quantizes every layer"),
    (["--reference"], "perplexity only"),
    (["--reference", "--tasks", "perplexity", "--dtype", "bfloat16"], "float32"),
    (["--tasks", "needle", "--ablations"], "add gsm8k"),
    (["--no-prefix-caching"], "with --json"),
])
def test_command_line_refuses_what_it_cannot_run(monkeypatch, capsys, argv, message):
    from kitty_vllm.tools.eval import parse_args

    monkeypatch.delenv("KITTY_CONFIG", raising=False)
    with pytest.raises(SystemExit):
        parse_args(["--model", "smollm2", *argv])
    assert message in capsys.readouterr().err


def test_command_line_refuses_an_inherited_kitty_config(monkeypatch, capsys):
    """KITTY_CONFIG would change every kitty dtype of the run without its records saying so."""
    from kitty_vllm.tools.eval import parse_args

    monkeypatch.setenv("KITTY_CONFIG", "kitty_vllm/tools/ablations/boost-random.yaml")
    with pytest.raises(SystemExit):
        parse_args(["--model", "smollm2"])
    assert "pass DTYPE:FILE.yaml instead" in capsys.readouterr().err


def test_study_pairs_windows_with_auto_and_counts_skipped_layers_in_bf16():
    """kitty_vllm.tools.study: per-window differences against auto, a bootstrap interval that holds
    their mean, and a skipped layer at 16 bits that costs capacity."""
    from kitty_vllm.tools.eval import CacheSpec, Record
    from kitty_vllm.tools.study import study

    records = [vars(Record("m", "perplexity-2k", "auto", 3, 10.0, None, (2.0, 2.5, 3.0))),
               vars(Record("m", "perplexity-2k", "kitty2", 3, 11.0, None, (2.1, 2.5, 3.2))),
               vars(Record("m", "perplexity-2k", "kitty2 (layer 0 unquantized)", 3, 10.5, None, (2.0, 2.6, 3.0)))]
    specs = [CacheSpec.parse(text) for text in ("auto", "kitty2", "kitty2:skip=0")]
    auto, kitty2, skip = study(records, specs, (4624,), resamples=200)["rows"]
    assert auto["perplexity_change"] == 0 and auto["perplexity_change_ci95"] == [0, 0]
    assert kitty2["window_nll_differences"] == pytest.approx([0.1, 0.0, 0.2])
    low, high = kitty2["perplexity_change_ci95"]
    assert kitty2["perplexity_change"] == pytest.approx(math.expm1(0.1))
    assert 0 <= low <= kitty2["perplexity_change"] <= high <= math.expm1(max(kitty2["window_nll_differences"]))
    assert kitty2["windows_worse"] == 2 and "against" not in kitty2
    assert skip["against"]["kv_cache_dtype"] == "kitty2"
    assert skip["against"]["window_nll_differences"] == pytest.approx([-0.1, 0.1, -0.2])
    for model, figures in kitty2["models"].items():
        with_skip = skip["models"][model]
        assert figures["bits_per_element"] < with_skip["bits_per_element"] < 16
        assert 1 < with_skip["capacity_vs_auto"]["4624"] < figures["capacity_vs_auto"]["4624"]
    with pytest.raises(ValueError, match="window_nlls"):
        study(records[:2], [CacheSpec.parse("kitty2:skip=0,1")], (4624,))


def test_study_pairs_gsm8k_and_needle_problems_with_auto():
    """GSM8K and the needle as paired differences on the same problems: points against auto and the plain
    dtype, problems gained and lost, a bootstrap interval around the difference; the eval records each
    problem's hit for it."""
    from kitty_vllm.tools.eval import CacheSpec, Record, proportion
    from kitty_vllm.tools.study import markdown_table, study

    assert proportion([True, False, True]).hits == "101"
    ppl = [vars(Record("m", "perplexity-2k", label, 2, 10.0, None, (2.0, 2.5)))
           for label in ("auto", "kitty2", "kitty2 (layer 0 unquantized)")]
    auto_hits, kitty_hits, skip_hits = "1100110011" * 20, "1000110111" * 20, "1100110111" * 20
    labelled = (("auto", auto_hits), ("kitty2", kitty_hits), ("kitty2 (layer 0 unquantized)", skip_hits))
    gsm8k = [vars(Record("m", "gsm8k", label, 200, hits.count("1") / 200, None, None, hits)) for label, hits in labelled]
    needle = [vars(Record("m", "needle-4k", "auto", 5, 1.0, None, None, "11111")),
              vars(Record("m", "needle-4k", "kitty2", 5, 0.8, None, None, "11011"))]
    specs = [CacheSpec.parse(text) for text in ("auto", "kitty2", "kitty2:skip=0")]
    result = study(ppl + gsm8k + needle, specs, (4624,), resamples=2000)
    auto, kitty2, skip = result["accuracy"]["gsm8k"]
    assert auto["difference_points"] == 0 and auto["difference_ci95_points"] == [0, 0]
    assert (kitty2["gained"], kitty2["lost"]) == (20, 20) and kitty2["difference_points"] == 0
    low, high = kitty2["difference_ci95_points"]
    assert -10 < low < 0 < high < 10
    assert (skip["gained"], skip["lost"], skip["difference_points"]) == (20, 0, 10.0)
    assert skip["against"]["kv_cache_dtype"] == "kitty2" and skip["against"]["difference_points"] == 10.0
    assert 0 < skip["difference_ci95_points"][0] <= 10.0 <= skip["difference_ci95_points"][1]
    assert [r["kv_cache_dtype"] for r in result["accuracy"]["needle-4k"]] == ["auto", "kitty2"]
    assert result["accuracy"]["needle-4k"][1]["lost"] == 1
    assert "| gsm8k | kitty2 (layer 0 unquantized) | 70.0% (200) | +10.0 [" in markdown_table(result)
    with pytest.raises(ValueError, match="not the same problems"):
        study(ppl + gsm8k[:1] + [{**gsm8k[1], "hits": "1"}], specs[:2], (4624,))


def test_docs_lever_tables_are_the_study_json():
    """docs/accuracy.md shows the first-layers lever's tables as kitty_vllm.tools.study prints its JSON."""
    from pathlib import Path

    from kitty_vllm.tools.study import markdown_table

    root = Path(__file__).parents[1]
    result = json.loads((root / "benchmarks/results/lever-first-layers-2026-12-07/study.json").read_text())
    assert markdown_table(result) in (root / "docs" / "accuracy.md").read_text()
