"""Writing a sharded run checkpoint (`--fsdp --sharded_checkpoint`): every process writes its own
shards of the model and optimizer state with torch.distributed.checkpoint (DCP), so no process ever
holds the whole model, into a folder named as the ordinary file would be (`checkpoint-<epoch>.pth/`).
Rank 0 adds `run_state.pth` (epoch, step, config, carried heads). The folder is written under a
temporary name and renamed when complete, so a crash leaves the previous checkpoints as they were.
Reading it back, into one process or many: common/sharded_checkpoint.py. Every process must see the
same output folder (a shared file system on several machines)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from common import distributed as dist_util
from common.checkpoint_io import disk_full
from common.errors import UserError
from common.sharded_checkpoint import RUN_STATE
from models.lora import plain_names


def save_sharded_run_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                state: dict[str, Any], carried: dict[str, torch.Tensor] | None) -> Path:
    """Every process calls it with its sharded `model`; `state`: the run state (training/run_checkpoint.py)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    main = dist_util.is_main_process()
    staging = path.with_name(f".{path.name}.tmp")  # one name that every rank derives alike
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    dist_util.barrier()
    shards = {"model": plain_names(get_model_state_dict(model)), "optimizer": get_optimizer_state_dict(model, optimizer)}
    try:
        dcp.save(shards, checkpoint_id=str(staging))
        if main:
            torch.save({**state, "carried": {k: v.detach().cpu() for k, v in (carried or {}).items()}},
                       staging / RUN_STATE)
            _replace_folder(staging, path)
    except Exception as err:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        if disk_full(err, path.parent):
            raise UserError(f"the disk is full while writing {path}; free space or choose another folder (the earlier "
                            f"checkpoints are intact)") from None
        raise
    dist_util.barrier()
    return path


def _replace_folder(complete: Path, path: Path) -> None:
    """`complete` takes `path`'s name; an older checkpoint of that name goes only once it has."""
    old = path.with_name(f".{path.name}.old.tmp")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(complete, path)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()
