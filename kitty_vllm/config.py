"""KittyConfig: the frozen description of one kitty KV-cache format, and its presets.

A preset is a YAML file inside the package (``kitty_vllm/presets/``) with one key per field.
``--kv-cache-dtype kitty2`` selects ``presets/kitty2.yaml``. A deployment changes it in two ways:

* ``KITTY_CONFIG=/path/to/file.yaml`` replaces the preset's file with the user's (fields it leaves out
  take KittyConfig's defaults);
* ``--additional-config '{"kitty": {"boost_ratio": 0.125}}'`` (vLLM's channel for plugin options) sets
  single fields on top of the preset or file.

Every error names the field (or file) at fault and what is allowed. The engine resolves the config once
and passes every field to its workers inside ``additional_config`` (kitty_vllm.patches), so that
multiprocessing and Ray workers build the same cache without reading the file or the environment.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PRESETS = ("kitty2", "kitty2-lite", "kivi2")
BOOST_POLICIES = ("magnitude", "variance", "range", "random")
VALUE_ROTATIONS = ("none", "hadamard")
CONFIG_FILE_ENV = "KITTY_CONFIG"
# The key of kitty's fields in vLLM's ``--additional-config`` mapping.
ADDITIONAL_CONFIG_KEY = "kitty"
ADDITIONAL_CONFIG_EXAMPLE = '{"kitty": {"boost_ratio": 0.125}}'

# The layout splits each 4-bit boosted Key code into two uniform 2-bit planes, so these are the only
# widths the page layout and the kernels implement.
SUPPORTED_BITS = {"key_bits": 2, "boost_bits": 4, "value_bits": 2}
# Boost indices are stored as uint8 and codes are packed 4 per byte along head_dim.
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 16


class KittyConfigError(ValueError):
    """A preset name, config file or field value that kitty cannot use."""


@dataclass(frozen=True)
class KittyConfig:
    """One kitty KV-cache format.

    page_size: tokens per quantized page (one vLLM block); a multiple of 16.
    sink_tokens: the first tokens of each sequence, kept in full precision forever.
    boost_ratio: fraction of head_dim channels per page whose Keys get ``boost_bits``.
    value_window: the newest tokens whose Keys and Values a decode reads in full precision, from a ring
        of that many slots per request. A page is quantized in one batch when its last token is stored
        and read quantized by a decode once its tokens have left the window, so this equals
        ``page_size``.
    key_bits, boost_bits, value_bits: code widths (2, 4 and 2).
    boost_policy: how a page picks its boosted channels: ``magnitude`` (largest mean |K| over the
        page's tokens), ``variance`` (largest variance), ``range`` (largest max - min: the channels whose
        2-bit step is largest) or ``random`` (a fixed pseudo-random set).
    exact_prefill: how a prefill step's tokens see each other. ``false`` (the presets): in full
        precision, as with vLLM's other quantized formats, and so the unfinished page before the step;
        the pages complete before it quantized (vLLM's FlashAttention runs over all of it, those pages
        dequantized). ``true``: every query reads the cache exactly as decoding would at its position,
        its window included, so prompt log-probabilities equal decode-time teacher forcing whatever the
        chunking (kitty_vllm.reference); prefix-cache lookups then miss (kitty_vllm.block_manager).
    draft_tokens: the most draft tokens a verification step of speculative decoding stores per request
        (vLLM's ``num_speculative_tokens``; 0 without speculation). The engine sets it from
        ``--speculative-config`` (kitty_vllm.patches). Drafts that verification rejects are stored
        before anyone knows, so the ring keeps ``draft_tokens`` slots beyond the window (``ring_slots``):
        a rejected draft then never overwrites a token that is still read.
    value_rotation: ``hadamard`` multiplies every token's Value vector (per KV head) by the normalized
        Hadamard matrix before it is stored, so that pages quantize rotated Values, whose per-token range
        the rotation spreads evenly over the channels, and the attention output by the same matrix after
        (it is its own inverse); Keys are not rotated (their per-channel boost picks outlier channels,
        which a rotation would spread). Needs a power-of-two head size. ``none``: Values as they are.
    layer_boost: per-layer boost ratios (KVTuner's finding that layers differ in sensitivity): layer ``i``'s
        Keys boost ``layer_boost[i]`` of their channels instead of ``boost_ratio``; a layer it does not
        name (a speculative drafter's) keeps ``boost_ratio``. Empty (the presets): ``boost_ratio`` for every
        layer. In a config file or ``--additional-config`` it is a list, or the path of a profile that
        ``python -m kitty_vllm.tools.calibrate`` made for the model (kitty_vllm.boost_profile), read once by
        the engine. Each layer then has a page of its own size (:meth:`for_layer`), which vLLM packs side by
        side in each block (its block-outermost KV-cache layout, kitty_vllm.patches).
    """

    page_size: int = 128
    sink_tokens: int = 32
    boost_ratio: float = 0.25
    value_window: int = 128
    key_bits: int = 2
    boost_bits: int = 4
    value_bits: int = 2
    boost_policy: str = "magnitude"
    exact_prefill: bool = False
    draft_tokens: int = 0
    value_rotation: str = "none"
    layer_boost: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        object.__setattr__(self, "boost_ratio", float(self.boost_ratio))
        object.__setattr__(self, "layer_boost", tuple(map(float, self.layer_boost)))
        if self.page_size <= 0 or self.page_size % 16:
            raise KittyConfigError(
                f"page_size={self.page_size}: must be a positive multiple of 16 (tokens per page)")
        if not 0 <= self.sink_tokens < self.page_size:
            raise KittyConfigError(
                f"sink_tokens={self.sink_tokens}: must be in [0, page_size={self.page_size})")
        if not 0.0 <= self.boost_ratio <= 1.0:
            raise KittyConfigError(f"boost_ratio={self.boost_ratio}: must be in [0, 1]")
        if not all(0.0 <= ratio <= 1.0 for ratio in self.layer_boost):
            raise KittyConfigError(f"layer_boost={list(self.layer_boost)}: every ratio must be in [0, 1]")
        if self.value_window != self.page_size:
            raise KittyConfigError(
                f"value_window={self.value_window}: must equal page_size={self.page_size} (a page is "
                "quantized in one batch when full, from the ring that holds the window)")
        for name, bits in SUPPORTED_BITS.items():
            if getattr(self, name) != bits:
                raise KittyConfigError(
                    f"{name}={getattr(self, name)}: only {bits} is supported (the layout stores "
                    "every code as uniform 2-bit planes)")
        if not 0 <= self.draft_tokens < self.page_size:
            raise KittyConfigError(
                f"draft_tokens={self.draft_tokens}: must be in [0, page_size={self.page_size}) (speculative "
                "tokens per verification step)")
        if self.boost_policy not in BOOST_POLICIES:
            raise KittyConfigError(
                f"boost_policy={self.boost_policy!r}: must be one of {', '.join(BOOST_POLICIES)}")
        if self.value_rotation not in VALUE_ROTATIONS:
            raise KittyConfigError(
                f"value_rotation={self.value_rotation!r}: must be one of {', '.join(VALUE_ROTATIONS)}")

    @property
    def ring_slots(self) -> int:
        """Full-precision slots per request for the window and the unfinished page: position ``p`` sits
        in slot ``p % ring_slots``. A verification step from position ``c`` (the request's newest token)
        stores up to position ``c + draft_tokens``, on the decode path before any of its queries attends
        (PagedKittyCache.decode); its first query reads back to ``c + 1 - page_size``, and the steps after
        it start at ``c + 1`` or later (their windows, and the first token of a page that a rejected
        draft completed and that is packed again, start later still). So ``page_size + draft_tokens``
        slots keep every token that is read."""
        return self.page_size + self.draft_tokens

    def reads_as_decode(self, step_tokens: int) -> bool:
        """Whether the queries of a request's step of ``step_tokens`` tokens read the cache as decodes at
        their positions do (kitty_vllm.reference): always with ``exact_prefill``; else a decode and a
        verification step of speculative decoding (its newest token and up to ``draft_tokens`` drafts),
        so that speculation reads what the decodes it replaces would read."""
        return self.exact_prefill or step_tokens <= 1 + self.draft_tokens

    def num_boost_channels(self, head_dim: int) -> int:
        """Boosted channels per page for ``head_dim``; raises if the layout cannot split that head."""
        if head_dim <= 0 or head_dim % HEAD_DIM_MULTIPLE or head_dim > MAX_HEAD_DIM:
            raise KittyConfigError(
                f"head_dim={head_dim}: the kitty layout needs a multiple of {HEAD_DIM_MULTIPLE} "
                f"no larger than {MAX_HEAD_DIM}")
        exact = self.boost_ratio * head_dim
        channels = round(exact)
        if abs(channels - exact) > 1e-6 or channels % 4:
            raise KittyConfigError(
                f"boost_ratio={self.boost_ratio} x head_dim={head_dim} = {exact:g} channels: the sparse "
                "plane packs 4 channels per byte, so this must be a whole multiple of 4")
        return channels

    def for_layer(self, index: int) -> KittyConfig:
        """The config of the model's layer ``index`` (from 0): ``boost_ratio`` is its ``layer_boost`` ratio."""
        if index >= len(self.layer_boost):
            return self
        return self.replace(boost_ratio=self.layer_boost[index])

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config", base: Path | None = None) -> KittyConfig:
        """The config of ``values`` (field: value), ``source`` naming them in errors; a relative profile path in
        ``layer_boost`` is taken from ``base``, the directory of the file that names it (else the working
        directory)."""
        if not isinstance(values, dict):
            raise KittyConfigError(f"{source}: expected a mapping of field: value, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KittyConfigError(
                f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        try:
            boost = values.get("layer_boost")
            if isinstance(boost, str):
                from kitty_vllm.boost_profile import LayerBoostProfile

                values = {**values, "layer_boost": LayerBoostProfile.load((base or Path()) / boost).ratios}
            elif isinstance(boost, list):
                values = {**values, "layer_boost": tuple(boost)}
            return cls(**values)
        except KittyConfigError as e:
            raise KittyConfigError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> KittyConfig:
        return _parse_yaml(_read_config_file(Path(path)), str(path), Path(path).parent)

    @classmethod
    def from_preset(cls, name: str) -> KittyConfig:
        if name not in PRESETS:
            raise KittyConfigError(f"unknown kitty preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return _parse_yaml(resources.files("kitty_vllm.presets").joinpath(f"{name}.yaml").read_text(),
                           f"preset {name}")

    def replace(self, **changes: Any) -> KittyConfig:
        return dataclasses.replace(self, **changes)

    def to_yaml(self, path: str | os.PathLike) -> Path:
        """Write every field to ``path`` (a file that from_yaml and $KITTY_CONFIG read back); returns it."""
        path = Path(path)
        values = {**dataclasses.asdict(self), "layer_boost": list(self.layer_boost)}
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return path


_FIELD_NAMES = frozenset(f.name for f in fields(KittyConfig))


def load_config(preset: str, fields_set: Mapping[str, Any] | None = None) -> KittyConfig:
    """The config for ``--kv-cache-dtype preset``: the file named by $KITTY_CONFIG if set, else the
    preset, with ``fields_set`` (the ``"kitty"`` mapping of ``--additional-config``) on top. A mapping
    that sets every field is the whole config: neither the file nor the preset is read then.

    Each distinct preset, file text and mapping is parsed once per process (every layer asks).
    """
    if fields_set is not None and not isinstance(fields_set, Mapping):
        raise KittyConfigError(
            f'--additional-config: "{ADDITIONAL_CONFIG_KEY}" must be a mapping of field: value, got '
            f"{type(fields_set).__name__}; for example '{ADDITIONAL_CONFIG_EXAMPLE}'")
    frozen = None if fields_set is None else tuple(sorted(
        (name, tuple(value) if name == "layer_boost" and isinstance(value, list) else value)
        for name, value in fields_set.items()))
    file = os.environ.get(CONFIG_FILE_ENV)
    file_text = None
    if file and not (fields_set is not None and set(fields_set) >= _FIELD_NAMES):
        file_text = (file, _read_config_file(Path(file)))
    try:
        hash(frozen)
    except TypeError:   # a mapping as a value: refused by the field's type check, uncached
        return _resolve.__wrapped__(preset, file_text, frozen)
    return _resolve(preset, file_text, frozen)


def load_config_for(preset: str, vllm_config: Any) -> KittyConfig:
    """``load_config`` with the ``"kitty"`` mapping of ``vllm_config.additional_config``, if any."""
    additional = getattr(vllm_config, "additional_config", None)
    fields_set = additional.get(ADDITIONAL_CONFIG_KEY) if isinstance(additional, dict) else None
    return load_config(preset, fields_set)


@functools.lru_cache(maxsize=64)
def _resolve(preset: str, file_text: tuple[str, str] | None,
             fields_set: tuple[tuple[str, Any], ...] | None) -> KittyConfig:
    if fields_set is not None and {name for name, _ in fields_set} >= _FIELD_NAMES:
        return KittyConfig.from_dict(dict(fields_set), source="--additional-config")
    if file_text:
        base = _parse_yaml(file_text[1], file_text[0], Path(file_text[0]).parent)
    else:
        base = KittyConfig.from_preset(preset)
    if not fields_set:
        return base
    return KittyConfig.from_dict({**dataclasses.asdict(base), **dict(fields_set)},
                                 source=f'--additional-config "{ADDITIONAL_CONFIG_KEY}"')


def _read_config_file(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise KittyConfigError(f"cannot read kitty config file {path}: {e.strerror}") from None


def _parse_yaml(text: str, source: str, base: Path | None = None) -> KittyConfig:
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise KittyConfigError(f"{source}: not valid YAML: {e}") from None
    return KittyConfig.from_dict(values if values is not None else {}, source=source, base=base)


def _check_type(name: str, value: Any, annotation: str) -> None:
    if annotation == "tuple[float, ...]":
        if not isinstance(value, tuple) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                   for x in value):
            raise KittyConfigError(f"{name}={value!r}: must be a list of numbers, one per layer, or the path of a "
                                   "profile made by python -m kitty_vllm.tools.calibrate")
        return
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool}[annotation]
    if isinstance(value, bool) != (annotation == "bool") or not isinstance(value, expected):
        allowed = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}[annotation]
        raise KittyConfigError(f"{name}={value!r}: must be {allowed}, got {type(value).__name__}")
