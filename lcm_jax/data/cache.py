"""The latent + text-embedding cache: encode a data set once with the teacher's VAE and text
encoder, then train from it without running either (``config.data.source = "cache"``).

    python -m lcm_jax.data.cache --config=configs/lcd_512.py --out=DIR [--config.key=value ...]

DIR holds safetensors shards ``shard-00000.safetensors`` with ``latent_mean`` and
``latent_logvar`` [n, C, h, w] (the VAE posterior, not a sample, so training still draws a
fresh latent per step as diffusers does) and ``prompt_embeds`` [n, L, D], the captions in the
shard's metadata; and ``index.json``: format version, the identity (sha256 of config + params)
of the VAE and of the text encoder + tokenizer, resolution, shapes, example count, shards.
Training refuses a cache whose identity or resolution differs from its teacher's. A write goes
to DIR.partial and is renamed to DIR when complete: a killed write never looks like a cache.
The reader (``CacheSource``) imports no JAX, so grain worker processes stay light.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from typing import Any, Optional, Sequence

import numpy as np

from lcm_jax import atomic

FORMAT = "lcm_jax.cache"
VERSION = 1
INDEX = "index.json"
KEYS = ("latent_mean", "latent_logvar", "prompt_embeds")
DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16)}  # storage dtype
_ST_DTYPES = {"F32": np.float32, "F16": np.float16}
# data keys the index of an image cache leaves out: reading speed, and data.source="teacher"'s
_NOT_RECORDED = ("num_threads", "worker_count", "prefetch", "prompts", "num_examples", "teacher_scheduler",
                 "teacher_steps", "teacher_guidance", "teacher_batch")


class CacheMismatchError(ValueError):
    """The cache was written by another VAE / text encoder or at another resolution."""


# ---------------------------------------------------------------------- identity

def _digest(config: dict, params: Any, extra: Any = None) -> str:
    """sha256 of a JSON config, every param leaf (path, shape, float32 bytes, in path order) and
    ``extra``: the same weights give the same digest whatever file format they were read from."""
    from flax import core, traverse_util
    h = hashlib.sha256(json.dumps([config, extra], sort_keys=True, default=str).encode())
    flat = traverse_util.flatten_dict(core.unfreeze(params))
    for path in sorted(flat, key=lambda p: "/".join(map(str, p))):
        a = np.ascontiguousarray(np.asarray(flat[path], np.float32))
        h.update(f"{'/'.join(map(str, path))}:{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return "sha256:" + h.hexdigest()


def model_identity(pipe) -> dict[str, str]:
    """{"vae", "text_encoder"} digests of an LCMPipeline's encoders; the text encoder's includes
    its tokenizer (vocabulary, merges, length), which decides the prompt embeddings too."""
    tok = pipe.tokenizer
    ranks = getattr(tok, "bpe_ranks", {}) or {}
    tokenizer = {"class": type(tok).__name__, "max_length": int(tok.model_max_length),
                 "vocab": sorted(tok.get_vocab().items()),
                 "merges": sorted(((" ".join(k), int(v)) for k, v in ranks.items()), key=lambda kv: kv[1])}
    return {"vae": _digest(dataclasses.asdict(pipe.vae.config), pipe.vae_params),
            "text_encoder": _digest(dataclasses.asdict(pipe.text_encoder.config), pipe.text_params, tokenizer)}


# ---------------------------------------------------------------------- index and checks

def read_index(path: str) -> dict:
    """DIR/index.json, checked to be a complete cache of a format this code reads."""
    hint = (f" ({os.path.normpath(path)}.partial exists: that write did not finish; write it again)"
            if path and os.path.isdir(os.path.normpath(path) + ".partial") else "")
    if not path or not os.path.isdir(path):
        raise ValueError(f"data.path {path!r} is not a folder: expected a cache written by "
                         f"python -m lcm_jax.data.cache --config=... --out=DIR{hint}")
    file = os.path.join(path, INDEX)
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} is not a latent cache: it has no {INDEX}{hint}")
    try:
        with open(file) as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file!r} is not valid JSON ({e})") from e
    if index.get("format") != FORMAT or int(index.get("version", -1)) != VERSION:
        raise ValueError(f"{file!r} is format {index.get('format')!r} version {index.get('version')!r}; "
                         f"this code reads {FORMAT!r} version {VERSION}: write the cache again")
    return index


def check_compatible(path: str, pipe, resolution: int, teacher: str = "the teacher") -> dict:
    """The cache's index, after checking it was made by ``pipe``'s VAE and text encoder at
    ``resolution``; raises CacheMismatchError naming both identities and the cache path."""
    index = read_index(path)
    mine = model_identity(pipe)
    diffs = [f"{k}: cache {index['identity'].get(k)} (made from {index.get('pretrained', '?')!r}), "
             f"{teacher!r} {v}" for k, v in mine.items() if index["identity"].get(k) != v]
    if int(index["resolution"]) != int(resolution):
        diffs.append(f"resolution: cache {index['resolution']}, data.resolution {resolution}")
    f = pipe.vae.config.downsample_factor
    want = [pipe.vae.config.latent_channels, resolution // f, resolution // f]
    if not diffs and list(index["latent_shape"]) != want:
        diffs.append(f"latent shape: cache {index['latent_shape']}, the VAE makes {want}")
    if diffs:
        raise CacheMismatchError(f"the latent cache {path!r} was not made by this model; training from it "
                                 "would use another VAE's latents or another text encoder's embeddings. "
                                 "Write a cache with this teacher, or set pretrained to the cache's:\n  "
                                 + "\n  ".join(diffs))
    return index


def make_index(shards: Sequence[dict], *, identity: dict, resolution: int, latent_shape: Sequence[int],
               embeds_shape: Sequence[int], dtype: str, **info: Any) -> dict:
    """The index.json dict for ``shards`` ({"file", "num_examples", "bytes"}) in cache order."""
    return {"format": FORMAT, "version": VERSION, "identity": dict(identity), "resolution": int(resolution),
            "latent_shape": [int(x) for x in latent_shape], "prompt_embeds_shape": [int(x) for x in embeds_shape],
            "dtype": dtype, "num_examples": int(sum(s["num_examples"] for s in shards)),
            "shards": list(shards), **info}


# ---------------------------------------------------------------------- reading

def _safetensors_header(path: str) -> tuple[dict, int]:
    """(header, offset of the data) of a safetensors file, read without loading its data."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 1 << 30:
            raise ValueError(f"{path!r} is not a safetensors file (header length {n})")
        return json.loads(f.read(n)), 8 + n


class CacheSource:
    """The cache as a grain random-access source: row i -> {"latent_mean", "latent_logvar":
    float32 [C, h, w], "prompt_embeds": float32 [L, D]}. Shards are memory-mapped on first use
    (in each worker process; the maps are not pickled)."""

    def __init__(self, path: str, resolution: Optional[int] = None):
        self.path = path
        self.index = read_index(path)
        if resolution is not None and int(resolution) != int(self.index["resolution"]):
            raise ValueError(f"the cache {path!r} holds {self.index['resolution']}px images but "
                             f"data.resolution is {resolution}")
        self.files = [os.path.join(path, s["file"]) for s in self.index["shards"]]
        for file, s in zip(self.files, self.index["shards"]):
            size = os.path.getsize(file) if os.path.isfile(file) else None
            if size != int(s["bytes"]):
                raise ValueError(f"cache shard {file!r} is {'missing' if size is None else f'{size} bytes'}, "
                                 f"the index says {s['bytes']} bytes: the cache is damaged; write it again")
        self._ends = np.cumsum([int(s["num_examples"]) for s in self.index["shards"]])
        self._maps: dict[int, dict[str, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if s not in self._maps:
            header, base = _safetensors_header(self.files[s])
            maps = {}
            for k in KEYS:
                t = header[k]
                begin = base + int(t["data_offsets"][0])
                maps[k] = np.memmap(self.files[s], _ST_DTYPES[t["dtype"]], "r", offset=begin, shape=tuple(t["shape"]))
            self._maps[s] = maps
        return self._maps[s]

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        s = int(np.searchsorted(self._ends, i, side="right"))
        j = i - (int(self._ends[s - 1]) if s else 0)
        return {k: np.array(v[j], np.float32) for k, v in self._shard(s).items()}

    def captions(self) -> list[str]:
        """Every row's caption, in cache order."""
        out: list[str] = []
        for file in self.files:
            out += json.loads(_safetensors_header(file)[0]["__metadata__"]["captions"])
        return out


# ---------------------------------------------------------------------- writing

class ShardWriter:
    """Rows in, shards of ``shard_size`` rows out (``{prefix}{k:05d}.safetensors``)."""

    def __init__(self, folder: str, shard_size: int = 1024, dtype: str = "float32", prefix: str = "shard-"):
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype {dtype!r}: expected one of {sorted(DTYPES)}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder, self.shard_size, self.dtype, self.prefix = folder, shard_size, DTYPES[dtype][1], prefix
        self.shards: list[dict] = []
        self._rows: dict[str, list[np.ndarray]] = {k: [] for k in KEYS}
        self._captions: list[str] = []

    def add(self, rows: dict, captions: Sequence[str]) -> None:
        """rows: {key: [n, ...]} for every key of KEYS; n captions."""
        n = len(captions)
        for k in KEYS:
            if len(rows[k]) != n:
                raise ValueError(f"{len(rows[k])} rows of {k} for {n} captions")
            self._rows[k] += list(np.asarray(rows[k]).astype(self.dtype))
        self._captions += [str(c) for c in captions]
        while len(self._captions) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        from safetensors.numpy import save_file
        name = f"{self.prefix}{len(self.shards):05d}.safetensors"
        arrays = {k: np.stack(self._rows[k][:n]) for k in KEYS}
        save_file(arrays, os.path.join(self.folder, name),
                  metadata={"format": FORMAT, "captions": json.dumps(self._captions[:n])})
        self.shards.append({"file": name, "num_examples": n,
                            "bytes": os.path.getsize(os.path.join(self.folder, name))})
        self._rows = {k: v[n:] for k, v in self._rows.items()}
        self._captions = self._captions[n:]

    def close(self) -> list[dict]:
        if self._captions:
            self._flush(len(self._captions))
        return self.shards


def _encode_fn(pipe, mesh):
    """jit(params, pixels [B, 3, R, R], ids [B, L]) -> (mean, logvar [B, C, h, w], embeds [B, L, D]),
    the batch split over the mesh; the same calls as distill.encode_batch, so a cached example
    trains exactly as its image does."""
    import jax
    import jax.numpy as jnp
    from lcm_jax import sharding
    vae, te = pipe.vae, pipe.text_encoder

    def encode(params, pixels, ids):
        mean, logvar = vae.apply({"params": params["vae"]}, pixels, method=vae.encode)
        embeds = te.apply({"params": params["text"]}, ids).last_hidden_state
        return mean, logvar, embeds.astype(jnp.float32)

    params = {"vae": pipe.vae_params, "text": pipe.text_params}
    params_sh = sharding.tree_shardings(params, mesh)
    b = sharding.batch_sharding
    fn = jax.jit(encode, in_shardings=(params_sh, b(mesh, 4), b(mesh, 2)),
                 out_shardings=(b(mesh, 4), b(mesh, 4), b(mesh, 3)))
    return fn, sharding.put(params, params_sh)


def finalize(partial: str, out_dir: str, index: dict) -> None:
    """Write ``index`` into the complete folder ``partial`` and rename it to ``out_dir``; an
    existing ``out_dir`` (overwrite) goes only once the new cache is complete."""
    with open(os.path.join(partial, INDEX), "w") as fh:
        json.dump(index, fh, indent=2)
    atomic.publish(partial, out_dir, overwrite=True)


def write_cache(config, out_dir: str, *, pipe=None, batch_size: int = 0, shard_size: int = 1024,
                dtype: str = "float32", overwrite: bool = False) -> dict:
    """Encode one epoch of ``config.data`` (in source order, no caption dropout) with the VAE and
    text encoder of ``config.pretrained`` (or ``pipe``, an LCMPipeline) into the cache ``out_dir``.

    ``batch_size``: global encode batch (0: config.batch_size), padded to the local devices, over
    which it is split (the encoders are replicated: they are small). With several processes each
    encodes its slice on its own devices into its own shards (out_dir on a shared file system).
    Returns the index. Raises ValueError / FileExistsError before any encoding on bad arguments.
    """
    import jax
    import tqdm
    from lcm_jax import sharding
    from lcm_jax.data.pipeline import make_pipeline
    from lcm_jax.data.sources import as_dict
    from lcm_jax.models.clip import tokenize
    from lcm_jax.pipeline import LCMPipeline

    out_dir = os.path.normpath(out_dir)
    if not out_dir or out_dir == ".":
        raise ValueError("--out is empty: name the folder the cache is written to")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir!r} exists; choose another --out or pass --overwrite")
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    data = as_dict(config.data)
    if data.get("source") == "cache":
        raise ValueError(f"data.source is already 'cache' ({data.get('path')!r}): set the images to encode")
    if data.get("random_flip") or not data.get("center_crop", True):
        logging.warning("data.random_flip / center_crop=False: the cache freezes one draw per image "
                        "(training from it sees the same flip and crop every epoch)")
    if pipe is None:
        if not config.get("pretrained"):
            raise ValueError("config.pretrained is empty: the cache is encoded by that pipeline's VAE and "
                             "text encoder (set --config.pretrained=DIR)")
        pipe = LCMPipeline.from_pretrained(config.pretrained, dtype=config.get("dtype", "float32"))
    if pipe.is_sdxl:
        raise ValueError(f"{config.get('pretrained', '') or 'the pipeline'!r} is SDXL: a latent cache does not hold its "
                         "pooled text embeddings yet; train SDXL from images")
    pretrained = config.get("pretrained", "") or "(in memory)"
    pi, pc = jax.process_index(), jax.process_count()
    batch_size = int(batch_size or config.batch_size)
    if batch_size < pc or batch_size % pc:
        raise ValueError(f"cache batch_size {batch_size} is not a positive multiple of the {pc} processes")
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
    local = batch_size // pc
    padded = math.ceil(local / mesh.size) * mesh.size  # every call the same shape: one compile
    batches = make_pipeline(data, lambda c: tokenize(pipe.tokenizer, c, warn_truncated=False), batch_size,
                            int(config.get("seed", 0)), pi, pc, caption_dropout=0.0, num_epochs=1, shuffle=False, drop_remainder=False,
                            keep_captions=True, allgather=None)
    identity = model_identity(pipe)

    partial = atomic.partial_path(out_dir)
    if pi == 0:
        atomic.clear_stale(partial)  # a killed write's (logged)
        os.makedirs(partial)
    sharding.sync_processes("cache_start")
    encode, params = _encode_fn(pipe, mesh)
    writer = ShardWriter(partial, shard_size, dtype, prefix="shard-" if pc == 1 else f"shard-p{pi:03d}-")

    bar = tqdm.tqdm(total=batches.num_examples if pc == 1 else None, unit="img", disable=pi != 0,
                    desc=f"cache {out_dir}")

    def put(x):  # this process's rows, zero-padded to the compiled batch, split over the devices
        x = np.concatenate([x, np.zeros((padded - len(x),) + x.shape[1:], x.dtype)])
        return jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))

    def fetch(pending):
        (mean, logvar, embeds), captions = pending
        n = len(captions)
        writer.add({"latent_mean": np.asarray(mean)[:n], "latent_logvar": np.asarray(logvar)[:n],
                    "prompt_embeds": np.asarray(embeds)[:n]}, captions)
        bar.update(n)

    pending = None
    try:
        for batch in batches:
            out = encode(params, put(batch["pixels"]), put(batch["input_ids"]))
            if pending is not None:  # fetch the previous batch while this one runs
                fetch(pending)
            pending = (out, batch["caption"])
        if pending is not None:
            fetch(pending)
        shards, counts = writer.close(), batches.counts
    finally:
        bar.close()
        batches.close()

    if pc > 1:  # each process's shards, listed by process 0 in process order
        with open(os.path.join(partial, f"process-{pi:03d}.json"), "w") as f:
            json.dump({"shards": shards, "counts": counts}, f)
        sharding.sync_processes("cache_shards_written")
        if pi == 0:
            parts = []
            for p in range(pc):
                with open(os.path.join(partial, f"process-{p:03d}.json")) as f:
                    parts.append(json.load(f))
            shards = [s for part in parts for s in part["shards"]]
            counts = {k: sum(part["counts"][k] for part in parts) for k in counts}
    index = None
    if pi == 0:
        if not shards:
            raise ValueError(f"no usable examples in data.source {data.get('source')!r} at "
                             f"{data.get('path')!r} (counts {counts}); nothing cached")
        res = int(data["resolution"])
        f = pipe.vae.config.downsample_factor
        hidden = pipe.text_encoder.config.hidden_size
        index = make_index(shards, identity=identity, resolution=res,
                           latent_shape=(pipe.vae.config.latent_channels, res // f, res // f),
                           embeds_shape=(pipe.tokenizer.model_max_length, hidden), dtype=dtype,
                           pretrained=pretrained, compute_dtype=str(config.get("dtype", "float32")),
                           data=json.loads(json.dumps({k: v for k, v in data.items() if k not in _NOT_RECORDED})),
                           counts=counts)
        finalize(partial, out_dir, index)
        logging.info("cache: %d examples in %d shards at %s (counts %s)", index["num_examples"],
                     len(shards), out_dir, counts)
    sharding.sync_processes("cache_done")
    return index if index is not None else read_index(out_dir)


# ---------------------------------------------------------------------- CLI

def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "training config (configs/*.py): data, pretrained, dtype",
                                    lock_config=True)
    flags.DEFINE_string("out", None, "cache folder to write (must not exist, unless --overwrite)")
    flags.DEFINE_integer("batch_size", 0, "global encode batch (0: config.batch_size)")
    flags.DEFINE_integer("shard_size", 1024, "examples per shard file")
    flags.DEFINE_enum("dtype", "float32", sorted(DTYPES), "storage dtype of latents and embeddings")
    flags.DEFINE_bool("overwrite", False, "replace an existing cache at --out (once the new one is complete)")
    flags.mark_flags_as_required(["config", "out"])


def main(argv) -> None:
    from absl import app, flags
    from lcm_jax import sharding
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    fl = flags.FLAGS
    sharding.init_distributed()
    index = write_cache(fl.config, fl.out, batch_size=fl.batch_size, shard_size=fl.shard_size,
                        dtype=fl.dtype, overwrite=fl.overwrite)
    print(f"cached {index['num_examples']} examples in {len(index['shards'])} shards at {fl.out}")


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
