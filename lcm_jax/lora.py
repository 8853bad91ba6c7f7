"""LoRA on the UNet: adapters as a pure delta on the Flax param tree.

A LoRA is a nested dict shaped like the UNet params with ``{"down", "up"}`` where the base
module holds ``{"kernel", "bias"}``: Dense: down [in, r], up [r, out]; Conv: down
[kh, kw, in, r] (HWIO, the base conv's own size and stride), up [r, out] (a 1x1 conv), as
PEFT's Linear/Conv2d LoRA. The adapted kernel is ``W + scale * alpha / r * down @ up``
(``delta``). ``alpha`` is not in the tree, which holds only what LCM-LoRA training updates
(so the optimizer state holds only LoRA params); pass it to ``merge``. LoRAs read from files
have their alpha folded into ``up`` (``alpha=None``: factor 1).

Why merging and no "unfused" forward: x W + x down up = x (W + down up) exactly, so a merged
kernel *is* PEFT's unfused layer; merging costs one [in, r] x [r, out] product per module
(tiny beside a UNet call) and needs no change to the models. The pipeline's unfused path
merges inside its jitted sampler (base params and adapters are arguments, so a compiled
sampler never holds stale weights); ``fuse_lora`` merges once instead. The price of unfused:
a second copy of the adapted kernels lives during each call.

The files they travel in: lora_files.py.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lcm_jax import weights
from lcm_jax.weights import WeightsError

Params = Any
Lora = Any  # nested dict, {"down": [..., in, r], "up": [r, out]} per adapted module
Targets = Union[str, Sequence[str]]

# The module set of diffusers' LCM-LoRA scripts (train_lcm_distill_lora_sd*_wds.py).
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                    "time_emb_proj")


class LoraError(WeightsError):
    """A LoRA file or tree does not fit the UNet it is applied to."""


# --------------------------------------------------------------------------- modules

def module_names(params: Params) -> dict[str, tuple[str, ...]]:
    """diffusers module name -> Flax module path, for every Dense/Conv (every ``kernel``)."""
    flat = traverse_util.flatten_dict(weights._unfreeze(params))
    return {weights.torch_key(p)[: -len(".weight")]: p[:-1] for p in flat if p[-1] == "kernel"}


def matches(name: str, targets: Targets) -> bool:
    """PEFT's ``target_modules`` rule: a string is a regex on the whole module name; a list
    matches a name equal to an entry or ending in ``"." + entry``."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def target_modules(params: Params, targets: Targets = LCM_LORA_TARGETS) -> dict[str, tuple[str, ...]]:
    """The modules of ``params`` that ``targets`` selects (diffusers name -> Flax path)."""
    found = {n: p for n, p in module_names(params).items() if matches(n, targets)}
    if not found:
        raise ValueError(f"LoRA targets {targets!r} match no Dense/Conv module of the UNet "
                         f"(module names are diffusers', e.g. 'down_blocks.0.attentions.0.proj_in')")
    return found


def adapted(lora: Lora) -> dict[tuple[str, ...], dict[str, Any]]:
    """Flax module path -> {"down", "up"} for every module of a LoRA tree."""
    mods: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, v in traverse_util.flatten_dict(weights._unfreeze(lora)).items():
        if path[-1] not in ("down", "up"):
            raise LoraError(f"LoRA tree leaf {'/'.join(path)}: expected leaves named 'down' and 'up'")
        mods.setdefault(path[:-1], {})[path[-1]] = v
    for path, m in mods.items():
        if set(m) != {"down", "up"}:
            raise LoraError(f"LoRA module {'/'.join(path)} has {sorted(m)}, expected both 'down' and 'up'")
    return mods


def num_params(lora: Lora) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(lora))


# --------------------------------------------------------------------------- init / merge

def init_lora(params: Params, rank: int, targets: Targets = LCM_LORA_TARGETS,
              rng: Optional[jax.Array] = None, init: str = "kaiming") -> Lora:
    """A fresh LoRA on the ``targets`` of ``params``: up = 0 (the adapted model starts as the
    base), down as PEFT's ``init_lora_weights``: "kaiming" (True: kaiming-uniform, a=sqrt(5),
    i.e. U(+-1/sqrt(fan_in))) or "gaussian" (N(0, 1/r))."""
    if int(rank) < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if init not in ("kaiming", "gaussian"):
        raise ValueError(f"LoRA init {init!r}: expected 'kaiming' or 'gaussian'")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    flat = traverse_util.flatten_dict(weights._unfreeze(params))
    mods = sorted(target_modules(params, targets).values())
    out = {}
    for key, path in zip(jax.random.split(rng, len(mods)), mods):
        *lead, n_out = flat[path + ("kernel",)].shape  # Dense [in, out]; Conv [kh, kw, in, out]
        shape = (*lead, rank)
        if init == "kaiming":
            bound = 1.0 / np.sqrt(np.prod(lead))
            out[path + ("down",)] = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        else:
            out[path + ("down",)] = jax.random.normal(key, shape, jnp.float32) / rank
        out[path + ("up",)] = jnp.zeros((rank, n_out), jnp.float32)
    return traverse_util.unflatten_dict(out)


def delta(down: jax.Array, up: jax.Array) -> jax.Array:
    """down @ up as a kernel: [..., in, r] x [r, out] -> [..., in, out] (exact fp32 products)."""
    return jnp.einsum("...ir,ro->...io", down, up, precision=jax.lax.Precision.HIGHEST)


def merge(params: Params, lora: Lora, scale: Union[float, jax.Array] = 1.0,
          alpha: Optional[float] = None) -> Params:
    """New params with ``W + scale * alpha / r * down @ up`` on every module of ``lora``
    (``alpha=None``: factor 1, for LoRAs whose alpha is folded in). Pure; jit-able."""
    return _apply(params, lora, scale, alpha, 1.0)


def unmerge(params: Params, lora: Lora, scale: Union[float, jax.Array] = 1.0,
            alpha: Optional[float] = None) -> Params:
    """The inverse of ``merge`` (equal up to float rounding)."""
    return _apply(params, lora, scale, alpha, -1.0)


def _apply(params: Params, lora: Lora, scale, alpha: Optional[float], sign: float) -> Params:
    flat = dict(traverse_util.flatten_dict(weights._unfreeze(params)))
    bad = []
    for path, m in adapted(lora).items():
        key = path + ("kernel",)
        if key not in flat:
            bad.append(f"{'/'.join(path)}: no such Dense/Conv in the UNet")
            continue
        kernel = flat[key]
        if tuple(m["down"].shape[:-1]) + (m["up"].shape[-1],) != tuple(kernel.shape) \
                or m["down"].shape[-1] != m["up"].shape[0]:
            bad.append(f"{'/'.join(path)}: down {tuple(m['down'].shape)} x up {tuple(m['up'].shape)} "
                       f"does not make the kernel {tuple(kernel.shape)}")
            continue
        factor = 1.0 if alpha is None else alpha / m["down"].shape[-1]
        flat[key] = kernel + (sign * factor * scale * delta(m["down"], m["up"])).astype(kernel.dtype)
    if bad:
        raise LoraError("LoRA does not fit the UNet:\n  " + "\n  ".join(bad))
    return traverse_util.unflatten_dict(flat)


def fold_alpha(lora: Lora, alpha: Optional[float]) -> Lora:
    """The same LoRA with ``alpha / r`` multiplied into ``up`` (to merge with ``alpha=None``)."""
    if alpha is None:
        return lora
    flat = {}
    for path, m in adapted(lora).items():
        flat[path + ("down",)] = m["down"]
        flat[path + ("up",)] = m["up"] * (alpha / m["down"].shape[-1])
    return traverse_util.unflatten_dict(flat)
