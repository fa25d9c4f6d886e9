"""Reading a sharded run checkpoint into one process.

`--fsdp --sharded_checkpoint` runs write each checkpoint as a folder (training/sharded_checkpoint.py):
torch.distributed.checkpoint (DCP) shards of the model and optimizer state, one file per process,
plus `run_state.pth` with everything else. The shards are read here as full tensors, the optimizer
state keyed by position; common/checkpoint_io.py adds the run state, so the folder becomes the same
dict an ordinary run checkpoint file holds, and fine-tuning, export and resuming under any number
of processes read it like any checkpoint.

DCP's `.metadata` is a pickle. It is read with an unpickler that admits only the classes DCP itself
writes there, so a crafted folder is refused instead of running its code.
"""
from __future__ import annotations

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
                self.forbidden = str(err)
                raise
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeMetadataReader(str(path))


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


def read_shards(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(full model tensors, optimizer state keyed by position) of the folder, in this process alone
    (no process group is needed or used)."""
    from torch.distributed.checkpoint import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    shards: dict[str, Any] = {}
    reader = _safe_reader(path)
    try:
        _load_state_dict(shards, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as err:  # a missing or cut shard: any of DCP's or torch.load's errors
        if reader.forbidden:
            raise UserError(f"{path / METADATA} holds {reader.forbidden}, which DCP never writes there, and this "
                            f"project never unpickles code; re-save the checkpoint with --fsdp --sharded_checkpoint") from None
        raise UserError(f"{path} is not a readable sharded checkpoint ({first_line(str(_cause(err)))}); a shard file "
                        f"may be missing or truncated: copy the whole folder again") from None
    if not isinstance(shards.get("model"), dict) or not isinstance(shards.get("optimizer"), dict):
        raise UserError(f"{path} holds no model and optimizer shards; it was not written by --sharded_checkpoint")
    return shards["model"], position_keyed(shards["optimizer"])
