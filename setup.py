"""lcm_jax: Latent Consistency Models (LCD / LCF / few-step sampling) in JAX/Flax."""
from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.4.30",
    "flax>=0.8",
    "optax",
    "orbax-checkpoint",
    "chex",
    "ml-collections",
    "absl-py",
    "safetensors",
    "numpy",
    "pillow",
    "tqdm",
    "transformers",  # CLIPTokenizer only at run time
    "tensorboardX",
    "scikit-learn",  # the embedded digits data set
]

setup(
    name="lcm_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["lcm_jax", "lcm_jax.*"]),
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require={
        # torch pinned exactly: the CPU wheel pip finds here; anything else pulls CUDA.
        "test": ["pytest", "diffusers", "transformers", "torch==2.13.0"],
        "data": ["tensorflow-datasets", "grain"],
    },
)
