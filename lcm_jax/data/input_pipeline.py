"""The grain input pipeline: source -> shuffle (per epoch) -> this process's slice of each global
batch -> decode and augment in worker threads (or processes) -> skip and count bad examples -> batch -> tokenize.

``make_pipeline(config.data, tokenize_fn, batch_size, seed, process_index, process_count)``
returns a ``InputPipeline``: an iterator of this process's batches
{"pixels": float32 [b, 3, R, R] in [-1, 1], "input_ids": int32 [b, L]} (b = batch_size /
process_count, the Batcher's format; from a latent cache, data.source = "cache", instead
{"latent_mean", "latent_logvar": float32 [b, C, h, w], "prompt_embeds": float32 [b, L, D]},
see lcm_jax.data.cache) whose ``state()`` is a JSON-able dict; ``restore`` of
it continues with exactly the next example (grain's iterator state + the counts; with several
processes, every process's, gathered, so one host's checkpoint restores them all). Shuffle
order and every random draw (crop, flip, caption dropout) are functions of (seed, position
in the one global stream), so they depend neither on the number of threads nor on the number
of processes (tar shards split whole between processes are the exception: there each
process shuffles its own shards).
"""
from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any, Callable, Optional, Sequence, Union

import grain
import numpy as np

from lcm_jax.data import decode
from lcm_jax.data.batcher import local_batch_size
from lcm_jax.data.sources import data_fields, make_source

TokenizeFn = Callable[[Sequence[str]], Union[np.ndarray, dict]]  # captions -> int32 [B, L] (or {key: [B, L]})
AllGather = Callable[[dict], list]  # this process's JSON-able dict -> every process's, in process order


def jax_allgather(obj: dict) -> list:
    """Every JAX process's ``obj`` (a collective: all processes call it at the same point)."""
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    return [json.loads(rows[i, :int(n)].tobytes()) for i, n in enumerate(sizes)]


def _default_allgather(process_count: int) -> Optional[AllGather]:
    """jax_allgather when this runs as one of ``process_count`` JAX processes, else None (one
    process, or several simulated in one, e.g. in tests: each keeps its own state)."""
    jax = sys.modules.get("jax")
    if process_count > 1 and jax is not None and jax.process_count() == process_count:
        return jax_allgather
    return None


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


class InputPipeline:
    """This process's batches, a JSON-able position (``state``/``restore``) and the running
    counts of skipped and repaired examples (``counts``; keys in ``decode.COUNTS``)."""

    def __init__(self, dataset: grain.IterDataset, batch_size: int, tokenize: Callable[[dict], dict], *,
                 num_examples: int, process_index: int, process_count: int, worker_count: int,
                 describe: str, allgather: Optional[AllGather] = None, drop_remainder: bool = True):
        self.num_examples = num_examples  # the examples this process's stream is drawn from (before skips)
        self.describe = describe
        self._allgather = allgather
        self._info = {"process_index": process_index, "process_count": process_count,
                      "worker_count": worker_count}
        self._counts = {k: 0 for k in decode.COUNTS}
        self._run = 0  # consecutive skips; 2N - 1 in a row hold a whole epoch: all are bad
        self._max_run = min(2 * num_examples - 1, 1000)
        self._dataset = (dataset.filter(self._count_and_keep).map(_drop_status)
                         .batch(batch_size, drop_remainder=drop_remainder).map(tokenize))
        self._it: Any = iter(self._dataset)

    def _count_and_keep(self, ex: dict) -> bool:
        """grain filter, run in the consuming thread: count the example, keep it unless skipped."""
        for note in ex["notes"]:
            self._counts[note] += 1
        if ex["status"] == "ok":
            self._counts["examples"] += 1
            self._run = 0
            return True
        self._counts[ex["status"]] += 1
        self._run += 1
        if self._run >= self._max_run:
            raise ValueError(f"data: the last {self._run} examples read were all unusable "
                             f"({self.describe}; counts {self.counts}); check data.path / the files")
        return False

    # ------------------------------------------------------------------ iterator
    def __iter__(self) -> "InputPipeline":
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def peek(self) -> dict:
        """The next batch, leaving the position (and counts) where they were."""
        state = self.local_state()
        batch = next(self)
        self.restore(state)
        return batch

    def start_prefetch(self) -> None:
        """Start decoding in the background (e.g. after restore, while the model compiles)."""
        self._it.start_prefetch()

    @property
    def counts(self) -> dict[str, int]:
        """Examples yielded, skipped (by reason) and repaired so far on this process; cumulative
        over epochs (a bad file met twice counts twice) and carried across restore."""
        return dict(self._counts)

    # ------------------------------------------------------------------ position
    def local_state(self) -> dict:
        """This process's position (JSON-able)."""
        return {"grain": self._it.get_state(), "counts": self.counts, "num_examples": self.num_examples,
                **self._info}

    def state(self) -> dict:
        """JSON-able position: restore(state) continues with exactly the next example.

        With several processes it holds every process's position, {"processes": [...]}, the
        same dict on each (checkpoints write it from the primary host only); getting it is then
        a collective: every process calls state() at the same point, as with saving a checkpoint.
        """
        if self._allgather is None:
            return self.local_state()
        return {"processes": self._allgather(self.local_state())}

    def restore(self, state: dict) -> None:
        if "processes" in state:  # every process's position: take ours
            states, (i, n) = state["processes"], (self._info["process_index"], self._info["process_count"])
            if len(states) != n:
                raise ValueError(f"data state holds {len(states)} processes' positions but this run has "
                                 f"{n} processes: the input position cannot be carried across that change")
            state = states[i]
        if "grain" not in state:
            raise ValueError(f"data state {sorted(state)} was not saved by this pipeline (the in-memory "
                             "Batcher's?): its position cannot be restored here")
        for k, v in self._info.items():
            if int(state.get(k, v)) != v:
                raise ValueError(f"data state was saved with {k}={state[k]} but this run has {k}={v}: "
                                 "the input position cannot be carried across that change")
        if int(state.get("num_examples", self.num_examples)) != self.num_examples:
            logging.warning("data: the checkpoint's source had %s examples on this process, now %d; "
                            "the position continues but the order differs from the original run",
                            state["num_examples"], self.num_examples)
        self._it.set_state(state["grain"])
        self._counts = {k: 0 for k in decode.COUNTS} | {k: int(v) for k, v in state.get("counts", {}).items()}
        self._run = 0

    def close(self) -> None:
        if self._it is not None:
            self._it.close()

    def __enter__(self) -> "InputPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_status(ex: dict) -> dict:
    return {k: v for k, v in ex.items() if k not in ("status", "notes")}


def _tokenize_batch(batch: dict, tokenize_fn: TokenizeFn, keep_captions: bool = False) -> dict:
    """``tokenize_fn(captions)``: ids [B, L] (-> ``input_ids``), or a dict of such arrays by
    batch key (SDXL's two tokenizers: ``input_ids``, ``input_ids_2``)."""
    captions = [str(c) for c in batch["caption"]]
    ids = tokenize_fn(captions)
    out = {"pixels": batch["pixels"]}
    for key, v in (ids.items() if isinstance(ids, dict) else [("input_ids", ids)]):
        v = np.asarray(v)
        if v.ndim != 2 or v.shape[0] != len(captions) or not np.issubdtype(v.dtype, np.integer):
            raise ValueError(f"tokenize_fn must map {len(captions)} captions to integer ids [B, L], "
                             f"got {key}: {v.dtype} {v.shape}")
        out[key] = v.astype(np.int32)
    return {**out, "caption": captions} if keep_captions else out


def _cached_example(record: dict) -> dict:
    """A cache row is already an example (encoded once, nothing to decode or skip)."""
    return {**record, "status": "ok", "notes": ()}


def _no_tokenize(batch: dict) -> dict:
    return batch


def process_slice(ds: grain.MapDataset, local_batch: int, process_index: int,
                  process_count: int) -> grain.MapDataset:
    """Process p's part of every global batch of the stream ``ds``: positions
    [b*B + p*lb, b*B + (p+1)*lb) for global batch b (B = process_count * lb). The processes'
    batches, stacked in process order, are the one-process batches: a run's data and every
    random draw do not depend on how many hosts feed it."""
    if process_count == 1:
        return ds
    lb, big_b = local_batch, local_batch * process_count
    full, rest = divmod(len(ds), big_b)
    n = full * lb + min(max(rest - process_index * lb, 0), lb)
    return grain.MapDataset.range(n).map(functools.partial(_pick, ds=ds, lb=lb, big_b=big_b, p=process_index))


def _pick(j: int, ds: grain.MapDataset, lb: int, big_b: int, p: int) -> Any:
    return ds[(j // lb) * big_b + p * lb + j % lb]  # picklable, for worker processes


def make_pipeline(data_config, tokenize_fn: Optional[TokenizeFn], batch_size: int, seed: int = 0,
                  process_index: int = 0, process_count: int = 1, *,
                  caption_dropout: Optional[float] = None, num_epochs: Optional[int] = None,
                  allgather: Union[AllGather, None, str] = "auto", shuffle: bool = True,
                  drop_remainder: bool = True, keep_captions: bool = False) -> InputPipeline:
    """The training input pipeline for ``data_config`` (``config.data``); see the module doc.

    data_config: every key of sources.DATA_KEYS (configs/common.py declares them with their
    defaults and meanings; a plain dict is built from ``base_config().data``).
    ``caption_dropout``: overrides data_config.caption_dropout (pass 0.0 when the train step
    drops captions itself). ``num_epochs``: None repeats forever. ``allgather``: how ``state()``
    collects every process's position ("auto": over JAX processes when there are several).
    ``shuffle=False``, ``drop_remainder=False``, ``keep_captions=True`` (captions: list[str] in
    each batch) read a source once in its own order, as the cache writer does. ``tokenize_fn``
    is unused (may be None) for a cache, whose batches hold prompt embeddings.
    Raises ValueError (unknown source, wrong path, no examples, bad values) before reading data.
    """
    c = data_fields(data_config)
    resolution = int(c["resolution"])
    if resolution < 1:
        raise ValueError(f"data.resolution must be >= 1, got {c['resolution']}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local_batch = local_batch_size(batch_size, process_count)
    p_drop = decode.check_caption_dropout(float(c["caption_dropout"] if caption_dropout is None else caption_dropout))
    missing = c["missing_caption"]
    if missing not in decode.MISSING_CAPTION:
        raise ValueError(f"data.missing_caption {missing!r}: expected one of {decode.MISSING_CAPTION}")
    num_threads, worker_count = int(c["num_threads"]), int(c["worker_count"])
    if num_threads < 0 or worker_count < 0:
        raise ValueError(f"data.num_threads ({num_threads}) and data.worker_count ({worker_count}) must be >= 0")
    cached = c["source"] == "cache"
    if cached and p_drop > 0:
        raise ValueError(f"data.caption_dropout={p_drop} with data.source='cache': the cache holds prompt "
                         "embeddings, so the train step drops captions (pass caption_dropout=0.0)")
    if tokenize_fn is None and not cached:
        raise ValueError(f"data.source {c['source']!r} yields captions: pass a tokenize_fn")

    fn = functools.partial(decode.preprocess, resolution=resolution, center_crop=bool(c["center_crop"]),
                           random_flip=bool(c["random_flip"]), caption_dropout=p_drop,
                           missing_caption=missing)
    source, sharded = make_source(c, process_index, process_count)
    ds = grain.MapDataset.source(source)
    num_examples = len(ds)
    # tar shards split whole between processes: each shuffles and draws its own; otherwise one
    # global stream, the same for any process count, of which each process reads its slice
    parts = (seed, process_index) if sharded else (seed,)
    if shuffle:
        ds = ds.shuffle(seed=_derive_seed(*parts, 0))
    ds = ds.repeat(num_epochs)
    ds = ds.map(_cached_example) if cached else ds.random_map(fn, seed=_derive_seed(*parts, 1))
    if not sharded:
        ds = process_slice(ds, local_batch, process_index, process_count)
        if len(ds) == 0:
            raise ValueError(f"data.source {c['source']!r} has {num_examples} examples: none for "
                             f"process {process_index} of {process_count}")
    if num_examples < batch_size // (process_count if sharded else 1):
        logging.warning("data: %d examples, fewer than a batch of %d: batches repeat examples",
                        num_examples, batch_size)
    prefetch = int(c["prefetch"]) or 2 * local_batch + num_threads
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    if worker_count:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app, use defaults
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    describe = f"{c['source']} {c['path'] or c['tfds_name']}".strip()
    tokenize = _no_tokenize if cached else functools.partial(_tokenize_batch, tokenize_fn=tokenize_fn,
                                                             keep_captions=keep_captions)
    pipe = InputPipeline(it_ds, local_batch, tokenize, num_examples=num_examples, process_index=process_index,
                    process_count=process_count, worker_count=worker_count, describe=describe,
                    allgather=_default_allgather(process_count) if allgather == "auto" else allgather,
                    drop_remainder=drop_remainder)
    logging.info("data: %s, %d examples on process %d of %d, batch %d per process",
                 describe, num_examples, process_index, process_count, local_batch)
    return pipe
