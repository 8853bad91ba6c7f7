"""python -m lcm_jax.data.cache --config=... --out=DIR: encode a data set into a latent cache."""
from lcm_jax.data.cache.writer import cli

cli()
