"""JAX's persistent compilation cache, on by default for train.py and sample.py.

Most of a short run's time is XLA compilation of programs an earlier run already compiled (the
same shapes, other params); with the cache a rerun, a resume or a second sample.py loads them.
Where it lives, first match wins: ``--compile_cache=DIR`` (``off``: no cache), $LCM_JAX_COMPILE_CACHE
(a folder or ``off``), JAX's own $JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/lcm_jax/jax
(~/.cache/lcm_jax/jax). Every program is kept (no minimum compile time), so a rerun compiles nothing
it compiled before. Entries are keyed by the program, the jax/XLA versions and the devices: a stale
one is never used, and the folder may be deleted at any time.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from lcm_jax.errors import UserError

ENV = "LCM_JAX_COMPILE_CACHE"
OFF = "off"


class CompileCacheError(UserError):
    """The compilation cache folder asked for cannot be written."""


def default_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "lcm_jax", "jax")


def _writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def enable(setting: Optional[str] = None) -> Optional[str]:
    """Turn the cache on (call before anything compiles); returns its folder, or None when off.

    ``setting``: the CLI's --compile_cache (None: not given). A folder named by the flag or
    $LCM_JAX_COMPILE_CACHE that cannot be written is an error; an unwritable default only a warning.
    """
    import jax
    chosen = setting if setting is not None else os.environ.get(ENV) or None
    if chosen is not None and chosen.strip().lower() == OFF:
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    path = chosen or jax.config.jax_compilation_cache_dir or default_dir()
    if not _writable(path):
        where = "--compile_cache" if setting is not None else f"${ENV}" if chosen else "the default compile cache"
        if chosen:
            raise CompileCacheError(f"{where}={path!r} cannot be written: expected a writable folder, or 'off'")
        logging.warning("%s %s cannot be written: compiling without a persistent cache", where, path)
        jax.config.update("jax_compilation_cache_dir", None)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
