"""Tiny UNets on both sides (torch and our JAX, the same weights), LCD inputs and a linear
teacher stand-in, shared by the LCD tests (test_distill, test_multistep)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

import sd_models
from lcm_jax import distill
from training import distill_spec
from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig
from lcm_jax.models.params import unet_shapes
from lcm_jax.schedules import NoiseSchedule, alpha_sigma, expand_like
from lcm_jax.weights import torch_to_flax

B, L, D = 4, 5, 32  # batch, text length, text width (tests/sd_models' cross_attention_dim)


class Jitted:
    """A Flax module whose ``apply`` is jitted once and shared by every test (the glue code
    of distill.py then runs eagerly, so each UNet shape compiles only once per session)."""

    def __init__(self, module):
        self.module, self.config, self.apply = module, module.config, jax.jit(module.apply)


def _to_jax(tm, shapes):
    """(our UNet definition, params converted from the torch model onto ``shapes``)."""
    model = UNet2DConditionModel(UNetConfig.from_diffusers_config(dict(tm.config)))
    params, missing = torch_to_flax({k: v.numpy() for k, v in tm.state_dict().items()}, shapes)
    assert missing == []
    return model, params


@functools.lru_cache(maxsize=None)
def _unets():
    """Torch teacher, student (online) and target (EMA) student, each perturbed differently."""
    teacher = sd_models.make_unet(seed=0)
    student = sd_models.make_unet(seed=1, time_cond_proj_dim=256)
    target = sd_models.make_unet(seed=2, time_cond_proj_dim=256)
    return teacher, student, target


@functools.lru_cache(maxsize=None)
def _jax_unets():
    """(teacher, teacher params, student, student params, target params); modules are Jitted."""
    teacher, student, target = _unets()
    shapes = unet_shapes(UNet2DConditionModel(UNetConfig.from_diffusers_config(dict(student.config))))
    s_mod, s_par = _to_jax(student, shapes)
    _, e_par = _to_jax(target, shapes)
    # the teacher is the same UNet without time_embedding.cond_proj (one shape trace, not two)
    t_mod, t_par = _to_jax(teacher, dict(shapes, time_embedding={
        k: v for k, v in shapes["time_embedding"].items() if k != "cond_proj"}))
    return Jitted(t_mod), t_par, Jitted(s_mod), s_par, e_par


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((B, 4, 8, 8)).astype(np.float32)
    cond = rng.standard_normal((B, L, D)).astype(np.float32)
    uncond = rng.standard_normal((1, L, D)).astype(np.float32)
    return latents, cond, uncond



class LinearTeacher:
    """A teacher stand-in whose eps-output is linear in (z, text): it counts its calls."""

    def __init__(self):
        self.calls = []
        self.proj = jnp.asarray(np.random.default_rng(0).standard_normal((D, 4)) * 0.3, jnp.float32)

    def apply(self, variables, z, t, ctx, timestep_cond=None, added_cond_kwargs=None):
        assert timestep_cond is None and added_cond_kwargs is None  # SD1/SD2: no added conditioning
        self.calls.append(z.shape[0])
        k = variables["params"]["scale"] * (0.5 + t.astype(jnp.float32) / 1000.0)
        return k[:, None, None, None] * z + (ctx.mean(axis=1) @ self.proj)[:, :, None, None]


def _lcd_setup(omega, solver="ddim", seed=0):
    schedule = NoiseSchedule.from_scheduler_config(sd_models.scheduler_config())
    spec = distill_spec(omega_min=omega, omega_max=omega, solver=solver)
    latents, cond, uncond = _inputs(seed)
    # cover the shortest interval (t_end = 0) and long ones
    d = distill.draw(jax.random.PRNGKey(seed), latents, spec, schedule)
    d = d._replace(t_start=jnp.array([19, 999, 499, 39], jnp.int32), t_end=jnp.array([0, 979, 479, 19], jnp.int32))
    a, s = alpha_sigma(schedule, d.t_start)
    z = expand_like(a, latents) * latents + expand_like(s, latents) * d.noise
    return schedule, d, z, cond, jnp.broadcast_to(uncond, cond.shape)
