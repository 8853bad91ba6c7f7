"""lcm_jax: Latent Consistency Models (LCD / LCF / few-step sampling) in JAX/Flax."""
from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.4.30",
    "flax>=0.8",
    "optax",
    "orbax-checkpoint",
    "ml-collections",
    "absl-py",
    "safetensors",
    "numpy",
    "pillow",
    "tqdm",
    "transformers",  # CLIPTokenizer only at run time
    "tensorboardX",
    "scikit-learn",  # the embedded digits data set
    "grain>=0.2.18",  # the input pipeline (lcm_jax/data/input_pipeline.py)
    "matplotlib",  # the digits reproduction's plot
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
        "test": ["pytest", "pytest-xdist", "diffusers", "transformers", "torch==2.13.0",
                 "tensorflow-datasets>=4.9.10",
                 "peft"],  # peft: diffusers' LoRA loading/saving (tests/test_lora.py)
        # pytest-xdist: two workers, one test file each (XLA compiles on one core; tests compile a lot)
        # tensorflow-datasets: data.source=tfds (reads array_record without TensorFlow).
        "data": ["tensorflow-datasets>=4.9.10"],
        # preparing a catalogue data set (tfds.builder(...).download_and_prepare()) needs
        # TensorFlow (~1.3 GB), so it has an extra of its own: pip install -e ".[prepare]"
        "prepare": ["tensorflow-datasets>=4.9.10", "tensorflow-cpu"],
    },
)
