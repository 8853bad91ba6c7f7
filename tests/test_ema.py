"""The EMA target lives in the optax state and equals the closed-form EMA of the params."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lcm_jax.ema import ema, ema_params


def _run(decay, steps=5, accumulate=1, warmup=False):
    params = {"w": jnp.arange(4.0), "b": {"c": jnp.ones((2, 2))}}
    tx = optax.chain(optax.adam(0.1), ema(decay, warmup=warmup))
    if accumulate > 1:
        tx = optax.MultiSteps(tx, accumulate)
    state = tx.init(params)
    history = [params]
    for i in range(steps * accumulate):
        grads = jax.tree.map(lambda p: jnp.sin(p + i), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        if (i + 1) % accumulate == 0:
            history.append(params)
    return history, state


@pytest.mark.parametrize("accumulate", [1, 3])
def test_ema_matches_closed_form(accumulate):
    mu, s = 0.7, 6
    history, state = _run(mu, s, accumulate)
    # theta^-_s = mu^s theta_0 + sum_i (1 - mu) mu^(s - i) theta_i
    expect = jax.tree.map(lambda *ts: mu ** s * ts[0] + sum((1 - mu) * mu ** (s - i) * t
                                                              for i, t in enumerate(ts) if i > 0), *history)
    got = ema_params(state)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expect)


def test_decay_zero_tracks_params_and_state_holds_target():
    history, state = _run(0.0, 3)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ema_params(state), history[-1])


def test_decay_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="decay"):
        ema(1.5)


def test_warmup_matches_diffusers_ema_model():
    """warmup=True is diffusers' EMAModel (default: no inv_gamma warmup, update_after_step 0)."""
    torch = pytest.importorskip("torch")
    from diffusers.training_utils import EMAModel
    mu, s = 0.99, 7
    history, state = _run(mu, s, warmup=True)
    param = torch.nn.Parameter(torch.tensor(np.asarray(history[0]["w"])))
    model = EMAModel([param], decay=mu)
    for theta in history[1:]:
        param.data = torch.tensor(np.asarray(theta["w"]))
        model.step([param])
    np.testing.assert_allclose(np.asarray(ema_params(state)["w"]), model.shadow_params[0].numpy(), rtol=1e-6, atol=1e-6)
    assert int(state[1].count) == s
