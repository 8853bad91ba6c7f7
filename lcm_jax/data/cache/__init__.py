"""The latent + text-embedding cache: encode a data set once with the teacher's VAE and text
encoder, then train from it without running either (``config.data.source = "cache"``).

    python -m lcm_jax.data.cache --config=configs/lcd_512.py --out=DIR [--config.key=value ...]

(the writer: lcm_jax.data.cache.writer, whose ``cli`` that command runs; here: the format and its reader).

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
import os
from typing import Any, Optional, Sequence

import numpy as np

FORMAT = "lcm_jax.cache"
VERSION = 1
INDEX = "index.json"
KEYS = ("latent_mean", "latent_logvar", "prompt_embeds")
DTYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16)}  # storage dtype
_ST_DTYPES = {"F32": np.float32, "F16": np.float16}
# data keys the index of an image cache leaves out: reading speed, and data.source="teacher"'s
NOT_RECORDED = ("num_threads", "worker_count", "prefetch", "prompts", "num_examples", "teacher_scheduler",
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
