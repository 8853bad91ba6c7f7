"""LoRA on the UNet: adapters as a pure delta on the Flax param tree, and the files they travel in.

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

Files: diffusers/PEFT keys (``unet.<module>.lora_A.weight``/``lora_B.weight``, the older
``.lora.down.weight``/``.lora.up.weight`` and ``processor.to_q_lora.down.weight``, alpha from
``.alpha`` tensors or diffusers' ``lora_adapter_metadata``) and kohya keys
(``lora_unet_<module with _>.lora_down.weight``/``.lora_up.weight``/``.alpha``, with diffusers
module names or the original SD/SGM ones, ``lora_unet_input_blocks_1_1_...``). Module names
come from ``weights.torch_key``, the one Flax <-> PyTorch renaming. Safetensors only.
"""
from __future__ import annotations

import json
import logging
import os
import re
import struct
from typing import Any, Mapping, Optional, Sequence, Union

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
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights default
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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


# --------------------------------------------------------------------------- diffusers/PEFT keys

def lora_to_state_dict(lora: Lora, alpha: Optional[float] = None, prefix: str = "unet") -> dict[str, np.ndarray]:
    """diffusers/PEFT tensors ``<prefix>.<module>.lora_A.weight`` / ``lora_B.weight`` (torch
    layouts), with ``alpha / r`` folded into lora_B, so any loader (scale 1) rebuilds it."""
    out = {}
    for path, m in adapted(fold_alpha(lora, alpha)).items():
        name = weights.torch_key(path + ("kernel",))[: -len(".weight")]
        down, up = np.asarray(m["down"], np.float32), np.asarray(m["up"], np.float32)
        if down.ndim == 4:  # conv: A [r, in, kh, kw], B [out, r, 1, 1]
            a, b = down.transpose(3, 2, 0, 1), up.T[:, :, None, None]
        else:  # linear: A [r, in], B [out, r]
            a, b = down.T, up.T
        out[f"{prefix}.{name}.lora_A.weight"] = np.ascontiguousarray(a)
        out[f"{prefix}.{name}.lora_B.weight"] = np.ascontiguousarray(b)
    return out


def save_lora_weights(save_directory: str, lora: Lora, alpha: Optional[float] = None,
                      weight_name: str = LORA_WEIGHT_NAME) -> str:
    """Write ``<save_directory>/<weight_name>`` as diffusers' ``save_lora_weights`` does (its
    ``load_lora_weights`` reads it back); returns the file's path."""
    from safetensors.numpy import save_file
    if not weight_name.endswith(".safetensors"):
        raise ValueError(f"weight_name {weight_name!r}: LoRA weights are written as .safetensors only")
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, weight_name)
    save_file(lora_to_state_dict(lora, alpha), path, metadata={"format": "pt"})
    return path


# Key forms, after "unet." and ".processor." are stripped: (regex, part) with group 1 the module.
_DIFFUSERS_KEYS = (
    (re.compile(r"(.+)\.lora_A(?:\.[\w-]+)?\.weight"), "down"),  # PEFT (+ adapter name)
    (re.compile(r"(.+)\.lora_B(?:\.[\w-]+)?\.weight"), "up"),
    (re.compile(r"(.+)\.lora(?:_linear_layer)?\.down\.weight"), "down"),  # diffusers < 0.22
    (re.compile(r"(.+)\.lora(?:_linear_layer)?\.up\.weight"), "up"),
    (re.compile(r"(.+)\.alpha"), "alpha"),
)
_ATTN_PROCESSOR_KEY = re.compile(r"(.+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")  # attn procs
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_")
_UNSUPPORTED_HINT = ("DoRA (lora_magnitude_vector, dora_scale), LoRA biases, LoHa/LoKr/LoCon-CP "
                     "(hada_*, lokr_*, lora_mid) are not supported")


def _parse_key(key: str, bare: bool) -> Optional[tuple[str, str, str]]:
    """(form, module name, part) of a LoRA tensor name; form "kohya" | "diffusers" | "text";
    None if the key is no LoRA tensor we read. ``bare``: keys carry no "unet." prefix."""
    if key.startswith(_TEXT_PREFIXES):
        return "text", "", ""
    if key.startswith("lora_unet_"):
        name, _, rest = key.partition(".")
        return ("kohya", name, _KOHYA_PARTS[rest]) if rest in _KOHYA_PARTS else None
    if key.startswith("unet."):
        key = key[len("unet."):]
    elif not bare:
        return None
    key = key.replace(".processor.", ".")
    m = _ATTN_PROCESSOR_KEY.fullmatch(key)
    if m:
        proj = "to_out.0" if m.group(2) == "to_out" else m.group(2)
        return "diffusers", f"{m.group(1)}.{proj}", m.group(3)
    for pattern, part in _DIFFUSERS_KEYS:
        m = pattern.fullmatch(key)
        if m:
            return "diffusers", m.group(1), part
    return None


def _sgm_names(params: Params) -> dict[str, str]:
    """diffusers module name -> original SD/SGM UNet name (input_blocks/middle_block/output_blocks),
    from the block structure of ``params`` (so any layers_per_block / block types)."""
    p = weights._unfreeze(params)
    count = lambda d, what: sum(1 for k in d if re.fullmatch(rf"{what}_\d+", k))  # noqa: E731
    prefixes = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                "time_embedding.linear_2": "time_embed.2", "conv_out": "out.2"}
    idx = 1
    for b in range(count(p, "down_blocks")):
        blk = p[f"down_blocks_{b}"]
        for j in range(count(blk, "resnets")):
            prefixes[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{idx}.0"
            prefixes[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{idx}.1"
            idx += 1
        if "downsamplers_0" in blk:
            prefixes[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
            idx += 1
    for j in range(count(p.get("mid_block", {}), "resnets")):
        prefixes[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
        prefixes[f"mid_block.attentions.{j}"] = f"middle_block.{2 * j + 1}"
    idx = 0
    for b in range(count(p, "up_blocks")):
        blk = p[f"up_blocks_{b}"]
        n = count(blk, "resnets")
        for j in range(n):
            prefixes[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{idx}.0"
            prefixes[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{idx}.1"
            if j == n - 1 and "upsamplers_0" in blk:
                inner = 2 if f"attentions_{j}" in blk else 1
                prefixes[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{idx}.{inner}.conv"
            idx += 1
    resnet_leaf = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                   "conv_shortcut": "skip_connection"}
    out = {}
    for name in module_names(params):
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            head, tail = ".".join(parts[:n]), parts[n:]
            if head in prefixes:
                if ".resnets." in head and len(tail) == 1:
                    tail = [resnet_leaf.get(tail[0], tail[0])]
                out[name] = ".".join([prefixes[head], *tail])
                break
    return out


def _kohya_names(params: Params) -> dict[str, str]:
    """kohya LoRA name (``lora_unet_`` + module with "_") -> diffusers module name, for the
    diffusers spelling and the original SD/SGM one."""
    names = {n: n for n in module_names(params)}
    names.update({sgm: n for n, sgm in _sgm_names(params).items()})
    return {"lora_unet_" + k.replace(".", "_"): v for k, v in names.items()}


def _metadata_alpha(meta: Mapping[str, Any], name: str, rank: int) -> Optional[float]:
    """The alpha of module ``name`` (factor alpha / r) from diffusers' LoRA metadata, a PEFT
    LoraConfig under "unet." keys: alpha_pattern, else lora_alpha; None without metadata."""
    cfg = {k[len("unet."):]: v for k, v in meta.items() if k.startswith("unet.")}
    if not cfg:
        return None
    if cfg.get("use_dora"):
        raise LoraError(f"the LoRA metadata says use_dora=True: {_UNSUPPORTED_HINT}")
    alpha = cfg.get("lora_alpha")
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():  # PEFT's get_pattern_key
        if re.match(rf"(.*\.)?({pattern})$", name):
            alpha = value
            break
    if alpha is None:
        return None
    if cfg.get("use_rslora"):  # scaling alpha / sqrt(r), as alpha' / r
        return float(alpha) * np.sqrt(rank)
    return float(alpha)


def lora_from_state_dict(state: Mapping[str, Any], params: Params,
                         metadata: Optional[Mapping[str, Any]] = None, source: str = "LoRA") -> Lora:
    """A LoRA tree (alpha folded into ``up``) for ``params`` from diffusers/PEFT or kohya tensors.

    Text-encoder tensors are skipped with a warning; every other problem (a module the UNet
    lacks, a shape that does not fit, an unpaired or unknown tensor) is collected into one
    ``LoraError``.
    """
    names = module_names(params)
    kohya = _kohya_names(params)
    flat = traverse_util.flatten_dict(weights._unfreeze(params))
    bare = not any(k.startswith(("unet.", "lora_unet_") + _TEXT_PREFIXES) for k in state)
    parts: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    unknown, unsupported, problems, text = [], [], [], 0
    for key, t in state.items():
        parsed = _parse_key(key, bare)
        if parsed is None:
            unsupported.append(key)
            continue
        form, name, part = parsed
        if form == "text":
            text += 1
            continue
        if form == "kohya":
            if name not in kohya:
                unknown.append(f"{key} (module {name[len('lora_unet_'):]!r})")
                continue
            name = kohya[name]
        elif name not in names:
            unknown.append(f"{key} (module {name!r})")
            continue
        if part in parts.setdefault(name, {}):
            problems.append(f"{key}: module {name!r} already has a {part} tensor ({parts[name][part][0]})")
            continue
        t = np.asarray(t)
        if part != "alpha" and not weights.is_float(t.dtype):  # cast to float, an int/bool weight is garbage
            problems.append(f"{key}: dtype {t.dtype}, expected a float tensor")
            continue
        parts[name][part] = (key, np.asarray(t, np.float32))

    lora = {}
    for name, got in sorted(parts.items()):
        if "down" not in got or "up" not in got:
            problems.append(f"module {name!r}: has {', '.join(k for k, _ in got.values())} "
                            f"but needs both a down (lora_A) and an up (lora_B) tensor")
            continue
        (kd, a), (ku, b) = got["down"], got["up"]
        kernel = tuple(flat[names[name] + ("kernel",)].shape)
        conv = len(kernel) == 4
        want_a = (a.shape[0], kernel[2], kernel[0], kernel[1]) if conv else (a.shape[0], kernel[0])
        want_b = (kernel[3], a.shape[0], 1, 1) if conv else (kernel[1], a.shape[0])
        if a.shape != want_a or b.shape != want_b:
            problems.append(f"module {name!r}: {kd} {a.shape} and {ku} {b.shape} do not fit its "
                            f"weight {(kernel[3], kernel[2], kernel[0], kernel[1]) if conv else kernel[::-1]}: "
                            f"expected {want_a} and {want_b}")
            continue
        rank = a.shape[0]
        if "alpha" in got:
            alpha = float(np.reshape(got["alpha"][1], -1)[0])
        else:
            alpha = _metadata_alpha(metadata or {}, name, rank)
        scale = 1.0 if alpha is None else alpha / rank
        path = names[name]
        lora[path + ("down",)] = a.transpose(2, 3, 1, 0) if conv else a.T
        lora[path + ("up",)] = (b[:, :, 0, 0].T if conv else b.T) * np.float32(scale)
    if text:
        logging.warning("%s: skipped %d text-encoder LoRA tensors (only UNet LoRA is supported)", source, text)
    if unknown or unsupported or problems or not lora:
        lines = []
        if unknown:
            lines.append(f"modules that are not a Dense/Conv of the UNet ({len(unknown)}): " + ", ".join(unknown))
        if unsupported:
            lines.append(f"tensors that are no LoRA weights we read ({len(unsupported)}; {_UNSUPPORTED_HINT}): "
                         + ", ".join(sorted(unsupported)))
        if problems:
            lines.append(f"mismatches ({len(problems)}): " + "; ".join(problems))
        if not lora and not lines:
            lines.append(f"no UNet LoRA tensors ({len(state)} tensors, {text} of them text-encoder)")
        raise LoraError(f"{source} does not fit the UNet:\n  " + "\n  ".join(lines))
    return traverse_util.unflatten_dict(lora)


# --------------------------------------------------------------------------- files

def _safetensors_metadata(path: str) -> dict[str, Any]:
    """diffusers' ``lora_adapter_metadata`` (a JSON string in the safetensors header), or {}."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    raw = (header.get("__metadata__") or {}).get(LORA_ADAPTER_METADATA_KEY)
    return json.loads(raw) if raw else {}


def lora_file(path: str, weight_name: Optional[str] = None) -> str:
    """The safetensors file ``path`` names: the file itself, or ``weight_name`` (default
    pytorch_lora_weights.safetensors, else the folder's only .safetensors) in a folder."""
    if os.path.isdir(path):
        name = weight_name or LORA_WEIGHT_NAME
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
        found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if weight_name is None and len(found) == 1:
            return os.path.join(path, found[0])
        raise FileNotFoundError(f"LoRA folder {path!r} has no {name}" + (
            f"; pass weight_name=<one of {found}>" if found else f" (found: {sorted(os.listdir(path))})"))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA weights {path!r}: no such file or folder")
    return path


def load_lora(path_or_state: Union[str, Mapping[str, Any]], params: Params,
              weight_name: Optional[str] = None) -> Lora:
    """A LoRA tree for ``params`` from a safetensors file, a folder holding one, or a state dict
    (NaN or inf values load with a warning naming the tensors)."""
    if not isinstance(path_or_state, (str, os.PathLike)):
        state = {k: np.asarray(v) for k, v in path_or_state.items()}
        weights.warn_nonfinite(state, "LoRA state dict")
        return lora_from_state_dict(state, params)
    path = lora_file(os.fspath(path_or_state), weight_name)
    if path.endswith(PICKLE_SUFFIXES):
        raise LoraError(f"{path!r} is a pickled PyTorch file: LoRA weights are read from .safetensors only "
                        f"(pickles are never loaded); convert it to safetensors first")
    try:
        state = weights.read_safetensors(path)
    except WeightsError as e:
        raise LoraError(f"{e}; LoRA weights are read from .safetensors files only") from e
    return lora_from_state_dict(state, params, _safetensors_metadata(path), source=repr(path))
