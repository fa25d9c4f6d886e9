"""Reading and writing weight files safely.

Loading never runs pickled code (`torch.load(weights_only=True)` or safetensors). Writing is
atomic: a temporary file in the same folder, then a rename, so a crash never leaves a
half-written file under the final name.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import UserError, first_line
from common.sharded_checkpoint import (
    METADATA,
    OPTIMIZER_SHARDS,
    RUN_STATE,
    is_sharded_checkpoint,
    looks_like_unfinished_sharded_checkpoint,
    read_shards,
)

FORMAT_TAG = "vlmo-backbone/1"
DIGEST_KEY = "content_sha256"  # safetensors metadata: a digest of the tensors, checked on every read
# the only classes a checkpoint's pickle may name besides tensors and builtins
SAFE_GLOBALS = [argparse.Namespace]


@dataclass
class Checkpoint:
    """What a weight file holds: flat `model` tensors (prefixed `backbone.`, `mim_head.`, ...),
    the backbone config when the file is one of ours, and everything else (run state)."""

    path: Path
    model: dict[str, torch.Tensor]
    backbone_config: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)
    # what the file says about itself beyond the weights: head specs, preprocessing, text
    # tokenizer, max text length, task, class names (see models/run_info.py)
    info: dict[str, Any] = field(default_factory=dict)


def _require_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path")
    if looks_like_unfinished_sharded_checkpoint(path):
        raise UserError(f"{path} is a sharded checkpoint without its {METADATA}; it was cut off while being written or "
                        f"copied: copy the whole folder again, or use an earlier checkpoint")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a weight file; pass the checkpoint file inside it "
                        f"(Hugging Face model folders are read by util/convert_beit_ckpt.py)")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes); it was probably cut off while copying: copy it again")


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensors' names, dtypes, shapes and bytes (independent of the file's layout)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.numel():  # flat first: 0-d tensors, and size-1 dims with odd strides (channels-last 1x1 kernels)
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


ZIP_MAGIC, PICKLE_PROTOCOL = b"PK\x03\x04", 0x80  # how torch's zip format and its legacy pickle format begin


def not_a_torch_file(path: Path) -> str | None:
    """Why `path` cannot be a torch file, judged from its first bytes (None when it may be one)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(ZIP_MAGIC):
        return None if zipfile.is_zipfile(path) else (
            f"{path} is truncated: a zip archive (torch's format) without its end record; it was cut off while being "
            f"written or copied: copy it again, or use an earlier checkpoint")
    if head[:1] == bytes([PICKLE_PROTOCOL]):
        return None  # torch's legacy format
    if len(head) >= 10 and head[8:10] == b'{"':
        return f"{path} is a .safetensors file with another extension; rename it to {path.with_suffix('.safetensors').name}"
    if head.lstrip()[:1] in (b"{", b"["):
        return f"{path} holds JSON text, not weights; pass a .pth/.pt or .safetensors weight file"
    return f"{path} is not a PyTorch checkpoint (its first bytes {head[:8]!r} are not a torch file's); pass a .pth/.pt " \
           f"or .safetensors file"


def verify_zip_records(path: Path) -> None:
    """torch's .pth is a zip whose records carry CRC-32s that torch.load never checks: a flipped byte
    would load as a silently wrong weight. Checked here (about a second per GB)."""
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format has no checksums to check
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise UserError(f"{path} is damaged ({first_line(str(err))}); it was cut off or changed after it was written: "
                        f"copy it again, or use another checkpoint") from None
    if bad is not None:
        raise UserError(f"{path} is corrupted: its record {bad} fails its CRC-32 check (bytes changed after the file was "
                        f"written); copy it again, or use another checkpoint")


def load_torch_file(path: str | os.PathLike) -> Any:
    """`torch.load` with `weights_only=True`, after checking the file's checksums, turning every
    failure into one clear sentence."""
    path = Path(path)
    _require_file(path)
    if (problem := not_a_torch_file(path)) is not None:
        raise UserError(problem)
    verify_zip_records(path)
    try:
        # argparse.Namespace holds plain values only: ContinualTransformer stores its flags as one
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "unsupported global" in text.lower() or "not an allowed global" in text:  # torch's two wordings
            culprit = _unsupported_global(text)
            raise UserError(
                f"{path} needs to run pickled code to load{culprit}, and this project never unpickles code; "
                f"re-save it as plain tensors (torch.save(model.state_dict(), ...)) or as .safetensors") from None
        raise UserError(f"{path} is not a PyTorch checkpoint ({first_line(text)}); pass a .pth/.pt or .safetensors file") from None
    except Exception as err:  # the weights-only unpickler raises arbitrary errors on garbage bytes
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({first_line(str(err))}); "
                        f"it may be truncated or another kind of file") from None


def load_safetensors_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the string metadata of a `.safetensors` file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable .safetensors file ({first_line(str(err))}); it may be truncated") from None
    if DIGEST_KEY in meta and tensors_digest(tensors) != meta[DIGEST_KEY]:
        raise UserError(f"{path} is corrupted: its tensors no longer match the digest written with them (bytes changed "
                        f"after the file was written); copy it again, or use another file")
    return tensors, meta


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """Write `.safetensors` atomically, readable by everyone the folder allows (safetensors itself
    writes 0600), with a digest of the tensors in its metadata that every read here checks (other
    readers ignore the key)."""
    from safetensors.torch import save_file

    tensors = unshared({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    meta = {**(metadata or {}), DIGEST_KEY: tensors_digest(tensors)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def is_safetensors(path: str | os.PathLike) -> bool:
    return str(path).endswith(".safetensors")


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read any weight file this project writes or accepts: ours (.safetensors or .pth with a
    backbone config), a run checkpoint (a file, or a sharded run's folder, whose optimizer state
    stays in its shards until a resume reads it), or a raw state dict (`{'model': sd}` or flat)."""
    path = Path(path)
    if is_safetensors(path):
        tensors, meta = load_safetensors_file(path)
        try:
            config = json.loads(meta["backbone_config"]) if "backbone_config" in meta else None
            info = json.loads(meta["run_info"]) if "run_info" in meta else {}
        except json.JSONDecodeError as err:
            raise UserError(f"{path} has unreadable metadata ({err}); re-create it") from None
        return Checkpoint(path, tensors, config, {"metadata": meta}, info)
    obj = read_sharded_checkpoint(path) if is_sharded_checkpoint(path) else load_torch_file(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a dict of weights; save a state_dict instead")
    config = obj.get("backbone_config")
    for key in ("model", "state_dict", "module", "model_state"):
        if key in obj and isinstance(obj[key], dict):
            model = obj[key]
            extra = {k: v for k, v in obj.items() if k != key}
            break
    else:
        model, extra = obj, {}
    tensors = {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path} contains no tensors; it is not a model checkpoint")
    info = extra.pop("run_info", None) or {}
    if isinstance(extra.get("args"), argparse.Namespace):
        extra["args"] = vars(extra["args"])
    return Checkpoint(path, tensors, config, extra, info if isinstance(info, dict) else {})


def read_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """A `--sharded_checkpoint` folder as the dict an ordinary run checkpoint file holds, but for
    the optimizer state (two thirds of it under AdamW): fine-tuning, export and prediction never
    need it, so it is left in the shards (`OPTIMIZER_SHARDS` names the folder) for a resume to read,
    shard by shard under FSDP (training/run_checkpoint.py)."""
    if not (path / RUN_STATE).is_file():
        raise UserError(f"{path} is a sharded checkpoint without its {RUN_STATE}; it was cut off while being written "
                        f"or copied: copy the whole folder again, or use an earlier checkpoint")
    model, _ = read_shards(path, optimizer=False)
    state = load_torch_file(path / RUN_STATE)
    if not isinstance(state, dict):
        raise UserError(f"{path / RUN_STATE} is not a run state; copy the whole folder again")
    carried = state.pop("carried", None) or {}
    return {**state, "model": {**model, **carried}, OPTIMIZER_SHARDS: str(path)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temporary path beside `path`, then rename it into place, with the
    permissions any other file gets (mkstemp's 0600 would hide checkpoints from a team)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if disk_full(err, path.parent):
            raise UserError(f"the disk is full while writing {path}; free space or choose another folder (the previous "
                            f"file of this name, if any, is intact)") from None
        raise


def disk_full(err: BaseException, folder: Path) -> bool:
    """ENOSPC, or a writer (torch's zip writer raises RuntimeError) failing on a full disk."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    if isinstance(err, (OSError, RuntimeError)):
        try:
            return shutil.disk_usage(folder).free < 1 << 20
        except OSError:
            return False
    return False


def save_torch_atomic(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file, then rename over `path`."""
    atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors that share memory with an earlier one copied: safetensors refuses shared memory, and
    a conversion to VLMo's experts starts every expert as the same BEiT FFN tensor."""
    seen: set[int] = set()
    out = {}
    for key, value in tensors.items():
        if value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def save_weights(path: str | os.PathLike, tensors: dict[str, torch.Tensor], backbone_config: dict[str, Any],
                 extra_metadata: dict[str, str] | None = None, info: dict[str, Any] | None = None) -> None:
    """Write prefixed model tensors plus the backbone config (and the self-description `info`)
    as `.safetensors` (by extension) or as a `.pth` of plain tensors and types, atomically."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if is_safetensors(path):
        meta = {"format": FORMAT_TAG, "backbone_config": json.dumps(backbone_config), **(extra_metadata or {})}
        if info:
            meta["run_info"] = json.dumps(info)
        save_safetensors(path, tensors, meta)
    else:
        obj = {"format": FORMAT_TAG, "backbone_config": dict(backbone_config), "model": tensors,
               **({"metadata": dict(extra_metadata)} if extra_metadata else {}), **({"run_info": info} if info else {})}
        save_torch_atomic(obj, path)


def _unsupported_global(text: str) -> str:
    for marker in ("Unsupported global: GLOBAL ", "unsupported GLOBAL ", "GLOBAL "):
        if marker in text:
            name = text.split(marker, 1)[1].split()[0].rstrip(".,")
            return f" (it references {name})"
    return ""
