"""The one train / held-out split of the project: a sample is held out when a hash of its key (a
file name, or `item<i>` for records without one) falls below the fraction. The choice is
deterministic, independent of file-system order, and does not move when other samples are added,
so a held-out set stays held out across runs and machines. Linear time: one hash per key."""
from __future__ import annotations

import hashlib
import os
from typing import Iterable, Sequence, TypeVar

from common.errors import UserError

T = TypeVar("T")
_SCALE = 2.0 ** 32


def is_held_out(key: str, fraction: float) -> bool:
    digest = hashlib.md5(key.encode("utf-8", "surrogateescape")).digest()  # a file name need not be UTF-8
    return int.from_bytes(digest[:4], "little") / _SCALE < fraction


def held_out_names(paths: Iterable[str], fraction: float) -> list[bool]:
    """`is_held_out(file_key(p))` for many '/'-separated paths, fast (the same decisions: an int
    compared with fraction x 2^32 is exactly the float comparison above)."""
    md5, threshold, from_bytes = hashlib.md5, fraction * _SCALE, int.from_bytes
    return [from_bytes(md5(p[p.rfind("/") + 1:].encode("utf-8", "surrogateescape")).digest()[:4], "little") < threshold
            for p in paths]


def file_key(path: str | os.PathLike) -> str:
    """The file name: what decides a file's split (the folder it sits in does not)."""
    return os.path.basename(os.fspath(path))


def held_out_flags(keys: Iterable[str], fraction: float) -> list[bool]:
    """One flag per key; when none is held out, the first one is (a held-out set is never empty)."""
    flags = [is_held_out(k, fraction) for k in keys]
    if flags and not any(flags):
        flags[0] = True
    return flags


def require_training_left(train: int, total: int, what: str, eval_flag: str) -> None:
    """A split that holds out every sample leaves nothing to train on; training on the held-out
    samples instead would report their metrics as held-out ones."""
    if total and not train:
        raise UserError(f"{what} has {total} sample{'s' if total > 1 else ''}, all held out for evaluation, so none is "
                        f"left to train on; add data, lower --val_fraction, or pass held-out data with {eval_flag}")


def split_held_out(items: Sequence[T], keys: Iterable[str], fraction: float, what: str = "the data set",
                   eval_flag: str = "--eval_data_file_path") -> tuple[list[T], list[T]]:
    """(train, held-out) of `items`, keyed by `keys`; `what` names the data in the sentence that
    refuses a split leaving nothing to train on."""
    flags = held_out_flags(keys, fraction)
    train = [item for item, held in zip(items, flags) if not held]
    val = [item for item, held in zip(items, flags) if held]
    require_training_left(len(train), len(items), what, eval_flag)
    return train, val


def record_keys(count: int) -> list[str]:
    """Keys of records that have no file name of their own (captions, labelled texts)."""
    return [f"item{i}" for i in range(count)]
