"""Test set-up: 8 fake CPU devices (so sharding is exercised everywhere), fp32 matmuls."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")
# Compile fast (as the flax examples do in tests); numerics stay fp32-exact.
jax.config.update("jax_disable_most_optimizations", True)
