"""Run a function in N CPU processes joined by a gloo process group (what torchrun would do)."""
from __future__ import annotations

import os
import socket
import sys
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
