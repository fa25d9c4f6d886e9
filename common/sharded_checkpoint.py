"""Reading a sharded run checkpoint into one process.

`--fsdp --sharded_checkpoint` runs write each checkpoint as a folder (training/sharded_checkpoint.py):
torch.distributed.checkpoint (DCP) shards of the model and optimizer state, one file per process,
plus `run_state.pth` with everything else. The shards are read here as full tensors, the optimizer
state keyed by position; common/checkpoint_io.py adds the run state, so the folder becomes the same
dict an ordinary run checkpoint file holds, and fine-tuning, export and resuming under any number
of processes read it like any checkpoint.

DCP's `.metadata` is a pickle, and so is every non-tensor value in the shards (the optimizer's
param groups), which DCP itself loads with `weights_only=False`. Here the metadata is read with an
unpickler that admits only the classes DCP writes there, and those values only as plain data
(`weights_only=True`), so a crafted folder is refused instead of running its code.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError, first_line

METADATA = ".metadata"
RUN_STATE = "run_state.pth"
# besides DCP's own metadata classes and torch dtypes: what DCP's metadata pickle names
_ALLOWED_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                    ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / METADATA).is_file()


def looks_like_unfinished_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and ((path / RUN_STATE).is_file() or any(path.glob("*.distcp")))


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        admitted = (module == "torch.distributed.checkpoint.metadata" or (module, name) in _ALLOWED_GLOBALS
                    or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not admitted:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeMetadataReader(FileSystemReader):
        forbidden: str | None = None  # what the metadata tried to load (DCP rewraps the error)

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            try:
                with open(Path(self.path) / METADATA, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
                if not isinstance(metadata, Metadata):
                    raise _ForbiddenGlobal(f"a {type(metadata).__name__} instead of DCP metadata")
            except _ForbiddenGlobal as err:
                self.forbidden = f"{METADATA} holds {err}"
                raise
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeMetadataReader(str(path))


def _plain_data_planner(base: type, reader, **kwargs):
    """`base` (a DCP load planner) loading the shards' non-tensor values as plain data only."""

    class PlainDataPlanner(base):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            data = value.read()
            try:  # refuses any class or call a plain value does not need; the same bytes are then safe below
                torch.load(io.BytesIO(data), weights_only=True)
            except pickle.UnpicklingError:
                reader.forbidden = f"a shard holds {read_item.dest_index.fqn} as a pickled object, not plain data"
                raise _ForbiddenGlobal(reader.forbidden) from None
            super().load_bytes(read_item, io.BytesIO(data))

    return PlainDataPlanner(**kwargs)


def position_keyed(by_name: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (DCP's layout) keyed by position instead, as
    `optimizer.state_dict()` is; the positions follow the parameter groups' own order."""
    names = [name for group in by_name["param_groups"] for name in group["params"]]
    position = {name: i for i, name in enumerate(names)}
    return {"state": {position[name]: value for name, value in by_name["state"].items()},
            "param_groups": [{**g, "params": [position[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def _cause(err: BaseException) -> BaseException:
    """DCP wraps a reader's error in a CheckpointException holding (error, traceback) per rank."""
    for failure in getattr(err, "failures", {}).values():
        return failure[0] if isinstance(failure, tuple) else failure
    return err


OPTIMIZER_SHARDS = "optimizer_shards"  # a checkpoint's extra: the folder its optimizer state is left in


def _unreadable(path: Path, reader, err: BaseException) -> UserError:
    """The sentence for a folder DCP could not read: a forbidden metadata class, or a missing or cut shard."""
    if reader.forbidden:
        return UserError(f"{path}: {reader.forbidden}, which DCP never writes, and this project never unpickles "
                         f"code; re-save the checkpoint with --fsdp --sharded_checkpoint")
    return UserError(f"{path} is not a readable sharded checkpoint ({first_line(str(_cause(err)))}); a shard file "
                     f"may be missing or truncated: copy the whole folder again")


def read_shards(path: Path, optimizer: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(full model tensors, optimizer state keyed by position, or None when `optimizer` is False)
    of the folder, in this process alone (no process group is needed or used)."""
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    shards: dict[str, Any] = {}
    reader = _safe_reader(path)
    parts = ("model", "optimizer") if optimizer else ("model",)
    try:
        planner = _plain_data_planner(_EmptyStateDictLoadPlanner, reader, keys=set(parts))
        _load_state_dict(shards, storage_reader=reader, planner=planner, no_dist=True)
    except (Exception, CheckpointException) as err:  # a missing or cut shard: any of DCP's or torch.load's errors
        raise _unreadable(path, reader, err) from None
    if not all(isinstance(shards.get(part), dict) for part in parts):
        raise UserError(f"{path} holds no model and optimizer shards; it was not written by --sharded_checkpoint")
    return shards["model"], position_keyed(shards["optimizer"]) if optimizer else None


def load_optimizer_shards(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The folder's optimizer state into a sharded model's optimizer, each process reading only the
    parts of the shards it holds (DCP reshards when the number of processes changed); every rank
    calls it. The whole optimizer state is never in one process."""
    from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, load
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # its layout, zero-filled, to read into
    reader = _safe_reader(path)
    try:
        load(state, storage_reader=reader, planner=_plain_data_planner(DefaultLoadPlanner, reader))
    except (Exception, CheckpointException) as err:
        if "Missing key in checkpoint" in str(_cause(err)):  # this run trains parameters the checkpoint's did not
            raise UserError(f"{path}: its optimizer state does not match this run's parameters "
                            f"({first_line(str(_cause(err)))}); resume with the same --exp_name, LoRA and model "
                            f"flags") from None
        raise _unreadable(path, reader, err) from None
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
