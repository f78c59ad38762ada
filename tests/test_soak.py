"""The soak of kitty_vllm.tools.soak at CI size: 200 requests against ``vllm serve --kv-cache-dtype kitty2`` on
the tiny model (float32), 16 clients, outputs of 1..32 tokens, prompts up to 480 tokens, a KV pool of
eight 512-token requests and a burst of 256-token outputs that preempts.

Every check of the runner must pass: no 5xx and no failed request, the server still up, preemptions
from the burst on, prefix-cache lookups that miss (exact_prefill turns hits off), streams cut midway,
every completed output equal to its prompt run alone (in float32 no near-tie is expected; the runner
serves kitty2 with exact_prefill, so prefill steps and preemption do not change what a query reads), vLLM's KV-cache usage back at 0,
kitty's log line (kitty_vllm.metrics) back at 0 staging blocks, and the server's RSS flat. The full size
(2,000 requests, 64 clients, outputs up to 256 tokens) runs on a GPU with ``python -m kitty_vllm.tools.soak``.

The rule that accepts a divergence only as a near-tie is tested on hand-made logprobs.
"""

import pytest

from kitty_vllm.config import KittyConfig
from kitty_vllm.tools.soak import Completion, SoakOptions, compare, format_report, run
from tiny_model import build_tiny_model

OPTIONS = dict(requests=200, concurrency=16, max_model_len=512, max_output=32, dtype="float32",
               # FlashInfer's autotuning would add ~80 s to a GPU start.
               serve_args=["--enforce-eager", "--kernel-config", '{"enable_flashinfer_autotune": false}'])


def test_soak(tmp_path):
    options = SoakOptions(model=str(build_tiny_model()), **OPTIONS)
    report = run(options, tmp_path / "serve.log")
    print("\n" + format_report(report))
    failed = [f"{c['check']}: {c['detail']}" for c in report["checks"] if not c["passed"]]
    assert not failed, "\n".join(failed)
    assert report["verification"]["verified"] == report["verification"]["completed"]
    assert report["verification"]["verdicts"] == {"match": report["verification"]["verified"]}
    exact_kitty2 = KittyConfig.from_preset("kitty2").replace(exact_prefill=True)
    assert KittyConfig.from_yaml(report["kitty_config"]) == exact_kitty2
    # kitty's log line: it appeared while requests ran, and counted the pages packed.
    held, packed = report["staging_at_end"]
    assert held == 0 and packed > 0


def completion(tokens: list[int], top_logprobs: list[dict[int, float]]) -> Completion:
    return Completion(status=200, tokens=tokens, top_logprobs=top_logprobs, finished=True)


# Position 1 is where the soak picked 7 and the run alone picked 8.
SOAK_TOP = [{5: -0.1, 6: -3.0}, {7: -0.50, 8: -0.52}]


@pytest.mark.parametrize("alone_top, tie_gap, verdict", [
    ([{5: -0.1, 6: -3.0}, {8: -0.50, 7: -0.51}], 0.05, "near_tie"),   # within the gap in both runs
    ([{5: -0.1, 6: -3.0}, {8: -0.40, 7: -0.60}], 0.05, "mismatch"),   # the run alone was sure
    ([{5: -0.1, 6: -3.0}, {8: -0.40, 9: -0.45}], 1.00, "mismatch"),   # 7 not even in its top 2
])
def test_a_divergence_passes_only_as_a_near_tie(alone_top, tie_gap, verdict):
    result = compare(completion([5, 7], SOAK_TOP), completion([5, 8], alone_top), tie_gap)
    assert (result.verdict, result.position) == (verdict, 1)


def test_equal_outputs_match_and_report_their_logprob_drift():
    alone_top = [{5: -0.1, 6: -3.0}, {7: -0.45, 8: -0.52}]
    result = compare(completion([5, 7], SOAK_TOP), completion([5, 7], alone_top), tie_gap=0.0)
    assert result.verdict == "match" and result.drift == pytest.approx(0.05)
