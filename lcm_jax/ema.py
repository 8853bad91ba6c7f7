"""The consistency target theta^- as an optax transformation: its state *is* the EMA params.

Chained after the optimizer, it sees the final updates and the pre-update params, so
theta^- <- mu * theta^- + (1 - mu) * (params + updates) is exactly the EMA of the params
after every optimizer step. Inside ``optax.MultiSteps`` it advances only on real steps.
``warmup=True`` is diffusers' ``EMAModel`` rate: a copy at the first update, then
min(mu, (1 + n) / (10 + n)) at the n-th (0-based),
so a short run does not keep a large share of its random initialisation (mu^n of it with a
fixed rate: 13% after 2,000 steps at mu = 0.999). The LCD target keeps the fixed rate (the paper,
diffusers' LCM script): there theta^- starts as the teacher, not as noise.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class EmaState(NamedTuple):
    ema_params: Any  # same tree as params, float32
    count: jax.Array  # int32 [], updates so far


def ema(decay: float, warmup: bool = False) -> optax.GradientTransformation:
    """Track theta^- = EMA(theta) with rate ``decay`` (mu), or diffusers' warmed-up rate;
    updates pass through unchanged."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema decay must be in [0, 1], got {decay}")

    def init_fn(params):
        # A real copy: the state must not alias the (donated) params buffers.
        return EmaState(jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params),
                        jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("ema() needs params: call optimizer.update(grads, state, params)")
        new_params = optax.apply_updates(params, updates)
        mu = jnp.float32(decay)
        if warmup:
            n = state.count.astype(jnp.float32)
            mu = jnp.where(n == 0, 0.0, jnp.minimum(mu, (1.0 + n) / (10.0 + n)))  # the first update copies
        target = jax.tree.map(lambda t, p: mu * t + (1.0 - mu) * p.astype(jnp.float32),
                              state.ema_params, new_params)
        return updates, EmaState(target, state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


def ema_params(opt_state) -> Any:
    """theta^- out of an optimizer state that contains one ``ema()`` (also under MultiSteps)."""
    found = optax.tree_utils.tree_get(opt_state, "ema_params")
    if found is None:
        raise ValueError("this optimizer state holds no ema() target")
    return found
