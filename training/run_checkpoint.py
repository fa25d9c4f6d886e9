"""Run checkpoints (`checkpoint-<epoch>.pth`): model, optimizer, scaler, epoch, step and config,
plain tensors and types only, written atomically; and resuming from them. A sharded run's
checkpoint is a folder of the same name (training/sharded_checkpoint.py) and reads back the same."""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from common.checkpoint_io import FORMAT_TAG, Checkpoint, save_torch_atomic
from common.console import say
from common.errors import UserError
from common.sharded_checkpoint import OPTIMIZER_SHARDS, load_optimizer_shards, read_shards
from models.checkpoints import read_model_checkpoint
from models.lora import load_plain_state, plain_names

MID_EPOCH = "mid_epoch"  # the checkpoint entry a step checkpoint (--save_every_steps) adds
# checkpoint-<epoch>.pth: after that epoch; checkpoint-<epoch>-step<B>.pth: within it, after its first B batches
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)(?:-step(\d+))?\.pth$")


def run_checkpoint_path(output_dir: str | Path, epoch: int, name: str | None = None) -> Path:
    return Path(output_dir) / f"checkpoint-{name or epoch}.pth"


def run_state(epoch: int, step: int, scaler: torch.amp.GradScaler | None, backbone_config: dict[str, Any],
              args: dict[str, Any], extra: dict[str, Any] | None = None, info: dict[str, Any] | None = None) -> dict:
    """What a run checkpoint holds besides the model and optimizer state."""
    return {
        "format": FORMAT_TAG,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "backbone_config": backbone_config,
        "args": args,
        **(extra or {}),
        **({"run_info": info} if info else {}),
    }


def save_run_checkpoint(output_dir: str | Path, epoch: int, step: int, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                        backbone_config: dict[str, Any], args: dict[str, Any], extra: dict[str, Any] | None = None,
                        carried: dict[str, torch.Tensor] | None = None, name: str | None = None,
                        info: dict[str, Any] | None = None, gathered: tuple[dict, dict] | None = None) -> Path:
    """`carried`: head weights of earlier stages this mode does not train (kept for later stages);
    `name`: file suffix instead of the epoch (e.g. "best"); `info`: the self-description (run_info);
    `gathered`: (model, optimizer) state of a sharded run, gathered (training/fsdp.py)."""
    path = run_checkpoint_path(output_dir, epoch, name)
    model_state, optimizer_state = gathered or (model.state_dict(), optimizer.state_dict())
    state = {
        "model": {**{k: v.detach().cpu() for k, v in plain_names(model_state).items()}, **(carried or {})},
        "optimizer": optimizer_state,
        **run_state(epoch, step, scaler, backbone_config, args, extra, info),
    }
    save_torch_atomic(state, path)
    return path


def step_checkpoint_name(epoch: int, batches_done: int) -> str:
    return f"{epoch}-step{batches_done}"


def _progress(path: Path) -> tuple[int, float] | None:
    """(epoch, batches done in it; inf for an epoch checkpoint), the order in which checkpoints were written."""
    m = CHECKPOINT_RE.search(path.name)
    return (int(m.group(1)), int(m.group(2)) if m.group(2) else math.inf) if m else None


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = [(order, p) for p in Path(output_dir).glob("checkpoint-*.pth") if (order := _progress(p)) is not None]
    return max(found)[1] if found else None


def prune_step_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Removes step checkpoints written before the newest epoch checkpoint and all but the newest
    `keep` of the rest (a sharded one is a folder); returns what it removed."""
    found = sorted((order, p) for p in Path(output_dir).glob("checkpoint-*.pth") if (order := _progress(p)) is not None)
    last_epoch = max((order for order, _ in found if order[1] == math.inf), default=(-1, math.inf))
    steps = [(order, p) for order, p in found if order[1] != math.inf]
    live = [p for order, p in steps if order > last_epoch]
    removed = [p for order, p in steps if order < last_epoch] + live[:max(len(live) - keep, 0)]
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


def load_run_weights(path: str | Path, model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """The model part of a run checkpoint (a sharded run loads it before sharding)."""
    own = set(plain_names(model.state_dict()))
    missing = sorted(own - set(ckpt.model))
    owned_prefixes = {k.split(".")[0] for k in own}
    unexpected = sorted(k for k in set(ckpt.model) - own if k.split(".")[0] in owned_prefixes)  # others: carried heads
    if missing or unexpected:
        raise UserError(f"--resume {path} does not match this run's model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); resume with the same --exp_name and model flags")
    load_plain_state(model, {k: v for k, v in ckpt.model.items() if k in own})


def load_run_state(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None, ckpt: Checkpoint | None = None) -> int:
    """Restore a run checkpoint (`ckpt`: the file already read); returns the epoch to start from.
    A sharded model already holds the weights (loaded before sharding): only the optimizer state
    is restored into it."""
    from training.fsdp import is_sharded, load_optimizer_state

    ckpt = ckpt or read_model_checkpoint(path)
    shards = ckpt.extra.get(OPTIMIZER_SHARDS)  # a sharded folder's optimizer state, not read yet
    sharded = is_sharded(model)
    if not sharded:
        load_run_weights(path, model, ckpt)
    if ckpt.extra.get("foreign_run"):  # another code base's optimizer state does not map: a fresh one
        return int(ckpt.extra["epoch"]) + 1
    if ("optimizer" not in ckpt.extra and not shards) or "epoch" not in ckpt.extra:
        raise UserError(f"--resume {path} has no optimizer state; it is a weights file, use --init_from or --finetune")
    if shards and not sharded:  # DDP or one process: the whole state, in every process
        ckpt.extra["optimizer"] = read_shards(Path(shards))[1]
    if sharded and shards:
        load_optimizer_shards(Path(shards), model, optimizer)
        say(f"optimizer state read shard by shard from {shards} (each process its own part)")
    elif sharded:
        load_optimizer_state(model, optimizer, ckpt.extra["optimizer"])
    else:
        optimizer.load_state_dict(ckpt.extra["optimizer"])
    if scaler is not None and ckpt.extra.get("scaler"):
        scaler.load_state_dict(ckpt.extra["scaler"])
    return int(ckpt.extra["epoch"]) + 1
