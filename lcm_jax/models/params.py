"""The models' dtypes and param trees: shapes without allocating (what strict loading checks
against) and fresh params for the layers a student adds to its teacher."""
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lcm_jax import sharding

from lcm_jax.models.clip import CLIPTextModel
from lcm_jax.models.embeddings import TimestepEmbedding
from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig
from lcm_jax.models.vae import AutoencoderKL

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype: Union[str, Any]) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported: expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def place(params: Any, dtype: Any = None, mesh: Optional[Mesh] = None, device: bool = True) -> Any:
    """A param tree on the device(s): the default device, or over ``mesh`` replicated (sharded by the
    partition rules where fsdp / tensor > 1); its float leaves as ``dtype`` (None: as they are).
    ``device=False``: host numpy arrays (the cast only)."""
    def leaf(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if dtype is None or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(dtype, copy=False) if isinstance(x, np.ndarray) else x.astype(dtype)
    params = jax.tree.map(leaf, params)
    if not device:
        return params
    # straight to the mesh's shardings: no whole copy on the default device first
    return jax.device_put(params) if mesh is None else jax.device_put(params, sharding.tree_shardings(params, mesh))


def init_shapes(module, *args, method=None):
    """Param shapes of ``module`` without allocating (for strict weight loading)."""
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, method=method))["params"]


def unet_shapes(unet: UNet2DConditionModel) -> Any:
    cfg = unet.config
    f = 2 ** (len(cfg.block_out_channels) - 1)
    cross = cfg.cross_attention_dims[0]
    cond = None if cfg.time_cond_proj_dim is None else jnp.zeros((1, cfg.time_cond_proj_dim))
    return init_shapes(unet, jnp.zeros((1, cfg.in_channels, f, f)), jnp.zeros((1,), jnp.int32),
                        jnp.zeros((1, 1, cross)), cond)


def vae_shapes(vae: AutoencoderKL) -> Any:
    size = 2 * vae.config.downsample_factor
    return init_shapes(vae, jnp.zeros((1, vae.config.in_channels, size, size)))


def text_shapes(te: CLIPTextModel) -> Any:
    return init_shapes(te, jnp.zeros((1, 1), jnp.int32))


def init_cond_proj(cfg: UNetConfig, zero_init: bool = True, seed: int = 0) -> Any:
    """Fresh params of a student's new ``time_embedding.cond_proj`` (zeros: student == teacher).

    Only the TimestepEmbedding is initialised; an eager init of the whole UNet costs a minute.
    """
    emb = TimestepEmbedding(cfg.time_embed_dim, cfg.time_cond_proj_dim, zero_init)
    params = emb.init(jax.random.PRNGKey(seed), jnp.zeros((1, cfg.block_out_channels[0])),
                      jnp.zeros((1, cfg.time_cond_proj_dim)))["params"]
    return jax.device_get(params["cond_proj"])
