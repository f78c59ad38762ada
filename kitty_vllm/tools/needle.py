"""Needle in a haystack: a pass key hidden in Paul Graham's essays, asked for after them.

One trial puts the needle sentence ``The pass key is <7 digits>. Remember it.`` at a relative depth
of the haystack (0 = its start, 1 = its end, at the sentence boundary nearest that point), asks
``What is the pass key?`` after the text, and scores 1 if the greedy answer contains the digits.
The prompt goes through the model's chat template, and its haystack is cut so that prompt and
answer together fill the context length under test (a 32k trial reads 32,768 tokens' worth of
cache minus the answer's). Pass keys come from a seeded generator, so trials are the same on every
machine and every KV-cache dtype.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from kitty_vllm.tools.assets import paul_graham_text

CONTEXT_LENGTHS = (4096, 8192, 16384, 32768)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_NEW_TOKENS = 16
QUESTION = "What is the pass key mentioned in the text above? Answer with the number only."
SEED = 20240229


@dataclass(frozen=True)
class Trial:
    context_length: int
    depth: float
    pass_key: str
    prompt_token_ids: list[int]

    def is_correct(self, answer: str) -> bool:
        return self.pass_key in answer


def needle_sentence(pass_key: str) -> str:
    return f"The pass key is {pass_key}. Remember it."


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    messages = [{"role": "user", "content": f"{text}\n\n{QUESTION}"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(prompt, add_special_tokens=False)


def _insert(haystack: str, sentence: str, depth: float) -> str:
    """``haystack`` with ``sentence`` at the sentence boundary nearest ``depth`` of its length."""
    target = round(depth * len(haystack))
    boundaries = [0, len(haystack)] + [m.end() for m in re.finditer(r"\. ", haystack)]
    cut = min(boundaries, key=lambda b: abs(b - target))
    before, after = haystack[:cut].rstrip(), haystack[cut:].lstrip()
    return " ".join(part for part in (before, sentence, after) if part)


def build_trials(tokenizer: Any, context_lengths: tuple[int, ...] = CONTEXT_LENGTHS,
                 depths: tuple[float, ...] = DEPTHS) -> list[Trial]:
    """One trial per (context length, depth); ``tokenizer`` is a HuggingFace tokenizer with a chat
    template. Each prompt has at most ``context_length - MAX_NEW_TOKENS`` tokens."""
    essay_ids = tokenizer.encode(paul_graham_text(), add_special_tokens=False)
    rng = random.Random(SEED)
    trials = []
    for length in context_lengths:
        budget = length - MAX_NEW_TOKENS
        for depth in depths:
            pass_key = str(rng.randrange(1_000_000, 10_000_000))
            overhead = len(_chat_ids(tokenizer, needle_sentence(pass_key)))
            hay_tokens = budget - overhead
            if hay_tokens <= 0 or hay_tokens > len(essay_ids):
                raise ValueError(f"cannot build a {length}-token needle prompt from {len(essay_ids)} "
                                 f"essay tokens and {overhead} tokens of template")
            # Re-encoding the joined text may merge or split a few tokens; trim until it fits.
            while True:
                haystack = tokenizer.decode(essay_ids[:hay_tokens])
                ids = _chat_ids(tokenizer, _insert(haystack, needle_sentence(pass_key), depth))
                if len(ids) <= budget:
                    break
                hay_tokens -= len(ids) - budget
            trials.append(Trial(length, depth, pass_key, ids))
    return trials
