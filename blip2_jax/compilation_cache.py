"""A persistent XLA compilation cache, on by default for the command lines.

Compiling is most of the start-up of a run on a small model (the first caption of
`python -m blip2_jax.caption` waits ~20 s for XLA on a 2-core CPU); with the cache a second run of
the same programs loads the executables instead. The directory is, in order: the CLI's
`--compilation_cache=DIR` flag, the `BLIP2_JAX_COMPILATION_CACHE` environment variable, then
`~/.cache/blip2_jax/xla`; an empty value (`--compilation_cache=`, or the variable set to "" / "0" /
"off") turns it off. Entries are keyed by the program, the backend and the jax version, so a stale
entry is never used; the directory can be deleted at any time.
"""
from __future__ import annotations

import os
from typing import Optional

import jax

ENV = "BLIP2_JAX_COMPILATION_CACHE"
DEFAULT_DIRECTORY = "~/.cache/blip2_jax/xla"
_OFF = ("", "0", "off", "false", "none")


def default_directory() -> str:
    """The cache directory when no flag says otherwise ("" = off)."""
    value = os.environ.get(ENV, DEFAULT_DIRECTORY)
    return "" if value.strip().lower() in _OFF else value


def enable(directory: Optional[str] = None) -> str:
    """Turn the persistent cache on in `directory` (None: `default_directory()`; "" = leave it off).
    Returns the directory used ("" when off)."""
    directory = default_directory() if directory is None else directory
    if directory.strip().lower() in _OFF:
        return ""
    path = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Every program counts: on a CPU the small ones are exactly what a repeated start-up recompiles.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
