"""Per-layer boost ratios: the profile a model's layers quantize their Keys with (KittyConfig.layer_boost).

KVTuner's finding is that layers differ in how much their Key quantization costs; ``python -m
kitty_vllm.tools.calibrate --model MODEL --out PROFILE.yaml`` measures it for each layer and hands the boosted
channels to the layers where they remove the most error, at the preset's average ratio. A config points to the
file (``layer_boost: PROFILE.yaml``) and the engine reads it once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kitty_vllm.config import KittyConfig, KittyConfigError
from kitty_vllm.layout import page_layout

CALIBRATE_COMMAND = "python -m kitty_vllm.tools.calibrate --model MODEL --out {path}"


@dataclass(frozen=True)
class LayerBoostProfile:
    """Per-layer boost ratios for one model (KittyConfig.layer_boost, and the simulation's ``layer-boost`` lever,
    kitty_vllm.tools.levers): ``ratios[i]`` for layer ``i``, averaging to ``boost_ratio``, the preset's, so that
    the cache keeps the preset's bits. The file is YAML with these keys, and ``calibration`` (free-form: how it
    was made)."""

    model: str
    boost_ratio: float
    ratios: tuple[float, ...]
    calibration: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> LayerBoostProfile:
        """The profile at ``path``; raises KittyConfigError naming the fix for a file that is missing, is no
        mapping with ``model``, ``boost_ratio`` and ``ratios``, or whose ratios do not average to
        ``boost_ratio``."""
        fix = f"make it with {CALIBRATE_COMMAND.format(path=path)}"
        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise KittyConfigError(f"{path}: no such layer-boost profile: {fix}") from None
        except yaml.YAMLError as e:
            raise KittyConfigError(f"{path}: not YAML ({e}): {fix}") from None
        if not isinstance(data, dict) or not {"model", "boost_ratio", "ratios"} <= data.keys():
            raise KittyConfigError(f"{path}: a layer-boost profile is a mapping with model, boost_ratio and ratios "
                                   f"(one per layer): {fix}")
        ratios, base = data["ratios"], data["boost_ratio"]
        if not (isinstance(ratios, list) and ratios and all(map(_fraction, [base, *ratios]))):
            raise KittyConfigError(f"{path}: boost_ratio and ratios must be numbers in [0, 1], ratios a non-empty "
                                   f"list: {fix}")
        mean = math.fsum(ratios) / len(ratios)
        if not math.isclose(mean, base, abs_tol=1e-9):
            raise KittyConfigError(f"{path}: the ratios average {mean:g}, not boost_ratio {base}, so the cache would "
                                   f"not keep the preset's bits: {fix}")
        return cls(model=str(data["model"]), boost_ratio=float(base), ratios=tuple(float(r) for r in ratios),
                   calibration=data.get("calibration") or {})

    def to_yaml(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump({"model": self.model, "boost_ratio": self.boost_ratio,
                                        "ratios": list(self.ratios), "calibration": self.calibration},
                                       sort_keys=False, width=120))
        return path

    def layer_config(self, config: KittyConfig, layer: int) -> KittyConfig:
        """``config`` with layer ``layer``'s boost ratio."""
        return config.replace(boost_ratio=self.ratios[layer])

    def bits_per_element(self, config: KittyConfig, head_dim: int) -> float:
        """Bits per K or V element of the pages averaged over the layers, metadata included: the preset's
        (``config``'s) up to the 16-byte alignment of each page's index of boosted channels."""
        return math.fsum(page_layout(self.layer_config(config, layer), head_dim).effective_bits
                         for layer in range(len(self.ratios))) / len(self.ratios)

    def check(self, config: KittyConfig, model: str, num_layers: int, head_dim: int, path: str | Path) -> None:
        """Raise KittyConfigError unless this profile (from ``path``) fits ``model`` (its layers and head_dim) and
        the preset ``config`` it is applied to (the same base ratio)."""
        fix = f"make one with {CALIBRATE_COMMAND.format(path=path).replace('MODEL', model)}"
        if self.model != model:
            raise KittyConfigError(f"{path}: a profile of {self.model}, not {model}: {fix}")
        if len(self.ratios) != num_layers:
            raise KittyConfigError(f"{path}: {len(self.ratios)} ratios for {model}'s {num_layers} layers: {fix}")
        if not math.isclose(self.boost_ratio, config.boost_ratio):
            raise KittyConfigError(f"{path}: ratios averaging {self.boost_ratio}, for a preset of boost_ratio "
                                   f"{config.boost_ratio}: {fix} --preset PRESET")
        for layer in range(num_layers):
            try:
                self.layer_config(config, layer).num_boost_channels(head_dim)
            except KittyConfigError as e:
                raise KittyConfigError(f"{path}: layer {layer}: {e}: {fix}") from None


def _fraction(x: Any) -> bool:
    """Whether ``x`` is a number in [0, 1] (YAML's true and false are no ratios)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1
