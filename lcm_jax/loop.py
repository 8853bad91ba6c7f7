"""The one training driver: restore, compile, then step, log, check finiteness, checkpoint, stop.

LCD/LCF/CT (trainer.py) and the digits teacher's stages differ in their step function and their
side outputs, not in how a state is restored, a step compiled, driven, logged, checkpointed or
stopped: ``fit`` does all of that for both.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Callable, Optional

import jax
import tqdm

from lcm_jax import sharding
from lcm_jax.checkpoint import Checkpointer, abstract_like
from lcm_jax.data.batcher import Batches
from lcm_jax.errors import Interrupted, UserError


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a non-finite loss or gradient. ``last_good_step``: the newest checkpoint
    whose successor step was finite (None: none is left), which a rerun resumes from."""

    def __init__(self, message: str, step: int, last_good_step: Optional[int] = None):
        super().__init__(message)
        self.step, self.last_good_step = step, last_good_step


def compile_step(step_fn: Callable, state: Any, state_sh: Any, example: dict, batch_size: int,
                 frozen: Any, frozen_sh: Any, mesh) -> Callable:
    """``step_fn(state, batch, frozen)`` compiled ahead of time for the global batch, state donated,
    so a shape error shows before any data is read."""
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in example.items()}
    batch_abstract = {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype, sharding=batch_sh[k])
                      for k, v in example.items()}
    jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh, frozen_sh),
                     out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
    t0 = time.time()
    compiled = jitted.lower(abstract_like(state, state_sh), batch_abstract, frozen).compile()
    logging.info("train step compiled in %.1fs", time.time() - t0)
    sharding.sync_processes("step_compiled")  # first collective comes next: start it together
    return compiled


def check_finite(step: int, metrics: dict) -> None:
    if not bool(jax.device_get(metrics["finite"])):
        m = jax.device_get(metrics)
        raise NonFiniteError(f"non-finite loss or gradient at step {step} (loss={float(m['loss'])}, "
                             f"grad_norm={float(m['grad_norm'])})", step)


class MetricWriter:
    """TensorBoard scalars (DIR/tensorboard) and the same rows in DIR/metrics.jsonl."""

    def __init__(self, directory: str):
        from tensorboardX import SummaryWriter
        os.makedirs(directory, exist_ok=True)
        self.tb = SummaryWriter(os.path.join(directory, "tensorboard"))
        self.jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")

    def write(self, step: int, row: dict, prefix: str = "train") -> None:
        for k, v in row.items():
            self.tb.add_scalar(f"{prefix}/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, **({f"{prefix}/{k}": v for k, v in row.items()}
                                                      if prefix != "train" else row)}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        self.tb.close()
        self.jsonl.close()


def run_loop(compiled: Callable, state: Any, batches: Batches, frozen: Any, *, mesh, num_steps: int,
             log_every: int, ckpt: Checkpointer, config_dict: dict, desc: str,
             writer: Optional[MetricWriter] = None, lr_fn: Optional[Callable[[int], float]] = None,
             after_step: Optional[Callable[[int, Any], Optional[dict]]] = None,
             teacher: Optional[dict] = None) -> Any:
    """Run ``compiled(state, batch, frozen) -> (state, metrics)`` up to ``num_steps``; the final state.

    ``batches`` has ``state()`` (its position, saved with every checkpoint). ``after_step(step,
    state)`` may return extra scalars (an in-loop evaluation) for the log and the progress bar.
    ``teacher``: the pretrained folder's fingerprint, saved with every checkpoint.
    SIGINT or SIGTERM: the current step is saved and ``Interrupted`` raised (a second SIGINT
    aborts at once). A non-finite loss at step t raises NonFiniteError: the checkpoint of step
    t - 1, the state that produced it, is moved aside (``Checkpointer.quarantine``); older
    checkpoints are pruned only once a newer one is known good, so the newest good one stays.
    """
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt now

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    start = int(jax.device_get(state.step))
    pending: Optional[tuple[int, dict]] = None  # (step, metrics) not yet checked finite
    bar = tqdm.tqdm(total=num_steps, initial=start, disable=jax.process_index() != 0, desc=desc)
    postfix: dict = {}
    t_last, n_last = time.time(), start

    def check(step: int, metrics: dict) -> None:
        """Raise on a non-finite step, after moving its predecessor's checkpoint aside; a finite
        one makes every checkpoint before it known good."""
        try:
            check_finite(step, metrics)
        except NonFiniteError as e:
            moved = ckpt.quarantine(step - 1)
            good = ckpt.steps()
            last_good = max(good) if good else None
            where = (f"; the checkpoint of step {step - 1}, whose state produced it, was moved to {moved[0]}"
                     if moved else "")
            raise NonFiniteError(
                f"{e}{where}; the newest good checkpoint is "
                f"{f'step {last_good}' if good else 'none (a rerun starts from step 0)'}: rerun with a lower "
                "learning_rate (or check the data) to resume from it", step, last_good) from None

    def save(step: int) -> None:
        """Called right after ``check(*pending)``, so every step on disk is known good: prune to the
        newest ``keep`` of them (orbax waits for the previous async save here anyway), then write."""
        ckpt.prune()
        ckpt.save(step, state, batches.state(), config_dict, teacher)

    try:
        for step in range(start + 1, num_steps + 1):
            batch = sharding.global_batch(next(batches), mesh)
            state, metrics = compiled(state, batch, frozen)
            if pending is not None:  # check the previous step while this one runs
                check(*pending)
            pending = (step, metrics)
            if step % log_every == 0 or step == num_steps:
                m = jax.device_get(metrics)
                check(step, m)
                rate = (step - n_last) / max(time.time() - t_last, 1e-9)
                t_last, n_last = time.time(), step
                postfix.update(loss=f"{m['loss']:.4g}", steps_per_s=f"{rate:.2f}")
                bad = sum(v for k, v in batches.counts.items() if k.startswith("skipped"))
                if bad:
                    postfix["skipped"] = bad
                if writer is not None:
                    row = {k: float(v) for k, v in m.items()}
                    row["steps_per_s"] = rate
                    if lr_fn is not None:
                        row["lr"] = float(lr_fn(step))
                    row.update({f"data_{k}": v for k, v in batches.counts.items()})
                    writer.write(step, row)
            extra = after_step(step, state) if after_step is not None else None
            if extra:
                postfix.update({k: f"{v:.3g}" for k, v in extra.items()})
                if writer is not None:
                    writer.write(step, extra, prefix="eval")
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if (ckpt.every > 0 and step % ckpt.every == 0) or stop["signal"] is not None:
                check(*pending)
                save(step)
            if stop["signal"] is not None:
                logging.warning("received signal %s: saved step %d, exiting", stop["signal"], step)
                raise Interrupted(stop["signal"], step)
        if pending is not None:
            check(*pending)
        save(num_steps)  # (already there when the loop's last step was a checkpoint step)
        ckpt.prune()  # the end: nothing comes after the final state, the one exported
        return state
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        ckpt.wait()


def fit(step_fn: Callable, state: Any, state_sh: Any, batches: Batches, frozen: Any, *, mesh,
        ckpt: Checkpointer, config_dict: dict, num_steps: int, batch_size: int, log_every: int, desc: str,
        metrics_dir: str = "", lr_fn: Optional[Callable[[int], float]] = None,
        after_step: Optional[Callable[[int, Any], Optional[dict]]] = None,
        teacher: Optional[dict] = None) -> Any:
    """Train ``state`` (built on the mesh: train_state.init_sharded) with ``step_fn(state, batch,
    frozen) -> (state, metrics)`` up to ``num_steps``; returns the final state. ``frozen``: the
    step's constant inputs, placed on the mesh by the partition rules (sharding.put).

    Restores the newest good checkpoint of ``ckpt`` (state and the data position of ``batches``;
    refused for another ``config_dict`` or ``teacher``), compiles the step ahead of time for the
    next batch's shapes, runs ``run_loop`` and closes the checkpointer and the metric writer
    (``metrics_dir``: TensorBoard + metrics.jsonl there, from process 0; empty: none).
    """
    frozen_sh = sharding.tree_shardings(frozen, mesh)  # (as the caller placed it: sharding.put)
    restored = ckpt.restore(abstract_like(state, state_sh), config_dict, teacher)
    if restored is not None:
        state, data_state, step = restored
        batches.restore(data_state)
        logging.info("%s: resumed from step %d (%s)", desc, step, ckpt.directory)
    compiled = compile_step(step_fn, state, state_sh, batches.peek(), batch_size, frozen, frozen_sh, mesh)
    writer = MetricWriter(metrics_dir) if metrics_dir and jax.process_index() == 0 else None
    try:
        return run_loop(compiled, state, batches, frozen, mesh=mesh, num_steps=num_steps, log_every=log_every,
                        ckpt=ckpt, config_dict=config_dict, desc=desc, writer=writer, lr_fn=lr_fn,
                        after_step=after_step, teacher=teacher)
    finally:
        if writer is not None:
            writer.close()
        ckpt.close()
