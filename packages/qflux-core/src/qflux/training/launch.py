"""A multi-process launch that started one process: refused instead of training alone without a word.

``accelerate launch --cpu --num_processes 2 -m qflux train`` (or a config file with ``use_cpu: true`` /
``distributed_type: MULTI_CPU`` and 2 processes, no MPI hostfile) goes through accelerate's *simple*
launcher: it starts **one** process, with ``MASTER_ADDR`` / ``MASTER_PORT`` set for the N it was asked for,
and nothing that tells that process the world size (torchrun sets ``WORLD_SIZE``, mpirun ``PMI_SIZE`` /
``OMPI_COMM_WORLD_SIZE``). That process then trains alone and exits 0. The working form is
``accelerate launch --multi_gpu --num_processes N ...``: torchrun starts N processes, and qflux runs them on
CPU with gloo when there is no GPU (docs/multi-gpu.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from qflux.errors import UserError

# what accelerate reads as the world size (accelerate.state), torchrun's and the MPI implementations'
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
WORKING_FORM = "accelerate launch --multi_gpu --num_processes {n} -m qflux train ..."


def world_size(environ: Mapping[str, str] = os.environ) -> int:
    """The process count the environment gives this process (1 without a distributed launcher)."""
    for name in WORLD_SIZE_VARIABLES:
        value = environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return 1


def _launcher_arguments(pid: int) -> list[str] | None:
    """The command line of process ``pid`` (Linux /proc), or None where it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def requested_processes(arguments: list[str] | None) -> int | None:
    """``--num_processes N`` of an ``accelerate launch`` command line; None when it does not say (a config
    file's count, or no such command line)."""
    if not arguments or "launch" not in arguments:
        return None
    for i, arg in enumerate(arguments):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(arguments) and arguments[i + 1].isdigit():
                return int(arguments[i + 1])
            if arg.startswith(flag + "=") and arg.split("=", 1)[1].isdigit():
                return int(arg.split("=", 1)[1])
    return None


def check_world_size(processes: int | None = None, environ: Mapping[str, str] = os.environ,
                     launcher: list[str] | None = None) -> None:
    """``UserError`` when accelerate's simple launcher was asked for several processes and started this one
    alone. ``processes``: the count this process runs with (``accelerator.num_processes``; by default what the
    environment says); ``launcher``: the parent's command line (read from /proc by default)."""
    processes = world_size(environ) if processes is None else processes
    # The simple launcher always sets ACCELERATE_USE_CPU, and MASTER_ADDR only for more than one process (or
    # machine); a real multi-process launch also sets a world size.
    simple_multi = "ACCELERATE_USE_CPU" in environ and "MASTER_ADDR" in environ
    if processes != 1 or not simple_multi or any(name in environ for name in WORLD_SIZE_VARIABLES):
        return
    asked = requested_processes(_launcher_arguments(os.getppid()) if launcher is None else launcher)
    if asked == 1:  # MASTER_ADDR came from elsewhere (a cluster's environment): one process was asked for
        return
    n = asked or 2
    count = f"{asked} processes" if asked else "several processes"
    raise UserError(f"accelerate launch was asked for {count} but started this one alone: with --cpu (or "
                    "use_cpu / MULTI_CPU in its config) and no MPI hostfile, accelerate's launcher runs a single "
                    f"process, which would train alone. Launch with: {WORKING_FORM.format(n=n)} (without --cpu; "
                    "qflux runs the processes on CPU with gloo when there is no GPU); see docs/multi-gpu.md")
