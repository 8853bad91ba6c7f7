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
# Identical programs compiled again (every train() call builds its own jit) come from disk.
import tempfile  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "lcm_jax_test_jit_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """A tiny random teacher in diffusers layout (lcm_jax.tiny), shared by the tests that train."""
    from lcm_jax.data.sources import DIGIT_WORDS
    from lcm_jax.tiny import make_tiny_pipeline
    d = str(tmp_path_factory.mktemp("teacher"))
    make_tiny_pipeline(d, DIGIT_WORDS, resolution=16, seed=0)
    return d


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny torch models run ~50x faster on one thread than on two busy cores (spinning workers)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    """A folder of 3 clean images and one of each kind of bad file (tests/image_files.py)."""
    from image_files import make_bad_folder
    return make_bad_folder(tmp_path_factory.mktemp("bad"))


@pytest.fixture
def frozen_keys(monkeypatch):
    """[(batch keys, frozen keys)] of every train step compiled in the test (what is on the devices)."""
    seen = []
    from lcm_jax import loop
    compile_step = loop.compile_step

    def spy(step_fn, state, state_sh, example, batch_size, frozen, *a):
        seen.append((sorted(example), sorted(frozen)))
        return compile_step(step_fn, state, state_sh, example, batch_size, frozen, *a)

    monkeypatch.setattr(loop, "compile_step", spy)
    return seen
