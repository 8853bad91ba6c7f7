"""diffusers/transformers PyTorch state dicts <-> Flax params, by one documented renaming.

The Flax params use the diffusers-Flax (and transformers-Flax for CLIP) names. A Flax path
maps to exactly one PyTorch key:

* path segments are joined with "."; a segment ``<list>_<i>`` whose ``<list>`` is one of
  ``INDEXED`` becomes ``<list>.<i>`` (``down_blocks_0`` -> ``down_blocks.0``);
* attention projections ``query/key/value/proj_attn`` become ``to_q/to_k/to_v/to_out.0``;
* leaves: ``kernel`` -> ``weight`` (Dense: transposed; Conv: HWIO -> OIHW), ``scale`` and
  ``embedding`` -> ``weight``, ``bias`` -> ``bias``; a bare ``nn.Parameter`` in ``PARAMETER_LEAVES``
  keeps its own name (CLIP vision's ``embeddings.class_embedding``).

Loading is strict: every Flax param must be found with the right shape and a float dtype,
and every tensor in the file must be used, else one ``WeightsError`` lists all the problems;
NaN or inf values load with a warning naming the tensors.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util

from lcm_jax.errors import UserError

INDEXED = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "net", "to_out",
})
ATTENTION_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# PyTorch nn.Parameter attributes (not submodules): the key ends in the name itself, no ".weight".
PARAMETER_LEAVES = frozenset({"class_embedding"})
# Buffers some PyTorch checkpoints carry that are not parameters (recomputed here).
IGNORED_TORCH_KEYS = (re.compile(r"(^|\.)position_ids$"),)

Params = Any  # nested dict of arrays


class WeightsError(UserError, ValueError):
    """A checkpoint does not match the model it is loaded into."""


def is_float(dtype: Any) -> bool:
    """Whether ``dtype`` is a floating dtype (bfloat16 included, which numpy's issubdtype misses)."""
    import jax.numpy as jnp
    return bool(jnp.issubdtype(dtype, jnp.floating))


def warn_nonfinite(tensors: Mapping[str, Any], source: str, show: int = 5) -> None:
    """One warning naming the float tensors that hold NaN or inf: a model loaded from them
    computes NaN, and the loss or the sample is the first place it would show."""
    bad = sorted(k for k, v in tensors.items() if is_float(np.asarray(v).dtype)
                 and not np.isfinite(np.asarray(v, np.float32)).all())
    if bad:
        more = f" and {len(bad) - show} more" if len(bad) > show else ""
        logging.warning("%s: tensors with NaN or inf values (%d): %s%s", source, len(bad),
                        ", ".join(bad[:show]), more)


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
    out.append(leaf if leaf in PARAMETER_LEAVES else "bias" if leaf == "bias" else "weight")
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
    """Other spellings of ``key`` in circulation.

    Older diffusers VAE checkpoints name the mid-block attention query/key/value/proj_attn;
    transformers >= 5 saves CLIPTextModel without the ``text_model.`` prefix that the
    published checkpoints (and transformers 4) use.
    """
    if key.startswith("text_model."):
        yield key[len("text_model."):]
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
        if f".{new}." in key:
            yield key.replace(f".{new}.", f".{old}.")


def torch_to_flax(state_dict: Mapping[str, np.ndarray], target: Params,
                  allow_missing: Iterable[tuple[str, ...]] = (),
                  ignore: Iterable[str] = ()) -> tuple[Params, list[tuple[str, ...]]]:
    """Map a PyTorch state dict onto the structure of ``target`` (arrays or ShapeDtypeStructs).

    Returns (params, missing) where ``missing`` are paths in ``allow_missing`` that the file
    lacks (the caller initialises them, e.g. a student's new ``cond_proj``). ``ignore``: keys
    the caller knows the file has and does not use (CLIPModel's ``logit_scale``). Any other
    mismatch raises ``WeightsError`` listing every missing, unexpected and mis-shaped key.
    """
    allow_missing = {tuple(p) for p in allow_missing}
    ignore = set(ignore)
    flat_target = traverse_util.flatten_dict(_unfreeze(target))
    used, out, missing_ok = set(), {}, []
    missing, shape_errors, dtype_errors = [], [], []
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
        if not is_float(t.dtype):  # an int/bool tensor cast to float would load as garbage
            dtype_errors.append(f"{found}: file has {t.dtype}, expected a float tensor")
            continue
        if found != key and path[-1] == "kernel" and t.ndim == 4 and len(ref.shape) == 2:
            t = t[:, :, 0, 0]  # legacy 1x1-conv attention projections
        arr = _to_flax(path[-1], t)
        if tuple(arr.shape) != tuple(ref.shape):
            shape_errors.append(f"{found}: file has {tuple(t.shape)}, model expects "
                                f"{tuple(_to_torch(path[-1], np.empty(ref.shape)).shape)}")
            continue
        out[path] = arr
    unexpected = sorted(k for k in state_dict if k not in used and k not in ignore
                        and not any(p.search(k) for p in IGNORED_TORCH_KEYS))
    if missing or unexpected or shape_errors or dtype_errors:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): " + ", ".join(sorted(missing)))
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if shape_errors:
            lines.append(f"shape mismatches ({len(shape_errors)}): " + "; ".join(shape_errors))
        if dtype_errors:
            lines.append(f"non-float tensors ({len(dtype_errors)}): " + "; ".join(dtype_errors))
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


# --------------------------------------------------------------------------- files

TORCH_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")  # diffusers, transformers
FLAX_WEIGHT_NAMES = ("diffusion_flax_model.msgpack", "flax_model.msgpack")


def _weight_names(base: str, variant: str | None) -> tuple[str, str]:
    """(single file, shard index) names as diffusers/transformers write them for ``variant``:
    ``diffusion_pytorch_model.fp16.safetensors`` and ``diffusion_pytorch_model.safetensors.index.fp16.json``."""
    v = f".{variant}" if variant else ""
    return f"{base}{v}.safetensors", f"{base}.safetensors.index{v}.json"


def _available_variants(names: Iterable[str]) -> list[str]:
    """Variants (``fp16``, ``bf16``, ...) whose PyTorch weights a folder listing holds."""
    bases = "|".join(map(re.escape, TORCH_WEIGHT_NAMES))
    pats = (re.compile(rf"(?:{bases})\.([\w]+)(?:-\d+-of-\d+)?\.safetensors"),
            re.compile(rf"(?:{bases})\.safetensors\.index\.([\w]+)\.json"))
    return sorted({m.group(1) for n in names for p in pats for m in [p.fullmatch(n)] if m})


def _find_weight_files(folder: str, variant: str | None) -> tuple[str, list[str]]:
    """('torch', [safetensors files]) or ('flax', [msgpack file]) for a component folder.

    Order: the requested ``variant``; the default (no variant) weights; Flax msgpack. With no
    ``variant`` and only one variant on disk (a folder saved with ``variant="fp16"`` alone),
    that one is loaded, since the weights are upcast to float32 anyway; with several, the
    caller must choose. A requested variant that is absent falls back to the default weights
    with a warning, as diffusers' pipelines do.
    """
    import json
    import logging
    import os
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"weights folder {folder!r} does not exist")
    names = set(os.listdir(folder))

    def torch_files(v: str | None) -> list[str] | None:
        for base in TORCH_WEIGHT_NAMES:
            single, index = _weight_names(base, v)
            if single in names:
                return [os.path.join(folder, single)]
            if index in names:
                path = os.path.join(folder, index)
                try:
                    with open(path) as f:
                        shards = sorted(set(json.load(f)["weight_map"].values()))
                except (ValueError, KeyError, AttributeError, TypeError) as e:
                    raise WeightsError(f"cannot read shard index {path!r}: expected JSON with a "
                                       f"'weight_map' of tensor name -> shard file ({e!r})") from e
                return [os.path.join(folder, s) for s in shards]
        return None

    files = torch_files(variant) if variant else None
    if files is None:
        files = torch_files(None)
        if files and variant:
            logging.warning("%r has no %r variant weights; loading the default %s", folder, variant,
                            os.path.basename(files[0]))
    if files:
        return "torch", files
    for name in FLAX_WEIGHT_NAMES:
        if name in names:
            return "flax", [os.path.join(folder, name)]
    variants = _available_variants(names)
    if variant is None and len(variants) == 1:
        logging.info("%r has only the %r variant weights; loading them", folder, variants[0])
        return "torch", torch_files(variants[0])
    if variant is None and variants:
        raise FileNotFoundError(f"{folder!r} has no default weights but the variants {variants}: "
                                f"pass variant=<one of them>")
    expected = [n for base in TORCH_WEIGHT_NAMES for n in _weight_names(base, variant)]
    if variant:
        expected += [n for base in TORCH_WEIGHT_NAMES for n in _weight_names(base, None)]
    bins = sorted(n for n in names if n.endswith(".bin"))
    hint = f"; PyTorch pickles ({', '.join(bins)}) are not read: convert them to safetensors" if bins else ""
    raise FileNotFoundError(
        f"no weights in {folder!r} (found: {sorted(names)}); expected one of "
        f"{expected + list(FLAX_WEIGHT_NAMES)}{hint}")


# safetensors dtype -> numpy; bfloat16 (which safetensors.numpy cannot read) via ml_dtypes.
def _np_dtypes() -> dict:
    import ml_dtypes
    return {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
            "BOOL": np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy: float tensors as float32 (fp16/bf16/fp32
    checkpoints alike), integer and bool tensors as they are, so that a loader can refuse them
    where a float parameter is expected. Warns once if any float tensor holds NaN or inf."""
    from safetensors import deserialize
    dtypes = _np_dtypes()
    try:
        with open(path, "rb") as f:
            items = deserialize(f.read())
    except Exception as e:  # name the file; keep the cause
        raise WeightsError(f"cannot read safetensors file {path!r} (truncated or not safetensors?): {e}") from e
    out = {}
    for name, t in items:
        if t["dtype"] not in dtypes:
            raise WeightsError(f"{path!r}: tensor {name!r} has dtype {t['dtype']}, expected one of {sorted(dtypes)}")
        arr = np.frombuffer(t["data"], dtypes[t["dtype"]]).reshape(t["shape"])
        out[name] = arr.astype(np.float32) if is_float(arr.dtype) else arr
    warn_nonfinite(out, repr(path))
    return out


def load_params(folder: str, target: Params, *, allow_missing: Iterable[tuple[str, ...]] = (),
                variant: str | None = None, ignore: Iterable[str] = ()) -> tuple[Params, list[tuple[str, ...]]]:
    """Load a component's weights (safetensors, single or sharded, or Flax msgpack) strictly onto
    ``target``'s tree.

    ``target`` gives the expected structure and shapes (``jax.eval_shape`` of the init);
    ``variant`` (e.g. ``"fp16"``) picks ``*.fp16.safetensors`` files (see ``_find_weight_files``);
    ``ignore``: PyTorch keys (msgpack: "."-joined paths) the file has and the caller does not use.
    Returns float32 numpy params and the ``allow_missing`` paths the file lacked.
    """
    kind, files = _find_weight_files(folder, variant)
    ignore = set(ignore)
    if kind == "torch":
        state = {}
        for f in files:
            state.update(read_safetensors(f))
        return torch_to_flax(state, target, allow_missing, ignore)
    from flax import serialization
    with open(files[0], "rb") as f:
        try:
            tree = serialization.msgpack_restore(f.read())
        except Exception as e:
            raise WeightsError(f"cannot read msgpack file {files[0]!r}: {e}") from e
    if ignore:
        flat = traverse_util.flatten_dict(_unfreeze(tree))
        tree = traverse_util.unflatten_dict({p: v for p, v in flat.items() if ".".join(p) not in ignore})
    return check_tree(tree, target, allow_missing, source=files[0])


def check_tree(tree: Params, target: Params, allow_missing: Iterable[tuple[str, ...]] = (),
               source: str = "params") -> tuple[Params, list[tuple[str, ...]]]:
    """Strictly match a Flax params tree to ``target``; one error lists every difference."""
    allow_missing = {tuple(p) for p in allow_missing}
    flat, ref = traverse_util.flatten_dict(_unfreeze(tree)), traverse_util.flatten_dict(_unfreeze(target))
    missing = [p for p in ref if p not in flat and p not in allow_missing]
    unexpected = [p for p in flat if p not in ref]
    shapes = [f"{'/'.join(p)}: {tuple(np.shape(flat[p]))} vs {tuple(ref[p].shape)}"
              for p in ref if p in flat and tuple(np.shape(flat[p])) != tuple(ref[p].shape)]
    dtypes = [f"{'/'.join(p)}: {np.asarray(flat[p]).dtype}" for p in ref
              if p in flat and not is_float(np.asarray(flat[p]).dtype)]
    if missing or unexpected or shapes or dtypes:
        fmt = lambda ps: ", ".join("/".join(p) for p in ps)  # noqa: E731
        raise WeightsError(f"{source} does not match the model:\n  missing ({len(missing)}): {fmt(missing)}"
                           f"\n  unexpected ({len(unexpected)}): {fmt(unexpected)}"
                           f"\n  shape mismatches ({len(shapes)}): {'; '.join(shapes)}"
                           f"\n  non-float params, expected float ({len(dtypes)}): {'; '.join(dtypes)}")
    warn_nonfinite({"/".join(p): v for p, v in flat.items()}, source)
    params = {p: np.asarray(v, np.float32) for p, v in flat.items()}
    return traverse_util.unflatten_dict(params), [p for p in ref if p not in flat]


def save_params(folder: str, params: Params, config: dict, weights_name: str) -> None:
    """Write ``config.json`` and ``<weights_name>.safetensors`` exactly as diffusers/transformers do."""
    import json
    import os
    from safetensors.numpy import save_file
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(flax_to_torch(params), os.path.join(folder, f"{weights_name}.safetensors"),
              metadata={"format": "pt"})
