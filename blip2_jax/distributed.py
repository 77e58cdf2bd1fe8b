"""Starting a multi-process JAX run: `python -m blip2_jax.main --distributed [...]`.

Three ways to say who the processes are:
- a TPU pod or a SLURM / Open MPI job: no flags; `jax.distributed.initialize()` reads the cluster's
  environment;
- anything else (a cluster without a scheduler integration, several processes on one machine):
  `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, the names of
  `jax.distributed.initialize`'s arguments, all three together.

On CPU the processes exchange collectives through gloo (`jax_cpu_collectives_implementation`);
the setting only concerns the CPU client, so it is made whatever the platform.
"""
from __future__ import annotations

from typing import Optional

import jax


def initialize_kwargs(coordinator_address: Optional[str], num_processes: Optional[int],
                      process_id: Optional[int]) -> dict:
    """The keyword arguments of `jax.distributed.initialize` for the three flags: `{}` when none is
    given (the cluster's environment says), all three when all are; ValueError naming the values
    otherwise."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    if all(v is None for v in given.values()):
        return {}
    missing = [f"--{k}" for k, v in given.items() if v is None]
    if missing:
        shown = " ".join(f"--{k}={v}" for k, v in given.items() if v is not None)
        raise ValueError(f"{shown} needs {' and '.join(missing)} too (give all three of --coordinator_address, "
                         "--num_processes, --process_id, or none on a TPU pod / SLURM)")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator_address={coordinator_address}: expected HOST:PORT, e.g. 127.0.0.1:12345")
    if num_processes < 1:
        raise ValueError(f"--num_processes={num_processes}: must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id}: must be in [0, {num_processes}) "
                         f"(--num_processes={num_processes})")
    return given


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
    """`jax.distributed.initialize` with the flags' arguments (see `initialize_kwargs`), gloo
    collectives on CPU. Call before anything touches a JAX device."""
    kwargs = initialize_kwargs(coordinator_address, num_processes, process_id)
    # Without it the CPU client has no cross-process collectives (a mesh spanning processes fails).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
