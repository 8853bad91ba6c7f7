"""Writing the latent cache (the format: lcm_jax.data.cache): one epoch of a data set encoded by
the teacher's VAE and text encoder into safetensors shards, written under DIR.partial and renamed
into place when complete. The command ``python -m lcm_jax.data.cache`` runs ``cli`` here (cache/__main__.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Sequence

import numpy as np

from lcm_jax import atomic
from lcm_jax.data.batcher import local_batch_size
from lcm_jax.data.cache import DTYPES, FORMAT, INDEX, KEYS, NOT_RECORDED, make_index, model_identity, read_index


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
    from lcm_jax.data.input_pipeline import make_pipeline
    from lcm_jax.data.sources import data_fields
    from lcm_jax.models.clip import tokenize
    from lcm_jax.pipeline import LCMPipeline

    out_dir = os.path.normpath(out_dir)
    if not out_dir or out_dir == ".":
        raise ValueError("--out is empty: name the folder the cache is written to")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir!r} exists; choose another --out or pass --overwrite")
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    data = data_fields(config.data)
    if data["source"] == "cache":
        raise ValueError(f"data.source is already 'cache' ({data['path']!r}): set the images to encode")
    if data["random_flip"] or not data["center_crop"]:
        logging.warning("data.random_flip / center_crop=False: the cache freezes one draw per image "
                        "(training from it sees the same flip and crop every epoch)")
    if pipe is None:
        if not config.pretrained:
            raise ValueError("config.pretrained is empty: the cache is encoded by that pipeline's VAE and "
                             "text encoder (set --config.pretrained=DIR)")
        pipe = LCMPipeline.from_pretrained(config.pretrained, dtype=config.dtype, param_dtype="float32",
                                           on_device=False)  # float32: the identity; placed by the encoder
    if pipe.is_sdxl:
        raise ValueError(f"{config.pretrained or 'the pipeline'!r} is SDXL: a latent cache does not hold its "
                         "pooled text embeddings yet; train SDXL from images")
    pretrained = config.pretrained or "(in memory)"
    pi, pc = jax.process_index(), jax.process_count()
    batch_size = int(batch_size or config.batch_size)
    local = local_batch_size(batch_size, pc, "cache batch_size")
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
    padded = math.ceil(local / mesh.size) * mesh.size  # every call the same shape: one compile
    batches = make_pipeline(data, lambda c: tokenize(pipe.tokenizer, c, warn_truncated=False), batch_size,
                            int(config.seed), pi, pc, caption_dropout=0.0, num_epochs=1, shuffle=False, drop_remainder=False,
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
            raise ValueError(f"no usable examples in data.source {data['source']!r} at "
                             f"{data['path']!r} (counts {counts}); nothing cached")
        res = int(data["resolution"])
        f = pipe.vae.config.downsample_factor
        hidden = pipe.text_encoder.config.hidden_size
        index = make_index(shards, identity=identity, resolution=res,
                           latent_shape=(pipe.vae.config.latent_channels, res // f, res // f),
                           embeds_shape=(pipe.tokenizer.model_max_length, hidden), dtype=dtype,
                           pretrained=pretrained, compute_dtype=str(config.dtype),
                           data=json.loads(json.dumps({k: v for k, v in data.items() if k not in NOT_RECORDED})),
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


def cli() -> None:
    """python -m lcm_jax.data.cache"""
    from absl import app
    _define_flags()
    app.run(main)
