"""diffusers/transformers PyTorch state dicts <-> Flax params, by one documented renaming.

The Flax params use the diffusers-Flax (and transformers-Flax for CLIP) names. A Flax path
maps to exactly one PyTorch key:

* path segments are joined with "."; a segment ``<list>_<i>`` whose ``<list>`` is one of
  ``INDEXED`` becomes ``<list>.<i>`` (``down_blocks_0`` -> ``down_blocks.0``);
* attention projections ``query/key/value/proj_attn`` become ``to_q/to_k/to_v/to_out.0``;
* leaves: ``kernel`` -> ``weight`` (Dense: transposed; Conv: HWIO -> OIHW), ``scale`` and
  ``embedding`` -> ``weight``, ``bias`` -> ``bias``.

Loading is strict: every Flax param must be found with the right shape and every tensor
in the file must be used, else one ``WeightsError`` lists all the problems.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util

INDEXED = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "net", "to_out",
})
ATTENTION_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Buffers some PyTorch checkpoints carry that are not parameters (recomputed here).
IGNORED_TORCH_KEYS = (re.compile(r"(^|\.)position_ids$"),)

Params = Any  # nested dict of arrays


class WeightsError(ValueError):
    """A checkpoint does not match the model it is loaded into."""


def torch_key(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of the Flax param at ``path``."""
    *mods, leaf = path
    out = []
    for i, seg in enumerate(mods):
        m = re.fullmatch(r"(.+)_(\d+)", seg)
        if m and m.group(1) in INDEXED:
            seg = f"{m.group(1)}.{m.group(2)}"
        elif i == len(mods) - 1 and seg in ATTENTION_RENAMES:
            seg = ATTENTION_RENAMES[seg]
        out.append(seg)
    out.append("bias" if leaf == "bias" else "weight")
    return ".".join(out)


def _to_flax(leaf: str, t: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and t.ndim == 4:
        return t.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if leaf == "kernel" and t.ndim == 2:
        return t.T
    return t


def _to_torch(leaf: str, a: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and a.ndim == 4:
        return a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf == "kernel" and a.ndim == 2:
        return a.T
    return a


def _legacy_aliases(key: str) -> Iterable[str]:
    """Older diffusers VAE checkpoints name the mid-block attention query/key/value/proj_attn."""
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
        if f".{new}." in key:
            yield key.replace(f".{new}.", f".{old}.")


def torch_to_flax(state_dict: Mapping[str, np.ndarray], target: Params,
                  allow_missing: Iterable[tuple[str, ...]] = ()) -> tuple[Params, list[tuple[str, ...]]]:
    """Map a PyTorch state dict onto the structure of ``target`` (arrays or ShapeDtypeStructs).

    Returns (params, missing) where ``missing`` are paths in ``allow_missing`` that the file
    lacks (the caller initialises them, e.g. a student's new ``cond_proj``). Any other
    mismatch raises ``WeightsError`` listing every missing, unexpected and mis-shaped key.
    """
    allow_missing = {tuple(p) for p in allow_missing}
    flat_target = traverse_util.flatten_dict(_unfreeze(target))
    used, out, missing_ok = set(), {}, []
    missing, shape_errors = [], []
    for path, ref in flat_target.items():
        key = torch_key(path)
        found = key if key in state_dict else next((k for k in _legacy_aliases(key) if k in state_dict), None)
        if found is None:
            if path in allow_missing:
                missing_ok.append(path)
            else:
                missing.append(key)
            continue
        used.add(found)
        t = np.asarray(state_dict[found])
        if found != key and path[-1] == "kernel" and t.ndim == 4 and len(ref.shape) == 2:
            t = t[:, :, 0, 0]  # legacy 1x1-conv attention projections
        arr = _to_flax(path[-1], t)
        if tuple(arr.shape) != tuple(ref.shape):
            shape_errors.append(f"{found}: file has {tuple(t.shape)}, model expects "
                                f"{tuple(_to_torch(path[-1], np.empty(ref.shape)).shape)}")
            continue
        out[path] = arr
    unexpected = sorted(k for k in state_dict
                        if k not in used and not any(p.search(k) for p in IGNORED_TORCH_KEYS))
    if missing or unexpected or shape_errors:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): " + ", ".join(sorted(missing)))
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if shape_errors:
            lines.append(f"shape mismatches ({len(shape_errors)}): " + "; ".join(shape_errors))
        raise WeightsError("checkpoint does not match the model:\n  " + "\n  ".join(lines))
    return traverse_util.unflatten_dict(out), missing_ok


def flax_to_torch(params: Params) -> dict[str, np.ndarray]:
    """The exact PyTorch state dict diffusers/transformers would save for these params."""
    flat = traverse_util.flatten_dict(_unfreeze(params))
    return {torch_key(p): np.ascontiguousarray(_to_torch(p[-1], np.asarray(v, dtype=np.float32)))
            for p, v in flat.items()}


def _unfreeze(tree: Params) -> dict:
    from flax.core import unfreeze
    return unfreeze(tree) if hasattr(tree, "unfreeze") else tree
