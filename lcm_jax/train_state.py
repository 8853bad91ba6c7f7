"""The train state every trainer here shares and the optimizer that updates it.

One pytree (step, params, opt_state, rng), checkpointed whole; the optimizer is clip -> AdamW
(warmup, then constant or cosine) -> the EMA target theta^- held in opt_state (ema.py), with
gradient accumulation by optax.MultiSteps. LCD/LCF/CT (distill.py) and the digits teacher's
stages differ only in the loss they hand to ``apply_loss``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from lcm_jax import sharding
from lcm_jax.ema import ema


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training: one pytree (checkpointed as a whole)."""

    step: jax.Array
    params: Any
    opt_state: Any  # holds theta^- (ema.EmaState); LCM-LoRA: none (the target is the online LoRA)
    rng: jax.Array


LR_SCHEDULES = ("constant", "cosine")


def lr_schedule(config) -> optax.Schedule:
    """Linear warmup over ``warmup_steps``, then constant (diffusers' constant_with_warmup)
    or cosine decay to 0 at ``num_steps`` (``config.lr_schedule``)."""
    kind = config.lr_schedule
    if kind not in LR_SCHEDULES:
        raise ValueError(f"config.lr_schedule {kind!r}: expected one of {LR_SCHEDULES}")
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1),
                                                  max(config.num_steps, config.warmup_steps + 1))
    if config.warmup_steps:  # holds the end value after the warmup
        return optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.constant_schedule(config.learning_rate)


def make_optimizer(config, ema_decay: Optional[float], ema_warmup: bool = False) -> optax.GradientTransformation:
    """clip -> AdamW (``lr_schedule``) -> the EMA target at ``ema_decay`` (None: no EMA, for LCM-LoRA,
    whose target is the online student; ``ema_warmup``: diffusers' EMAModel rate, for models trained
    from scratch); MultiSteps for gradient accumulation. ``config``: the optimizer keys of configs/common.py."""
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        optax.adamw(lr_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                    weight_decay=config.weight_decay),
        optax.identity() if ema_decay is None else ema(ema_decay, warmup=ema_warmup),
    )
    if config.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum)
    return tx


def init_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed))


def init_sharded(params: Any, tx, seed: int, mesh) -> tuple[TrainState, Any]:
    """The train state built on the mesh by the partition rules; (state, its shardings)."""
    init_fn = functools.partial(init_state, tx=tx, seed=seed)
    state_sh = sharding.tree_shardings(jax.eval_shape(init_fn, params), mesh)
    params_sh = sharding.tree_shardings(params, mesh)
    state = jax.jit(init_fn, in_shardings=(params_sh,), out_shardings=state_sh)(sharding.put(params, params_sh))
    return state, state_sh


def apply_loss(state: TrainState, tx: optax.GradientTransformation,
               loss_fn: Callable[[Any], tuple[jax.Array, dict]], rng: jax.Array) -> tuple[TrainState, dict]:
    """One optimizer step on ``loss_fn(params) -> (loss, aux)``; ``rng`` is the next state's key.
    Metrics: loss, grad_norm, ``finite`` (both are; what the loop checks) and ``aux``."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **aux}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics
