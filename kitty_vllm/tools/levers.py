"""Accuracy levers of issue 30 that the kernels do not implement yet, for the float32 decode-time
simulation only (kitty_vllm.tools.oracle over kitty_vllm.reference): ``kitty2:lever=NAMES`` in
``python -m kitty_vllm.tools.eval --reference``, which refuses them without ``--reference``.

* ``value-lag``: a page's Values are packed one page after its Keys. A query at position ``p`` reads in
  full precision the Values of its own page and of the page before (the newest 128 to 255 Values before
  it, with 128-token pages), besides the window and the sinks that every kitty cache keeps; older pages'
  Values dequantized, exactly as kitty2 stores them. Keys unchanged. A step of several tokens that does
  not read as decodes (``exact_prefill`` off) reads in full precision the Values of its first token's page,
  of the page before and of anything later. It costs a request ``page_size`` more full-precision Value
  slots (a ring of ``2 * page_size`` Values beside the Keys' ``page_size``; :func:`lagged_values`).
* ``hadamard-v``: each token's Value vector (per KV head) is multiplied by the normalized Hadamard
  matrix ``H`` (kitty_vllm.reference.hadamard) before the per-token quantization, and its dequantized vector by
  ``H^T`` after (``V_hat = Q(V H) H^T``, what undoing the rotation on the attention output gives). The
  full-precision Values and the Keys are not rotated; the per-channel Key boost picks outlier channels,
  which a rotation would spread. It costs no bits.
* ``layer-boost=PROFILE``: each layer's Keys get the boost ratio that the profile file ``PROFILE`` gives
  that layer (:class:`LayerBoostProfile`, made by ``python -m kitty_vllm.tools.calibrate``) instead of the
  preset's one ratio for all; the ratios average to the preset's, so the bits do too (up to the page's
  16-byte alignment of the boosted channels' index). The layer is the attention module's ``layer_idx``,
  which :func:`layer_indices` records as the model runs. Values and the schedule unchanged.

The quantization, the schedule and the attention are kitty_vllm.reference's own: a lever only changes
which Values a query reads quantized, or what it reads there, or how many Key channels a layer boosts.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kitty_vllm.boost_profile import CALIBRATE_COMMAND, LayerBoostProfile
from kitty_vllm.config import KittyConfig
from kitty_vllm.layout import page_layout
from kitty_vllm.reference import hadamard, quantized_sequence, rotate, schedule_attention

LAYER_BOOST = "layer-boost"
LEVERS = ("value-lag", "hadamard-v", LAYER_BOOST)

_current = threading.local()


def parse(names: str) -> tuple[str, ...]:
    """The levers of ``NAMES`` (comma-separated), in LEVERS' order, ``layer-boost=PROFILE`` with its file
    (loaded now, so that a bad one is refused before a run); raises ValueError for an unknown or repeated
    one, or a bad profile."""
    given = names.split(",")
    bases = [LAYER_BOOST if name.partition("=")[0] == LAYER_BOOST else name for name in given]
    unknown = [name for name, base in zip(given, bases, strict=True) if base not in LEVERS]
    if unknown or len(set(bases)) != len(bases):
        raise ValueError(f"levers {names!r}: the levers are {', '.join(LEVERS)} ({LAYER_BOOST}=PROFILE.yaml), "
                         "comma-separated, each once"
                         + (f" (unknown: {', '.join(map(repr, unknown))})" if unknown else ""))
    for name in given:
        if name.partition("=")[0] == LAYER_BOOST:
            path = profile_path(name)
            if path is None:
                raise ValueError(f"levers {names!r}: {LAYER_BOOST} takes a profile file, {LAYER_BOOST}=PROFILE.yaml "
                                 f"(make one with {CALIBRATE_COMMAND.format(path='PROFILE.yaml')})")
            LayerBoostProfile.load(path)
    return tuple(name for lever in LEVERS for name, base in zip(given, bases, strict=True) if base == lever)


def label(lever: str) -> str:
    """How a result names ``lever``: itself, or ``layer-boost=STEM`` for its profile file (as the eval
    labels ``DTYPE:FILE.yaml`` by the file's stem)."""
    path = profile_path(lever)
    return lever if path is None else f"{LAYER_BOOST}={path.stem}"


def profile_path(lever: str) -> Path | None:
    """The profile file of a ``layer-boost=PROFILE`` lever; None for the others."""
    name, _, file = lever.partition("=")
    return Path(file) if name == LAYER_BOOST and file else None


@contextlib.contextmanager
def layer_indices(model: torch.nn.Module) -> Iterator[None]:
    """Within this block, each module of ``model`` with a ``layer_idx`` (transformers' attention modules and
    decoder layers) records its index before it runs, for the ``layer-boost`` lever (:func:`current_layer`):
    kitty_vllm.tools.oracle hands the attention function no layer."""
    def enter(module: torch.nn.Module, args: Any) -> None:
        _current.layer = module.layer_idx

    handles = [module.register_forward_pre_hook(enter) for module in model.modules()
               if isinstance(getattr(module, "layer_idx", None), int)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _current.layer = None


def current_layer() -> int:
    """The layer running now, inside :func:`layer_indices`."""
    layer = getattr(_current, "layer", None)
    if layer is None:
        raise RuntimeError(f"{LAYER_BOOST} needs the layer: run the model inside levers.layer_indices(model)")
    return layer


def packed_value_pages(query_positions: torch.Tensor, config: KittyConfig) -> torch.Tensor:
    """int64 [Tq]: under the value lag, how many of the first pages have their Values packed for the
    queries of one step at ``query_positions``: those before the page before each query's own, or for a
    step that does not read as decodes, before the page before its first token's."""
    if config.reads_as_decode(len(query_positions)):
        pages = query_positions // config.page_size
    else:
        pages = (query_positions.min() // config.page_size).expand(len(query_positions))
    return (pages - 1).clamp_min(0)


def lagged_values(levers: Collection[str], config: KittyConfig) -> int:
    """Full-precision Values a request keeps under ``levers`` beyond the ring of ``config`` (Keys and
    Values of ``ring_slots`` tokens): ``page_size`` with the value lag, else none."""
    return config.page_size if "value-lag" in levers else 0


def lever_attention(levers: Collection[str]) -> Callable[..., torch.Tensor] | None:
    """:func:`attention` under ``levers``, with kitty_vllm.reference.reference_attention's arguments, for
    kitty_vllm.tools.oracle (inside :func:`layer_indices` for ``layer-boost``); None without levers (the
    oracle's own ``reference_attention``)."""
    return functools.partial(attention, levers=parse(",".join(levers))) if levers else None


def layer_profile(levers: Sequence[str]) -> tuple[LayerBoostProfile, Path] | None:
    """The profile of the ``layer-boost`` lever among ``levers`` and its file; None without one."""
    paths = [path for path in map(profile_path, levers) if path is not None]
    return (LayerBoostProfile.load(paths[0]), paths[0]) if paths else None


def attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, config: KittyConfig,
              query_positions: torch.Tensor | None = None, scale: float | None = None, soft_cap: float = 0.0,
              sinks: torch.Tensor | None = None, *, levers: Collection[str]) -> torch.Tensor:
    """kitty_vllm.reference.reference_attention (same arguments and result) with ``levers`` applied: the
    Keys' boost ratio of the layer running (:func:`current_layer`) with ``layer-boost``, the Values'
    quantization of ``hadamard-v``, and with ``value-lag`` the queries grouped by how many pages' Values
    they read packed (:func:`packed_value_pages`), each group reading the Values of later pages in full
    precision."""
    num_keys, _, head_dim = keys.shape
    profile = layer_profile(tuple(levers))
    if profile is not None:
        config = profile[0].layer_config(config, current_layer())
    if query_positions is None:
        query_positions = torch.arange(num_keys - query.shape[0], num_keys)
    if "hadamard-v" in levers:
        rotation = hadamard(head_dim, values.device)
        keys_q, values_q = quantized_sequence(keys, rotate(values.float(), rotation), config)
        values_q = rotate(values_q, rotation)
    else:
        keys_q, values_q = quantized_sequence(keys, values, config)
    if "value-lag" not in levers:
        return schedule_attention(query, keys, values, keys_q, values_q, query_positions, config, scale, soft_cap,
                                  sinks)
    packed = packed_value_pages(query_positions.cpu(), config)
    key_pages = torch.arange(num_keys) // config.page_size
    out = torch.empty(query.shape, dtype=torch.float32, device=query.device)
    for count in packed.unique().tolist():
        rows = (packed == count).to(query.device)
        lagged = torch.where((key_pages < count).view(-1, 1, 1).to(values.device), values_q, values.float())
        out[rows] = schedule_attention(query[rows], keys, values, keys_q, lagged, query_positions[rows], config,
                                       scale, soft_cap, sinks)
    return out
