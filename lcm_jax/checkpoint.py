"""Orbax checkpoints of the train state, the data position and the config; exact resume.

Items per step: ``state`` (step, params, opt_state with theta^-, rng; sharded, every
process writes its part), ``data`` (the iterator position) and ``config`` (JSON). The
teacher is never saved. Restore validates instead of trusting ``latest_step()``: a step
folder that fails to restore (killed mid-write, truncated file) is reported and the next
older one is tried; a config, or a model shape, that disagrees with the checkpoint's is an error.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

# Keys that may change between a run and its resumption (schedule of side effects, layout).
RESUMABLE_KEYS = ("num_steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every",
                  "sample_prompts", "sample_steps", "sample_guidance", "mesh.", "pretrained",
                  "tiny_teacher", "eval_every", "eval.")
# Config sections added after runs were already checkpointed: a checkpoint whose config lacks
# one matches a config that has it switched off (prefix -> (key, off value)), so those runs resume.
ADDED_SECTIONS = {"lora.": ("lora.rank", 0)}


class CheckpointMismatchError(ValueError):
    """The checkpoint in the workdir was written for a different configuration."""


def _flat(config_dict: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in config_dict.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: checkpoint=<a>, now=<b>' for every key that must match on resume but doesn't."""
    a, b = _flat(saved), _flat(json.loads(json.dumps(current)))
    skip = [prefix for prefix, (key, off) in ADDED_SECTIONS.items()
            if not any(k.startswith(prefix) for k in a) and b.get(key, off) == off]
    diffs = []
    for k in sorted(set(a) | set(b)):
        if any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_KEYS + tuple(skip)):
            continue
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            diffs.append(f"{k}: checkpoint={a.get(k, '<absent>')!r}, now={b.get(k, '<absent>')!r}")
    return diffs


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


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` with named items and validated restore."""

    def __init__(self, directory: str, keep: int = 3, every: int = 1000, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=async_save),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})  # known up front: metadata reads before restore

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict, force: bool = False) -> bool:
        if not force and (self.every <= 0 or step % self.every):
            return False
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)), force=True)

    def restore(self, abstract_state: Any, config: dict) -> Optional[tuple[Any, dict, int]]:
        """(state, data_state, step) from the newest valid checkpoint, or None when there is none.

        ``abstract_state``: ShapeDtypeStructs with the shardings to restore onto (any mesh).
        Raises CheckpointMismatchError on a config or param-shape mismatch, and RuntimeError when
        checkpoints exist but none can be restored (never a silent fresh start).
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
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 -- reported and the next older step is tried
                skip(step, "is partial or corrupt", e)
                continue
            return restored["state"], restored["data"], step
        raise RuntimeError(f"checkpoints exist in {self.directory} (steps {steps}) but none could be "
                           "restored; refusing to start from scratch. Errors:\n  " + "\n  ".join(errors))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
