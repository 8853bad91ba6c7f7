"""LoRA files <-> LoRA trees (lcm_jax.lora): diffusers/PEFT and kohya safetensors, read and written.

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
from typing import Any, Mapping, Optional, Union

import numpy as np
from flax import traverse_util

from lcm_jax import weights
from lcm_jax.lora import Lora, LoraError, Params, adapted, fold_alpha, module_names
from lcm_jax.weights import WeightsError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights default
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
