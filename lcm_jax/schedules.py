"""Noise schedule (betas -> alphas_cumprod), timestep lists and LCM's boundary scalings.

Everything here reproduces diffusers' float32 arithmetic (DDIMScheduler, LCMScheduler,
DPMSolverMultistepScheduler, train_lcm_distill_sd_wds.py), so a diffusers checkpoint sees
the same numbers it was trained and sampled with. Timestep lists are numpy int32 (static);
anything indexed by a timestep is a jnp function usable inside jit.
"""
import math
from typing import Any, Mapping, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# config keys that would change the numerics in ways we do not implement: must be falsy
_UNSUPPORTED_FLAGS = ("clip_sample", "thresholding", "rescale_betas_zero_snr", "use_karras_sigmas",
                      "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                      "use_flow_sigmas", "use_dynamic_shifting")


@flax.struct.dataclass
class NoiseSchedule:
    """A VP noise schedule: z_t = sqrt(ac[t]) z_0 + sqrt(1 - ac[t]) eps.

    A pytree: the arrays are leaves, the config values static, so it can be closed over or
    passed through jit. ``timestep_spacing`` is None when the config did not say; the
    samplers then use each diffusers scheduler's own default (DDIM "leading", DPM "linspace").
    """

    alphas_cumprod: jax.Array  # [T] float32
    final_alpha_cumprod: jax.Array  # [] float32: ac "at t=-1" (1.0 if set_alpha_to_one else ac[0])
    num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
    prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
    steps_offset: int = flax.struct.field(pytree_node=False, default=0)
    timestep_spacing: Optional[str] = flax.struct.field(pytree_node=False, default=None)
    original_inference_steps: int = flax.struct.field(pytree_node=False, default=50)
    timestep_scaling: float = flax.struct.field(pytree_node=False, default=10.0)

    @classmethod
    def from_scheduler_config(cls, cfg: Mapping[str, Any]) -> "NoiseSchedule":
        """Builds the schedule from a diffusers ``scheduler_config.json`` dict (any scheduler
        class); missing keys take DDIMScheduler's / LCMScheduler's defaults."""
        for key in _UNSUPPORTED_FLAGS:
            if cfg.get(key):
                raise ValueError(f"scheduler config has {key}={cfg[key]!r}; lcm_jax supports "
                                 f"only {key}=False")
        variance_type = cfg.get("variance_type")
        if variance_type not in (None, "fixed_small"):
            raise ValueError(f"scheduler config has variance_type={variance_type!r}; only "
                             "models predicting the mean (None / 'fixed_small') are supported")
        prediction_type = cfg.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r}, expected one of {PREDICTION_TYPES}")
        spacing = cfg.get("timestep_spacing")
        if spacing is not None and spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing={spacing!r}, expected one of {TIMESTEP_SPACINGS}")
        num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
        if cfg.get("trained_betas") is not None:
            betas = np.asarray(cfg["trained_betas"], dtype=np.float32)
            if betas.shape != (num_train_timesteps,):
                raise ValueError(f"trained_betas has shape {betas.shape}, expected "
                                 f"({num_train_timesteps},)")
        else:
            betas = make_betas(cfg.get("beta_schedule", "linear"), num_train_timesteps,
                               cfg.get("beta_start", 0.0001), cfg.get("beta_end", 0.02))
        # torch.cumprod on CPU accumulates float32 in float64, rounding each output once
        alphas_cumprod = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
        set_alpha_to_one = cfg.get("set_alpha_to_one", True)
        final = np.float32(1.0) if set_alpha_to_one else alphas_cumprod[0]
        return cls(
            alphas_cumprod=jnp.asarray(alphas_cumprod),
            final_alpha_cumprod=jnp.asarray(final, jnp.float32),
            num_train_timesteps=num_train_timesteps,
            prediction_type=prediction_type,
            steps_offset=int(cfg.get("steps_offset", 0)),
            timestep_spacing=spacing,
            original_inference_steps=int(cfg.get("original_inference_steps", 50)),
            timestep_scaling=float(cfg.get("timestep_scaling", 10.0)),
        )


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) bit for bit: a float32 step, the
    first half counted up from start, the second down from end, each with one rounding."""
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    up = np.float64(start32) + step * idx
    down = np.float64(end32) - step * (steps - 1 - idx)
    return np.where(np.arange(steps) < steps // 2, up, down).astype(np.float32)


def make_betas(beta_schedule: str, num_train_timesteps: int, beta_start: float,
               beta_end: float) -> np.ndarray:
    """[T] float32 betas, computed as diffusers' schedulers do."""
    if beta_schedule == "linear":
        return _torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        return _torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        T = num_train_timesteps
        return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999)
                         for i in range(T)], np.float32)
    raise ValueError(f"beta_schedule={beta_schedule!r}, expected one of {BETA_SCHEDULES}")


# --------------------------------------------------------------------------- per-timestep values

def alpha_sigma(schedule: NoiseSchedule, t: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """(alpha_t, sigma_t) = (sqrt(ac[t]), sqrt(1 - ac[t])), shaped like t (int, >= 0)."""
    ac = schedule.alphas_cumprod[jnp.asarray(t)]
    return jnp.sqrt(ac), jnp.sqrt(1.0 - ac)


def expand_like(a: jax.Array, like: jax.Array) -> jax.Array:
    """[B] -> [B, 1, 1, ...] to broadcast against ``like`` [B, ...]; scalars unchanged."""
    a = jnp.asarray(a)
    if a.ndim == 1 and like.ndim > 1:
        return a.reshape(a.shape + (1,) * (like.ndim - 1))
    return a


def to_x0_eps(model_output: jax.Array, z: jax.Array, alpha: jax.Array, sigma: jax.Array,
              prediction_type: str) -> Tuple[jax.Array, jax.Array]:
    """Model output in ``prediction_type`` at (z, alpha, sigma) -> (x0_pred, eps_pred).

    alpha, sigma: scalars or [B] (broadcast over z's trailing axes).
    """
    alpha, sigma = expand_like(alpha, z), expand_like(sigma, z)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (z - sigma * eps) / alpha
    elif prediction_type == "v_prediction":
        x0 = alpha * z - sigma * model_output
        eps = alpha * model_output + sigma * z
    elif prediction_type == "sample":
        x0 = model_output
        eps = (z - alpha * x0) / sigma
    else:
        raise ValueError(f"prediction_type={prediction_type!r}, expected one of {PREDICTION_TYPES}")
    return x0, eps


def from_x0_eps(x0: jax.Array, eps: jax.Array, alpha: jax.Array, sigma: jax.Array,
                prediction_type: str) -> jax.Array:
    """Inverse of ``to_x0_eps``: the model output in ``prediction_type`` for (x0, eps)."""
    alpha, sigma = expand_like(alpha, x0), expand_like(sigma, x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type={prediction_type!r}, expected one of {PREDICTION_TYPES}")


def scalings_for_boundary_conditions(t: jax.Array, sigma_data: float = 0.5,
                                     timestep_scaling: float = 10.0) -> Tuple[jax.Array, jax.Array]:
    """LCM's (c_skip, c_out) at discrete timestep t, as diffusers (training script and
    LCMScheduler): c_skip = sd^2/((t s)^2 + sd^2), c_out = t s / sqrt((t s)^2 + sd^2).
    c_skip(0) = 1, c_out(0) = 0, so f_theta is the identity at t = 0."""
    scaled = jnp.asarray(t).astype(jnp.float32) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / jnp.sqrt(scaled**2 + sigma_data**2)
    return c_skip, c_out


# --------------------------------------------------------------------------- training timesteps

def ddim_timesteps(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> np.ndarray:
    """The N skipping-step timesteps (arange(1, N+1) * (T // N)) - 1 = [19, 39, ..., 999]
    (diffusers' DDIMSolver), ascending int32."""
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(f"num_ddim_timesteps={num_ddim_timesteps} must be in "
                         f"[1, num_train_timesteps={num_train_timesteps}]")
    k = num_train_timesteps // num_ddim_timesteps
    return (np.arange(1, num_ddim_timesteps + 1) * k - 1).astype(np.int32)


def sample_timestep_pair(rng: jax.Array, batch_size: int, num_ddim_timesteps: int = 50,
                         num_train_timesteps: int = 1000,
                         weights: Optional[np.ndarray] = None) -> Tuple[jax.Array, jax.Array]:
    """One LCD training interval per example: n ~ U{0..N-1} (or ~ ``weights`` [N], e.g.
    ``lognormal_pair_weights``), t_start = ddim_timesteps[n], t_end = max(t_start - T // N, 0).
    Returns (t_start, t_end), each [B] int32."""
    table = jnp.asarray(ddim_timesteps(num_train_timesteps, num_ddim_timesteps))
    if weights is None:
        n = jax.random.randint(rng, (batch_size,), 0, num_ddim_timesteps)
    else:
        n = jax.random.categorical(rng, jnp.log(jnp.asarray(weights, jnp.float32)), shape=(batch_size,))
    t_start = table[n]
    t_end = jnp.maximum(t_start - num_train_timesteps // num_ddim_timesteps, 0)
    return t_start, t_end


def lognormal_pair_weights(schedule: NoiseSchedule, num_ddim_timesteps: int, p_mean: float,
                           p_std: float) -> jax.Array:
    """iCT's discretised lognormal over the N intervals (Song & Dhariwal 2023, eq. 10):
    p(n) ~ erf((log sigma_start - P_mean) / (sqrt(2) P_std)) - erf((log sigma_end - P_mean) / ...),
    with sigma = sqrt((1 - ac) / ac) the EDM noise level of a DDPM timestep. [N] float32, sums to 1
    (jnp: the schedule may be traced)."""
    T = schedule.num_train_timesteps
    start = ddim_timesteps(T, num_ddim_timesteps)
    end = np.maximum(start - T // num_ddim_timesteps, 0)
    ac = schedule.alphas_cumprod

    def cdf(t):
        log_sigma = 0.5 * jnp.log((1.0 - ac[t]) / ac[t])
        return erf((log_sigma - p_mean) / (math.sqrt(2.0) * p_std))

    w = cdf(start) - cdf(end)
    return w / jnp.sum(w)


# --------------------------------------------------------------------------- multistep (segments)

def segment_edges(num_ddim_timesteps: int, num_segments: int) -> np.ndarray:
    """Multistep consistency (MLCD): the S segments of the N skipping-step indices, as edges
    e_m = floor(m N / S), m = 0..S; segment m holds indices [e_m, e_{m+1}). [S + 1] int."""
    if not 1 <= num_segments <= num_ddim_timesteps:
        raise ValueError(f"lcd.num_segments={num_segments} must be in [1, num_ddim_timesteps={num_ddim_timesteps}]")
    return (np.arange(num_segments + 1) * num_ddim_timesteps) // num_segments


def segment_boundaries(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50,
                       num_segments: int = 1) -> np.ndarray:
    """For each skipping-step index n, the timestep its multistep consistency function maps to:
    the lower boundary of n's segment, ddim_timesteps[e_m - 1], or -1 (the clean sample, as
    LCD's f) in the lowest segment. S = 1: all -1. [N] int32."""
    table = ddim_timesteps(num_train_timesteps, num_ddim_timesteps)
    edges = segment_edges(num_ddim_timesteps, num_segments)
    seg = np.searchsorted(edges, np.arange(num_ddim_timesteps), side="right") - 1  # [N] segment of n
    lower = edges[seg]
    return np.where(lower > 0, table[np.maximum(lower - 1, 0)], -1).astype(np.int32)


def mlcd_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000,
                   original_inference_steps: int = 50) -> np.ndarray:
    """The multistep consistency sampler's timesteps: the tops of ``num_inference_steps`` equal
    segments of the skipping-step schedule, descending (50 steps of 1000, 4 segments ->
    [999, 739, 499, 239]); each step maps to the next one (the last to the clean sample)."""
    if num_inference_steps is None or not 1 <= num_inference_steps <= original_inference_steps:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, original_inference_steps="
                         f"{original_inference_steps}] (one step per segment of the skipping schedule)")
    table = ddim_timesteps(num_train_timesteps, original_inference_steps)
    edges = segment_edges(original_inference_steps, num_inference_steps)
    return table[edges[1:] - 1][::-1].astype(np.int32)


# --------------------------------------------------------------------------- inference timesteps

def lcm_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000,
                  original_inference_steps: int = 50, strength: float = 1.0) -> np.ndarray:
    """diffusers LCMScheduler.set_timesteps(num_inference_steps, original_inference_steps,
    strength=strength).timesteps, descending int32 (4 steps -> [999, 759, 499, 259])."""
    if num_inference_steps is None or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be a positive int")
    if original_inference_steps > num_train_timesteps:
        raise ValueError(f"original_inference_steps={original_inference_steps} cannot be larger "
                         f"than num_train_timesteps={num_train_timesteps}")
    k = num_train_timesteps // original_inference_steps
    origin = np.arange(1, int(original_inference_steps * strength) + 1) * k - 1
    if num_inference_steps > num_train_timesteps:
        raise ValueError(f"num_inference_steps={num_inference_steps} cannot be larger than "
                         f"num_train_timesteps={num_train_timesteps}")
    if len(origin) // num_inference_steps < 1:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} is larger than original_inference_steps x "
            f"strength = {original_inference_steps} x {strength} = {len(origin)}: the LCM schedule "
            f"is a subset of those timesteps; reduce num_inference_steps or raise strength")
    if num_inference_steps > original_inference_steps:
        raise ValueError(f"num_inference_steps={num_inference_steps} cannot be larger than "
                         f"original_inference_steps={original_inference_steps}")
    origin = origin[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False))
    return origin[idx.astype(np.int64)].astype(np.int32)


def _spacing(schedule: NoiseSchedule, timestep_spacing: Optional[str], default: str) -> str:
    spacing = timestep_spacing or schedule.timestep_spacing or default
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing={spacing!r}, expected one of {TIMESTEP_SPACINGS}")
    return spacing


def ddim_sampling_timesteps(num_inference_steps: int, schedule: NoiseSchedule,
                            timestep_spacing: Optional[str] = None) -> np.ndarray:
    """diffusers DDIMScheduler.set_timesteps(n).timesteps (default spacing "leading"), int32."""
    T = schedule.num_train_timesteps
    n = num_inference_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps={n} must be in [1, num_train_timesteps={T}]")
    spacing = _spacing(schedule, timestep_spacing, "leading")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + schedule.steps_offset
    else:  # trailing
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    return ts.astype(np.int32)


def dpm_sampling_timesteps(num_inference_steps: int, schedule: NoiseSchedule,
                           timestep_spacing: Optional[str] = None) -> np.ndarray:
    """diffusers DPMSolverMultistepScheduler.set_timesteps(n).timesteps (default spacing
    "linspace"; lambda_min_clipped = -inf, no karras/lu sigmas), int32."""
    T = schedule.num_train_timesteps
    n = num_inference_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps={n} must be in [1, num_train_timesteps={T}]")
    spacing = _spacing(schedule, timestep_spacing, "linspace")
    last = T  # lambda_min_clipped = -inf clips nothing
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + schedule.steps_offset
    else:  # trailing
        ts = np.arange(last, 0, -T / n).round().astype(np.int64) - 1
    return ts.astype(np.int32)
