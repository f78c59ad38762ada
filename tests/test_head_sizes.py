"""A head size whose 2-bit planes the kernels pad (96, Phi-3's: kitty_vllm.kernels.common.padded_sizes),
served end to end: vLLM's greedy tokens with ``--kv-cache-dtype kitty2`` equal the transformers oracle
(kitty_vllm/tools/oracle.py) that quantizes the same layers the same way, token for token.

The tiny random Llama of tests/tiny_model.py with head_dim 96 (4 query heads, 2 KV heads), float32, in
an in-process engine (tests/engine.py) with ``exact_prefill``, so vLLM's prefill steps need not match
the oracle's single prefill (tests/test_vllm_e2e.py explains the comparison). On the CPU vLLM runs
kitty's reference path; the kernels at this head size are checked against that reference in
tests/test_kernels.py, tests/test_decode_kernel.py and tests/test_paged.py. The prompts, essay text of
300 and 740 tokens (BOS first), prefill across pages, and the second completes a page while decoding
(740 + 32 > 768).
"""

from __future__ import annotations

import torch

from engine import prompt_inputs, torch_threads, vllm_engine
from kitty_vllm.config import KittyConfig
from kitty_vllm.tools.assets import token_windows
from kitty_vllm.tools.oracle import kitty_greedy
from tiny_model import build_tiny_model

HEAD_DIM = 96
PROMPT_LENS = (300, 740)
NEW_TOKENS = 32
# As in tests/test_vllm_e2e.py: windows from the third on, and every compared greedy choice clear of a
# near-tie (vLLM's and transformers' float32 models differ by about 1e-6, which can flip a rounding).
FIRST_WINDOW = 2
MIN_GAP = 2e-3


def test_head_size_96_matches_oracle():
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    model_dir = build_tiny_model(head_dim=HEAD_DIM)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    windows = token_windows(tokenizer, FIRST_WINDOW + len(PROMPT_LENS), max(PROMPT_LENS))[FIRST_WINDOW:]
    prompts = [[tokenizer.bos_token_id] + windows[i][: n - 1] for i, n in enumerate(PROMPT_LENS)]
    config = KittyConfig.from_preset("kitty2").replace(exact_prefill=True)
    with torch_threads(1):
        want, logits = kitty_greedy(model_dir, prompts, NEW_TOKENS, config, return_logits=True)
        plain = kitty_greedy(model_dir, prompts, NEW_TOKENS, None)
        with vllm_engine(model_dir, exact_prefill=True, dtype="float32", kv_cache_dtype="kitty2",
                         max_model_len=1024) as llm:
            outputs = llm.generate(prompt_inputs(prompts),
                                   SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                                   use_tqdm=False)
    gap = min(float((top[:, 0] - top[:, 1]).min()) for top in (torch.topk(x, 2, dim=-1).values for x in logits))
    assert gap > MIN_GAP, f"the oracle's greedy choices include a near-tie ({gap:.2e}): pick other windows"
    assert want != plain, "kitty2 changes no greedy token here: the comparison would not see quantization"
    assert [list(o.outputs[0].token_ids) for o in outputs] == want
