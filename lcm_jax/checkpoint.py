"""Orbax checkpoints of the train state, the data position and the config; exact resume.

Items per step: ``state`` (step, params, opt_state with theta^-, rng; sharded, every
process writes its part), ``data`` (the iterator position), ``config`` (JSON) and
``teacher`` (the pretrained folder's fingerprint). The teacher is never saved. Restore
validates instead of trusting ``latest_step()``: a step folder that fails to restore (killed
mid-write, truncated file) is reported and the next older one is tried; a config, a model
shape or a teacher that disagrees with the checkpoint's is an error.

Retention is ours, not orbax's: a step is pruned only once ``keep`` newer steps are known
good (``prune``), so the newest good state always survives a divergence, and a state found
to produce a non-finite loss is moved aside (``quarantine``), never deleted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Iterable, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from lcm_jax import sharding
from lcm_jax.errors import UserError

# Keys that may change between a run and its resumption (schedule of side effects, layout).
RESUMABLE_KEYS = ("num_steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every",
                  "sample_prompts", "sample_steps", "sample_guidance", "mesh.", "pretrained",
                  "tiny_teacher", "eval_every", "eval.", "export_params",
                  "data.num_threads", "data.worker_count", "data.prefetch") + (  # (the order is the same)
                  # the optimizer settings a user lowers after a divergence: allowed, and logged
                  "learning_rate", "lr_schedule", "warmup_steps", "grad_clip")
OPTIMIZER_KEYS = ("learning_rate", "lr_schedule", "warmup_steps", "grad_clip")
# Config sections added after runs were already checkpointed: a checkpoint whose config lacks
# one matches a config that has it switched off (prefix -> (key, off value)), so those runs resume.
ADDED_SECTIONS = {"lora.": ("lora.rank", 0)}
# Keys declared after runs were already checkpointed (their code defaults moved into configs/common.py):
# absent from a checkpoint's config, they match their default.
ADDED_KEYS = {"data.missing_caption": "empty", "data.split": "train", "data.tfds_name": "",
              "data.image_key": "image", "data.caption_key": "caption"}


class CheckpointMismatchError(UserError, ValueError):
    """The checkpoint in the workdir was written for a different configuration."""


def _flat(config_dict: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config_dict.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _differences(saved: dict, current: dict, keys: Optional[Iterable[str]] = None) -> list[str]:
    """'key: checkpoint=<a>, now=<b>' for the differing keys: those in ``keys`` (default: every key
    that must match on resume)."""
    a, b = _flat(saved), _flat(json.loads(json.dumps(current)))
    skip = [prefix for prefix, (key, off) in ADDED_SECTIONS.items()
            if not any(k.startswith(prefix) for k in a) and b.get(key, off) == off]
    skip += [k for k, default in ADDED_KEYS.items() if k not in a and b.get(k, default) == default]
    match = lambda k, names: any(k == r or (r.endswith(".") and k.startswith(r)) for r in names)  # noqa: E731
    diffs = []
    for k in sorted(set(a) | set(b)):
        if (not match(k, keys)) if keys is not None else match(k, RESUMABLE_KEYS + tuple(skip)):
            continue
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            diffs.append(f"{k}: checkpoint={a.get(k, '<absent>')!r}, now={b.get(k, '<absent>')!r}")
    return diffs


def config_record(config) -> dict:
    """A ConfigDict as the JSON dict a checkpoint records (and a resume compares: config_differences)."""
    return json.loads(config.to_json_best_effort())


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: checkpoint=<a>, now=<b>' for every key that must match on resume but doesn't."""
    return _differences(saved, current)


def fingerprint(folder: str, components: Iterable[str], sample_bytes: int = 1 << 16, samples: int = 16) -> str:
    """A cheap identity of a pipeline folder's ``components`` (sub-folders): every file's path
    relative to ``folder``, its size and, for files over ``samples * sample_bytes``, ``samples``
    evenly spaced chunks (else the whole file). Two trained models of one shape differ in every
    chunk; a moved or copied folder hashes the same. Reads ~1 MB per weight file."""
    h = hashlib.sha256()
    for comp in sorted(components):
        root = os.path.join(folder, comp)
        for dirpath, dirnames, files in os.walk(root):
            dirnames.sort()
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                size = os.path.getsize(path)
                h.update(f"{os.path.relpath(path, folder)}\0{size}\0".encode())
                with open(path, "rb") as f:
                    if size <= samples * sample_bytes:
                        h.update(f.read())
                        continue
                    for i in range(samples):
                        f.seek(i * (size - sample_bytes) // (samples - 1))
                        h.update(f.read(sample_bytes))
    return h.hexdigest()[:32]


def _shapes(tree: Any) -> dict[str, tuple]:
    """'a/b/kernel' -> shape for every array (or orbax ArrayMetadata) leaf of a nested dict."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))  # noqa: E731
    return {"/".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def param_differences(saved_params: Any, params: Any, limit: int = 10) -> list[str]:
    """'path: checkpoint=<shape>, now=<shape>' for the params that differ in presence or shape
    (a checkpoint of another model: its config can agree while ``pretrained`` changed)."""
    a, b = _shapes(saved_params), _shapes(params)
    diffs = [f"params/{k}: checkpoint={a.get(k, '<absent>')}, now={b.get(k, '<absent>')}"
             for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


class CheckpointWriteError(UserError, OSError):
    """Writing a checkpoint failed (disk full, permissions); the older steps are intact."""


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` with named items, validated restore and
    retention that never loses the newest good step (see the module docstring)."""

    def __init__(self, directory: str, keep: int = 3, every: int = 1000, async_save: bool = True):
        if int(keep) < 1:
            raise ValueError(f"keep_checkpoints={keep}: expected >= 1 (the newest steps kept; older ones are "
                             "deleted as training goes on)")
        self.directory = os.path.abspath(directory)
        self.every = every
        self.keep = int(keep)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                                 enable_async_checkpointing=async_save),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler(), "teacher": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def check_within(self, num_steps: int) -> None:
        """A clear error when the workdir already holds a step beyond ``num_steps``: resuming would
        export a later model than asked for (and label it with the smaller number)."""
        beyond = [s for s in self.steps() if s > num_steps]
        if beyond:
            raise CheckpointMismatchError(
                f"config.num_steps={num_steps}, but {self.directory} already holds step {max(beyond)}: set "
                f"num_steps >= {max(beyond)} to continue that run, or use a new --workdir (nothing is deleted)")

    def save(self, step: int, state: Any, data_state: dict, config: dict, teacher: Optional[dict] = None) -> bool:
        """Write ``step`` (async: arrays are copied to the host now, files written in the background).
        A failed write, now or of the previous async save, raises CheckpointWriteError."""
        if step in self.manager.all_steps():
            return False
        items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                     config=ocp.args.JsonSave(config))
        if teacher is not None:
            items["teacher"] = ocp.args.JsonSave(teacher)
        self._check_space(step, state)
        with self._writing(step):
            return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def _check_space(self, step: int, state: Any) -> None:
        """Refuse a write the disk cannot hold before it starts (a write that fails half way leaves
        orbax's background threads printing tracebacks): it needs what the newest step took on
        disk, or the state's raw bytes for the first one. Local folders only."""
        self.wait()  # the previous async save, so the free space is what is left
        if "://" in self.directory:
            return
        steps = _committed_steps(self.directory)
        if steps:
            folder = os.path.join(self.directory, str(steps[-1]))
            needed = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
        else:
            needed = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            raise CheckpointWriteError(
                f"not enough space to write checkpoint step {step} to {self.directory}: it needs about "
                f"{needed / 1e6:.0f} MB and {free / 1e6:.0f} MB are free; the newest intact checkpoint is "
                f"{f'step {steps[-1]}' if steps else 'none'}; free the space and rerun the same command to resume")

    def prune(self) -> None:
        """Delete all but the newest ``keep`` steps; call it once the newest step is known good."""
        self.wait()
        for step in self.steps()[:-self.keep]:
            self.manager.delete(step)

    def quarantine(self, from_step: int) -> list[str]:
        """Move every step >= ``from_step`` out of the resume path into ``<directory>_nonfinite/``
        (kept for inspection, never deleted); returns where they went."""
        self.wait()
        bad = [s for s in self.steps() if s >= from_step]
        moved = []
        if bad and jax.process_index() == 0:
            dest = epath.Path(self.directory + "_nonfinite")
            dest.mkdir(parents=True, exist_ok=True)
            for s in bad:
                target, i = dest / str(s), 1
                while target.exists():  # an earlier divergence at the same step
                    target, i = dest / f"{s}.{i}", i + 1
                (epath.Path(self.directory) / str(s)).rename(target)
                moved.append(str(target))
        if bad:
            sharding.sync_processes("quarantined")  # the others reload after process 0 moved them
            self.manager.reload()
        return moved

    def restore(self, abstract_state: Any, config: dict, teacher: Optional[dict] = None
                ) -> Optional[tuple[Any, dict, int]]:
        """(state, data_state, step) from the newest valid checkpoint, or None when there is none.

        ``abstract_state``: ShapeDtypeStructs with the shardings to restore onto (any mesh).
        ``teacher``: ``{"fingerprint": ..., "path": ...}`` of the pretrained folder, compared with
        the one saved. Raises CheckpointMismatchError on a config, param-shape or teacher mismatch,
        and RuntimeError when checkpoints exist but none can be restored (never a silent fresh start).
        Optimizer settings that changed (``OPTIMIZER_KEYS``) are logged.
        """
        steps = self.steps()
        if not steps:
            return None
        params = abstract_state["params"] if isinstance(abstract_state, dict) else getattr(
            abstract_state, "params", None)
        errors: list[str] = []

        def skip(step: int, what: str, e: Exception) -> None:
            errors.append(f"step {step}: {type(e).__name__}: {e}")
            logging.warning("checkpoint step %d in %s %s (%s); trying an older one", step, self.directory, what, e)

        for step in reversed(steps):
            try:
                saved_config = self.manager.restore(
                    step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
                saved_teacher = None
                if (epath.Path(self.directory) / str(step) / "teacher").exists():
                    saved_teacher = self.manager.restore(
                        step, args=ocp.args.Composite(teacher=ocp.args.JsonRestore()))["teacher"]
                meta = self.manager.item_metadata(step)["state"] if params is not None else None
                saved_params = None if meta is None else getattr(meta, "tree", meta)["params"]
            except Exception as e:  # noqa: BLE001 -- reported and the next older step is tried
                skip(step, "is unreadable", e)
                continue
            diffs = config_differences(saved_config, config)
            if diffs:
                raise CheckpointMismatchError(
                    f"the checkpoint at {self.directory} (step {step}) was written with a different "
                    "config; resume with the same settings or use a new --workdir:\n  " + "\n  ".join(diffs))
            diffs = [] if saved_params is None else param_differences(saved_params, params)
            if diffs:
                raise CheckpointMismatchError(
                    f"the checkpoint at {self.directory} (step {step}) holds a model of another shape "
                    "(was config.pretrained changed?); resume with the same model or use a new "
                    "--workdir:\n  " + "\n  ".join(diffs))
            _check_teacher(saved_teacher, teacher, self.directory, step)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 -- reported and the next older step is tried
                skip(step, "is partial or corrupt", e)
                continue
            for d in _differences(saved_config, config, OPTIMIZER_KEYS):
                logging.warning("resuming step %d with a changed optimizer setting: %s", step, d)
            return restored["state"], restored["data"], step
        raise RuntimeError(f"checkpoints exist in {self.directory} (steps {steps}) but none could be "
                           "restored; refusing to start from scratch. Errors:\n  " + "\n  ".join(errors))

    def wait(self) -> None:
        with self._writing(None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    @contextlib.contextmanager
    def _writing(self, step: Optional[int]):
        """Turn an OS error of a write (this one, or the async one still finishing) into one
        CheckpointWriteError naming the newest intact step."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- raised again as one CheckpointWriteError, the cause chained
            intact = [s for s in _committed_steps(self.directory) if s != step]
            raise CheckpointWriteError(
                f"writing a checkpoint to {self.directory} failed ({_reason(e)}); the newest intact "
                f"checkpoint is {f'step {max(intact)}' if intact else 'none'}; free the space (or fix the "
                "folder) and rerun the same command to resume") from e


def _reason(e: Exception) -> str:
    """The OS's words for a failed write: OSError's, or those of the errno that tensorstore (orbax's
    array writer) puts in its message ("... [os_error_code='28']"); else the message's first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os_error_code='?(\d+)", str(e))
    return os.strerror(int(code.group(1))) if code else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _committed_steps(directory: str) -> list[int]:
    """The steps whose folders orbax has committed (it renames a finished '<step>.orbax-checkpoint-tmp-*')."""
    path = epath.Path(directory)
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def _check_teacher(saved: Optional[dict], now: Optional[dict], directory: str, step: int) -> None:
    if saved is None or now is None:
        if now is not None:
            logging.warning("the checkpoint at %s (step %d) records no teacher fingerprint (written by an older "
                            "version): cannot check that config.pretrained is the teacher it was trained from",
                            directory, step)
        return
    if saved["fingerprint"] != now["fingerprint"]:
        raise CheckpointMismatchError(
            f"the checkpoint at {directory} (step {step}) was trained from another pretrained model: it was "
            f"{saved.get('path')!r} (fingerprint {saved['fingerprint']}), config.pretrained is now {now.get('path')!r} "
            f"(fingerprint {now['fingerprint']}); point config.pretrained at the original or use a new --workdir")


def abstract_like(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
