"""Run a function in N CPU processes joined by a gloo process group (what torchrun would do), or
an entry point under torchrun itself."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    import torch

    from common import distributed as dist_util

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist_util.init_distributed("cpu")
    try:
        fn(rank, world, *args)
        dist_util.barrier()  # no rank tears its connections down while another still uses them
    finally:
        dist_util.cleanup()
    # The work is done and checked by the parent; skip the interpreter's C++ teardown, where a gloo
    # thread still being joined aborted a worker once under load ("terminate called without an
    # active exception", SIGABRT after the test's result was written).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_in_processes(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """`fn(rank, world, *args)` in `world` spawned processes; `fn` must be importable (module level)."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


# torchrun's reports of a worker killed below Python: a segfault, or a C++ abort such as a gloo
# thread still being joined at exit ("terminate called without an active exception", seen in _entry)
NATIVE_CRASHES = ("Signal 11 (SIGSEGV) received", "Signal 6 (SIGABRT) received")


def torchrun(processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
            str(free_port())]


def run_launched(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """An entry point's command (under `torchrun()` or not) on CPU, one thread per process, output
    captured.

    A torchrun worker that dies of a segfault or abort inside torch's gloo/FSDP code is rerun once
    (a new port; its --output_dir emptied unless it auto-resumes), with a warning carrying the
    crash's stack: a segfault happened once in the project's CI (rank 0 of an FSDP fine-tune on a
    2-core machine) and not in 17 reruns of that test here, 11 of them beside two busy processes.
    A run that crashes twice, or fails any other way, is returned as it is, for the test to fail on."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}

    def launch(argv: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                              timeout=timeout)

    result = launch(cmd)
    if result.returncode == 0 or not any(crash in result.stderr for crash in NATIVE_CRASHES):
        return result
    warnings.warn(f"a torchrun worker crashed below Python; rerunning once. Its stack:\n{result.stderr[-4000:]}")
    cmd = list(cmd)
    if "--master_port" in cmd:
        cmd[cmd.index("--master_port") + 1] = str(free_port())
    if "--output_dir" in cmd and "--auto_resume" not in cmd:  # an --auto_resume run continues its folder
        shutil.rmtree(cmd[cmd.index("--output_dir") + 1], ignore_errors=True)
    return launch(cmd)
