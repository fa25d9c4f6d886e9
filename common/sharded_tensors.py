"""Weights FSDP holds in shards (DTensors split by rows across the processes), seen from one
process. A penalty over them (self-regularization, L2, EWC) is computed on this rank's rows and
summed over the ranks: no process gathers a whole weight matrix, and each shard's gradient is the
gradient of its own rows' terms, which FSDP adds to the data loss's reduce-scattered gradient. On a
plain tensor (one process, DDP) every function here is the identity, so unsharded runs compute
exactly what they computed before."""
from __future__ import annotations

import torch

from common.distributed import all_reduce_sum


def is_dtensor(value: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def local_part(value: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (no communication; gradients flow into the shard), a plain
    tensor as it is."""
    return value.to_local() if is_dtensor(value) else value


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered (every rank must call this), a plain tensor as it is."""
    return value.full_tensor() if is_dtensor(value) else value


def whole_for_local_rows(value: torch.Tensor) -> torch.Tensor:
    """A (small) DTensor gathered whole on every rank, for a product with this rank's rows of
    another weight (ΔW = B·A needs all of A beside B's rows). The ranks' terms each use it for
    different rows, so its gradient is summed over the ranks back into the shards."""
    if not is_dtensor(value):
        return value
    from torch.distributed.tensor import Partial, Replicate

    count = len(value.placements)
    return value.redistribute(placements=[Replicate()] * count).to_local(grad_placements=[Partial()] * count)


def rows_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The rows of `whole` (a full tensor shaped like the weight `like`) that this rank's shard of
    `like` holds; `whole` itself when `like` is not sharded. FSDP splits dim 0 as torch.chunk
    does, the last ranks holding nothing when there are fewer rows than ranks."""
    if not is_dtensor(like):
        return whole
    from torch.distributed.tensor import Shard

    if tuple(like.placements) != (Shard(0),):
        raise ValueError(f"rows_like expects a weight sharded by rows, not {like.placements}")
    rank, ranks = like.device_mesh.get_local_rank(), like.device_mesh.size()
    chunks = torch.chunk(whole, ranks, dim=0)
    part = chunks[rank] if rank < len(chunks) else whole[:0]
    if part.shape != like.to_local().shape:  # guards the torch.chunk assumption above
        raise ValueError(f"rank {rank}'s rows {tuple(part.shape)} differ from its shard {tuple(like.to_local().shape)}")
    return part


def whole_from_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which every rank holds the rows of its shard of `like` (every rank
    must call this when `like` is sharded); `rows` itself when `like` is not sharded."""
    if not is_dtensor(like):
        return rows
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(rows, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def summed_over_shards(local_total: torch.Tensor, sharded: bool) -> torch.Tensor:
    """A penalty whose value is its sum over every rank's rows and whose gradient is this rank's
    own rows' (each shard's gradient comes from its rows alone). Every rank must call it when
    `sharded`; unsharded, the total is returned as it is."""
    if not sharded:
        return local_total
    rest = all_reduce_sum(local_total.detach()) - local_total.detach()
    return local_total + rest
