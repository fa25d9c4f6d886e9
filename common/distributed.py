"""Every `torch.distributed` call of the project lives here; each collective is reached by every rank."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple[int, int, int]:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set); returns
    (rank, world_size, local_rank). NCCL on CUDA, gloo on CPU."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_initialized():  # joined already (a library call inside a launched script or test harness)
        return rank, world, local
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return rank, world, local


def placement() -> str:
    """Where the processes run, as torchrun describes it: 'N process(es)', and across several
    nodes 'N processes on M nodes (this is node K, HOST)'."""
    import socket

    world = world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    nodes = max(1, world // max(local, 1))
    if nodes == 1:
        return f"{world} process(es)"
    return f"{world} processes on {nodes} nodes (this is node {os.environ.get('GROUP_RANK', '?')}, {socket.gethostname()})"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; the input is untouched)."""
    out = values.clone()
    if is_distributed():
        dist.all_reduce(out)
    return out


def every_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when `flag` is true on every rank (every rank must call it)."""
    if not is_distributed():
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_from_main(tensors) -> None:
    """Rank 0's values into every rank's `tensors`, in place (what DDP does to a model it wraps)."""
    if is_distributed():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (a copy; the input is untouched)."""
    return all_reduce_sum(values) / world_size()


def gather_objects(value):
    """Every rank's picklable `value`, as a list in rank order (`[value]` in one process)."""
    if not is_distributed():
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (rank order); gradients flow back to each
    rank's own slice, so a loss over the gathered batch trains every rank's encoder."""
    if not is_distributed():
        return x
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(x), 0)
