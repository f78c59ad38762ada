"""End-to-end oracle: a transformers model whose full-attention layers read a kitty KV cache.

The model keeps transformers' ordinary ``DynamicCache`` (all past K after RoPE and V, full
precision); a custom attention function, registered with ``AttentionInterface`` as
``"kitty_reference"``, hands the whole K/V so far to :func:`kitty_vllm.reference.reference_attention`,
which quantizes the complete pages itself and follows the cache schedule of :mod:`kitty_vllm.reference`,
the tokens of one forward call being one step. With ``exact_prefill`` each query sees the cache as it
stands at its own position, so a prefill, a chunked prefill and token-by-token decoding agree (up to
float32 rounding); without it (the presets) a step's tokens read each other in full precision, so a
prompt must be fed in the chunks vLLM prefills it in (``chunk_size``) for the two to agree.

``config=None`` means plain attention: the same path with a config whose first page never fills
(page_size > sequence length, no sinks), which makes ``reference_attention`` exact causal attention.
``attention`` (kitty_logits; None: ``reference_attention``) replaces ``reference_attention`` for the
quantized layers with a function of the same arguments: the accuracy levers of kitty_vllm.tools.levers,
which the kernels do not implement.

Sliding-window layers (Gemma 2/3, Mistral: transformers passes their ``sliding_window``) read their
window in full precision, as kitty dtypes keep them in the model's dtype in vLLM
(kitty_vllm.block_manager.mixed). Given ``max_model_len``, a window of at least that many tokens (Phi-3's)
excludes nothing, and its layers attend as full-attention layers, as kitty serves a model whose every layer
shares such a window (kitty_vllm.patches).

Everything runs in float32 on the CPU, one sequence at a time.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import torch

from kitty_vllm.config import KittyConfig
from kitty_vllm.reference import reference_attention

ATTN_IMPLEMENTATION = "kitty_reference"

_state = threading.local()


def plain_config(num_tokens: int) -> KittyConfig:
    """A config under which ``num_tokens`` keys see no quantization: one page longer than them."""
    page = (num_tokens // 16 + 1) * 16
    return KittyConfig(page_size=page, sink_tokens=0, value_window=page)


@contextlib.contextmanager
def kitty_attention(config: KittyConfig | None, plain_layers: Collection[int] = (),
                    max_model_len: int | None = None,
                    attention: Callable[..., torch.Tensor] | None = None) -> Iterator[None]:
    """Within this block, ``"kitty_reference"`` attention uses ``config`` (None: plain attention) through
    ``attention`` (``reference_attention``'s arguments; None: ``reference_attention``), except in the layers
    numbered in ``plain_layers`` (those ``kv_cache_dtype_skip_layers`` names in vLLM), which attend plainly,
    and in sliding-window layers, whose window is shorter than ``max_model_len`` tokens (None: every
    sliding-window layer), which attend plainly over their window."""
    previous = (getattr(_state, "config", None), getattr(_state, "plain_layers", frozenset()),
                getattr(_state, "max_model_len", None), getattr(_state, "attention", None))
    _state.config, _state.plain_layers, _state.max_model_len, _state.attention = (
        config, frozenset(plain_layers), max_model_len, attention)
    try:
        yield
    finally:
        _state.config, _state.plain_layers, _state.max_model_len, _state.attention = previous


def kitty_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float | None = None, dropout: float = 0.0,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function (the ``sdpa_attention_forward`` signature).

    query [B, Hq, Tq, D] and key/value [B, Hkv, N, D] come after RoPE and after the cache update, so
    key/value hold every position 0..N-1 of the sequence. ``position_ids`` [B or 1, Tq] arrives in
    ``kwargs`` (LlamaDecoderLayer forwards it); without it the queries are the last Tq positions.
    ``attention_mask`` is ignored: a name unknown to the mask interface gets ``None`` from
    ``create_causal_mask``, and the reference applies the causal mask itself, so sequences must not
    be padded. A ``sliding_window`` in ``kwargs`` makes it plain sliding-window attention
    (:func:`sliding_window_attention`), unless it spans max_model_len (:func:`kitty_attention`).
    ``softcap`` (Gemma 2's attention logit soft-cap) and ``s_aux`` (gpt-oss's learned sinks, one logit per
    query head) in ``kwargs`` apply to either. Returns [B, Tq, Hq, D], the layout the attention modules
    reshape to hidden size.
    """
    if dropout:
        raise ValueError("kitty reference attention has no dropout (call model.eval())")
    scale = scaling if scaling is not None else module.scaling
    soft_cap, sinks = kwargs.get("softcap") or 0.0, kwargs.get("s_aux")
    window, max_model_len = kwargs.get("sliding_window"), getattr(_state, "max_model_len", None)
    if window is not None and (max_model_len is None or window < max_model_len):
        return sliding_window_attention(query, key, value, window, scale, soft_cap, sinks), None
    config, attend = getattr(_state, "config", None), getattr(_state, "attention", None) or reference_attention
    if getattr(module, "layer_idx", None) in getattr(_state, "plain_layers", ()):
        config = None
    elif config is not None and config.layer_boost:
        config = config.for_layer(module.layer_idx)
    batch, _, num_queries, _ = query.shape
    num_keys = key.shape[2]
    if config is None:
        config, attend = plain_config(num_keys), reference_attention
    position_ids = kwargs.get("position_ids")
    outputs = []
    for b in range(batch):
        if position_ids is not None:
            positions = position_ids[b if position_ids.shape[0] > 1 else 0].to("cpu", torch.long)
        else:
            positions = torch.arange(num_keys - num_queries, num_keys)
        if positions.numel() != num_queries or int(positions.max()) >= num_keys:
            raise ValueError(f"query positions {positions.tolist()} do not fit {num_keys} cached keys")
        out = attend(query[b].transpose(0, 1), key[b].transpose(0, 1), value[b].transpose(0, 1), config,
                     query_positions=positions, scale=scale, soft_cap=soft_cap, sinks=sinks)
        outputs.append(out)
    return torch.stack(outputs).to(query.dtype), None


def sliding_window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: int,
                             scale: float, soft_cap: float = 0.0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each query over the ``window`` newest positions up to its own, in float32, with
    logits soft-capped at ``soft_cap`` (0: not) and ``sinks`` [Hq] (an extra logit per query head that
    takes probability and gives no value; None: none).

    query [B, Hq, Tq, D] are the last Tq positions of the keys and values [B, Hkv, N, D]: transformers'
    sliding-window cache layers keep only the newest positions, so positions count back from the last.
    Returns [B, Tq, Hq, D].
    """
    num_queries, num_keys = query.shape[2], key.shape[2]
    group = query.shape[1] // key.shape[1]
    keys, values = (t.float().repeat_interleave(group, dim=1) for t in (key, value))
    logits = query.float() @ keys.transpose(-1, -2) * scale                          # [B, Hq, Tq, N]
    if soft_cap:
        logits = soft_cap * torch.tanh(logits / soft_cap)
    query_positions = torch.arange(num_keys - num_queries, num_keys)[:, None]
    key_positions = torch.arange(num_keys)[None, :]
    visible = (key_positions <= query_positions) & (key_positions > query_positions - window)
    logits = logits.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*logits.shape[:3], 1)
        logits = torch.cat([logits, sink], dim=-1)
    weights = torch.softmax(logits, dim=-1)[..., :num_keys]
    return (weights @ values).transpose(1, 2).to(query.dtype)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, kitty_attention_forward)


_register()


def load_model(model_dir: str | Path, attn_implementation: str = ATTN_IMPLEMENTATION,
               dtype: torch.dtype = torch.float32):
    """The model at ``model_dir`` on the CPU in ``dtype``, in eval mode (cached per arguments)."""
    return _load_model(str(Path(model_dir).resolve()), attn_implementation, dtype)


@functools.lru_cache(maxsize=8)
def _load_model(model_dir: str, attn_implementation: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    return model.eval()


@torch.no_grad()
def kitty_logits(model_dir: str | Path, token_ids: list[int], config: KittyConfig | None,
                 chunk_size: int | None = None, dtype: torch.dtype = torch.float32,
                 attention: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """float32 logits [T, V] for every position of ``token_ids`` under ``config``'s cache schedule.

    ``chunk_size=None`` runs one prefill of the whole sequence; ``chunk_size=k`` feeds it ``k``
    tokens at a time through the cache (chunked prefill; ``1`` is token-by-token decoding).
    ``dtype`` is the model's (projections, norms, MLP); the attention itself is always float32.
    ``attention``: as in :func:`kitty_attention` (kitty_vllm.tools.levers.lever_attention).
    """
    model = load_model(model_dir, dtype=dtype)
    from transformers import DynamicCache

    ids = torch.tensor([token_ids], dtype=torch.long)
    step = ids.shape[1] if chunk_size is None else chunk_size
    cache = DynamicCache(config=model.config)
    logits = []
    with kitty_attention(config, attention=attention):
        for start in range(0, ids.shape[1], step):
            chunk = ids[:, start:start + step]
            positions = torch.arange(start, start + chunk.shape[1]).unsqueeze(0)
            out = model(input_ids=chunk, position_ids=positions, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[0].float())
    return torch.cat(logits)


@torch.no_grad()
def kitty_greedy(model_dir: str | Path, prompts: list[list[int]], max_new_tokens: int,
                 config: KittyConfig | None, *, chunk_size: int | None = None,
                 return_logits: bool = False, dtype: torch.dtype = torch.float32,
                 plain_layers: Collection[int] = (), max_model_len: int | None = None):
    """Greedy continuations of ``prompts`` (token ids, used as given: no BOS is added) under ``config``.

    Each prompt is prefilled in one step (``chunk_size=k``: in steps of ``k`` tokens), then decoded one
    token at a time. Exactly ``max_new_tokens`` tokens are produced per prompt: EOS does not stop
    generation (compare with vLLM's ``SamplingParams(ignore_eos=True)``). With ``return_logits=True``
    returns ``(tokens, logits)`` where ``logits[i]`` is float32 [max_new_tokens, V], the distribution
    each new token was chosen from. ``plain_layers``, ``max_model_len``: as in :func:`kitty_attention`.
    """
    from transformers import DynamicCache

    model = load_model(model_dir, dtype=dtype)
    results, all_logits = [], []
    with kitty_attention(config, plain_layers, max_model_len):
        for prompt in prompts:
            if not prompt:
                raise ValueError("empty prompt")
            cache = DynamicCache(config=model.config)
            step = chunk_size or len(prompt)
            steps = [prompt[start:start + step] for start in range(0, len(prompt), step)]
            position, new_tokens, step_logits = 0, [], []
            for _ in range(max_new_tokens):
                for tokens in steps:
                    positions = torch.arange(position, position + len(tokens)).unsqueeze(0)
                    out = model(input_ids=torch.tensor([tokens], dtype=torch.long), position_ids=positions,
                                past_key_values=cache, use_cache=True)
                    cache, position = out.past_key_values, position + len(tokens)
                last = out.logits[0, -1].float()
                token = int(torch.argmax(last))
                new_tokens.append(token)
                step_logits.append(last)
                steps = [[token]]
            results.append(new_tokens)
            all_logits.append(torch.stack(step_logits) if step_logits
                              else torch.empty(0, model.config.vocab_size))
    return (results, all_logits) if return_logits else results
