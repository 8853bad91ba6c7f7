"""The consistency target theta^- as an optax transformation: its state *is* the EMA params.

Chained after the optimizer, it sees the final updates and the pre-update params, so
theta^- <- mu * theta^- + (1 - mu) * (params + updates) is exactly the EMA of the params
after every optimizer step. Inside ``optax.MultiSteps`` it advances only on real steps.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class EmaState(NamedTuple):
    ema_params: Any  # same tree as params, float32


def ema(decay: float) -> optax.GradientTransformation:
    """Track theta^- = EMA(theta) with rate ``decay`` (mu); updates pass through unchanged."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema decay must be in [0, 1], got {decay}")

    def init_fn(params):
        # A real copy: the state must not alias the (donated) params buffers.
        return EmaState(jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("ema() needs params: call optimizer.update(grads, state, params)")
        new_params = optax.apply_updates(params, updates)
        target = jax.tree.map(lambda t, p: decay * t + (1.0 - decay) * p.astype(jnp.float32),
                              state.ema_params, new_params)
        return updates, EmaState(target)

    return optax.GradientTransformation(init_fn, update_fn)


def ema_params(opt_state) -> Any:
    """theta^- out of an optimizer state that contains one ``ema()`` (also under MultiSteps)."""
    found = optax.tree_utils.tree_get(opt_state, "ema_params")
    if found is None:
        raise ValueError("this optimizer state holds no ema() target")
    return found
