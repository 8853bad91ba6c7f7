"""Psi steps: DDIM against diffusers' DDIMSolver / DDIMScheduler; DPM-Solver(2) and
DPM-Solver++(2) on a linear-Gaussian toy whose PF-ODE solution is known in closed form."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from lcm_jax import solvers
from lcm_jax.schedules import NoiseSchedule, alpha_sigma, expand_like

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
          beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1, clip_sample=False)
SCHEDULE = NoiseSchedule.from_scheduler_config(SD)
MU, STD = 0.3, 0.5  # toy data: x0 ~ N(MU, STD^2 I)


def toy_denoise(z, t):
    """The ideal denoiser for x0 ~ N(MU, STD^2): E[x0 | z_t] and the matching eps."""
    a, s = (expand_like(v, z) for v in alpha_sigma(SCHEDULE, t))
    x0 = MU + a * STD**2 / (a**2 * STD**2 + s**2) * (z - a * MU)
    return x0, (z - a * x0) / s


def toy_exact(z, s, t):
    """The exact PF-ODE map z_s -> z_t for the toy (depends only on the endpoints)."""
    a_s, g_s = (expand_like(v, z) for v in alpha_sigma(SCHEDULE, s))
    a_t, g_t = (expand_like(v, z) for v in alpha_sigma(SCHEDULE, t))
    return a_t * MU + jnp.sqrt(a_t**2 * STD**2 + g_t**2) * (z - a_s * MU) / jnp.sqrt(a_s**2 * STD**2 + g_s**2)


@jax.jit
def _toy_errors(s, t):
    """Mean |Psi(z_s) - exact| per example [B], for each solver."""
    k0, k1 = jax.random.split(jax.random.PRNGKey(0))
    x0 = MU + STD * jax.random.normal(k0, (len(s), 4, 8, 8))
    a, g = (expand_like(v, x0) for v in alpha_sigma(SCHEDULE, s))
    z = a * x0 + g * jax.random.normal(k1, x0.shape)
    exact = toy_exact(z, s, t)
    return {name: jnp.abs(step(toy_denoise, z, s, t, SCHEDULE) - exact).mean((1, 2, 3))
            for name, step in solvers.SOLVERS.items()}


GRIDS = {k: np.arange(999, 0, -k) for k in (20, 50)}  # every interval of a k-skipping grid
SHRINK_STARTS, SHRINK_KS = np.array([499, 259, 99, 39]), (39, 20, 10)


@pytest.fixture(scope="module")
def toy_errors():
    """All toy intervals in one batch (one compile): {(k, s): {solver: error}}."""
    pairs = [(k, int(s)) for k, grid in GRIDS.items() for s in grid]
    pairs += [(k, int(s)) for k in SHRINK_KS for s in SHRINK_STARTS]
    s = np.array([p[1] for p in pairs])
    t = np.maximum(s - np.array([p[0] for p in pairs]), 0)
    err = {k: np.asarray(v) for k, v in _toy_errors(jnp.asarray(s, jnp.int32), jnp.asarray(t, jnp.int32)).items()}
    return {p: {name: err[name][i] for name in err} for i, p in enumerate(pairs)}


@pytest.mark.parametrize("k", [20, 50])
def test_second_order_solvers_beat_ddim(toy_errors, k):
    s = GRIDS[k]
    err = {name: np.array([toy_errors[(k, int(x))][name] for x in s]) for name in solvers.SOLVERS}
    assert np.all(err["dpm"] < err["ddim"]), err
    assert np.all(err["dpm++"] < err["ddim"]), err
    # second order: far below DDIM away from t = 0 (where the step in lambda is largest)
    assert np.all(err["dpm"][s >= 99] < 0.25 * err["ddim"][s >= 99])
    assert np.all(err["dpm++"][s >= 99] < 0.25 * err["ddim"][s >= 99])


def test_errors_shrink_with_the_interval(toy_errors):
    for name in solvers.SOLVERS:
        e = np.array([[toy_errors[(k, int(s))][name] for s in SHRINK_STARTS] for k in SHRINK_KS])
        assert np.all(e[0] > e[1]) and np.all(e[1] > e[2]), (name, e)


def test_ddim_step_matches_diffusers():
    """DDIMSolver.ddim_step (train_lcm_distill_sd_wds.py): x_prev = sqrt(ac_prev) x0 +
    sqrt(1 - ac_prev) eps with ac_prev = ac[t_start - k], ac[0] for the first interval; and
    DDIMScheduler(50 steps).step for an interval away from 0."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    eps_model = rng.standard_normal(z.shape).astype(np.float32)
    s, t = np.array([999, 519, 19]), np.array([979, 499, 0])

    def denoise(z_, t_):  # an eps-prediction model, converted
        a, g = (expand_like(v, z_) for v in alpha_sigma(SCHEDULE, t_))
        return (z_ - g * eps_model) / a, jnp.asarray(eps_model)

    ours = np.asarray(jax.jit(lambda z_: solvers.ddim_step(denoise, z_, s, t, SCHEDULE))(z))
    ac = np.asarray(SCHEDULE.alphas_cumprod)
    x0, eps = (np.asarray(v) for v in jax.jit(denoise)(z, s))
    ac_prev = np.concatenate([[ac[0]], ac[np.arange(19, 1000, 20)[:-1]]])[(s - 19) // 20]  # DDIMSolver
    ref = np.sqrt(ac_prev)[:, None, None, None] * x0 + np.sqrt(1 - ac_prev)[:, None, None, None] * eps
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    # DDIMScheduler's 50-step grid with steps_offset 19 is [999, 979, ..., 19]
    sched = DDIMScheduler.from_config(dict(SD, steps_offset=19))
    sched.set_timesteps(50)
    for i in range(2):
        prev = sched.step(torch.from_numpy(eps_model[i:i + 1]), int(s[i]), torch.from_numpy(z[i:i + 1])).prev_sample
        np.testing.assert_allclose(ours[i:i + 1], prev.numpy(), atol=1e-5)


def test_ddim_step_to_zero_uses_alphas_cumprod_0():
    z = jnp.ones((1, 1, 2, 2))
    x0, eps = jnp.full_like(z, 2.0), jnp.full_like(z, -1.0)
    out = jax.jit(lambda: solvers.ddim_step(lambda z_, t_: (x0, eps), z, jnp.array([19]),
                                           jnp.array([0]), SCHEDULE))()
    ac0 = float(SCHEDULE.alphas_cumprod[0])
    np.testing.assert_allclose(np.asarray(out), 2 * np.sqrt(ac0) - np.sqrt(1 - ac0), rtol=1e-6)


@pytest.mark.parametrize("name", ["ddim", "dpm", "dpm++"])
def test_solver_calls_and_jit(name):
    """Teacher evaluations per step as documented; per-example t; jit-traceable."""
    calls = []

    def denoise(z, t):
        calls.append(t.shape)
        return toy_denoise(z, t)

    step = jax.jit(lambda z, s, t: solvers.get_solver(name)(denoise, z, s, t, SCHEDULE))
    z = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 8, 8))
    s, t = jnp.array([999, 39]), jnp.array([979, 19])
    both = step(z, s, t)
    assert len(calls) == solvers.SOLVER_EVALS[name] and all(c == (2,) for c in calls)
    # each example depends only on its own interval
    swapped = step(z[::-1], s[::-1], t[::-1])
    np.testing.assert_allclose(np.asarray(both), np.asarray(swapped[::-1]), atol=1e-6)


def test_midpoint_is_strictly_inside():
    s = jnp.array([999, 19, 2, 1, 20])
    t = jnp.array([979, 0, 0, 0, 0])
    mid = np.asarray(jax.jit(solvers._midpoint)(SCHEDULE, s, t))
    assert np.all((mid > np.asarray(t))[:4] | (np.asarray(s - t) < 2)[:4])
    assert mid[2] == 1 and mid[3] == 0  # one integer inside; none inside -> t (r = 1)
    assert np.all(mid[[0, 1, 4]] < np.asarray(s)[[0, 1, 4]])


def test_unknown_solver_raises():
    with pytest.raises(ValueError, match="solver"):
        solvers.get_solver("euler")
