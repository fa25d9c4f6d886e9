"""The file list of an image folder, built in linear time and held compactly: one sorted table of
relative paths (a single byte buffer with offsets, so DataLoader workers share it instead of
copying millions of Python strings), each file's class (ImageNet layout: the first folder), and the
held-out split by file name. ImageNet-22k's 14M paths index and split in well under a minute on
one core (`python experiments/benchmark.py --mode index`). A run keeps its index in its output folder,
so a resumed run sees exactly the files it started with."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from common.checkpoint_io import atomic_write
from common.console import say
from common.errors import UserError
from custom_datasets.image_io import ARRAY_EXTENSIONS, IMAGE_EXTENSIONS
from custom_datasets.split import held_out_names

EXTENSIONS = frozenset(IMAGE_EXTENSIONS + ARRAY_EXTENSIONS)
INDEX_HEADER = "# image index of "  # the first format: one path per line (read still, for runs that wrote it)
# paths separated by NUL, the one byte no file name can hold (a name may hold a newline), as the file
# system's bytes (a name need not be UTF-8)
NUL_INDEX_HEADER = b"# image index, NUL-separated, of "


def _folder_identity(path: str | os.PathLike) -> tuple[int, int]:
    info = os.stat(path)  # follows links: a link and the folder it points to are one folder
    return info.st_dev, info.st_ino


def scan(root: Path, limit: int | None = None) -> list[str]:
    """Relative paths (with '/') of every image file under `root` (the first `limit` found), in no
    particular order. One `scandir` per folder: the file type comes from the directory entry, no
    stat per file. Each folder is walked once: a link back into a folder already walked (a loop)
    is skipped, and so are entries that cannot be read; both are counted and said."""
    found, stack = [], [""]
    seen = {_folder_identity(root)}
    loops, unreadable = [], []
    while stack and (limit is None or len(found) < limit):
        rel = stack.pop()
        try:
            with os.scandir(root / rel if rel else root) as entries:
                for entry in entries:
                    name = f"{rel}/{entry.name}" if rel else entry.name
                    try:
                        if entry.is_dir():
                            identity = _folder_identity(entry.path)
                            if identity in seen:
                                loops.append(name)
                                continue
                            seen.add(identity)
                            stack.append(name)
                        elif os.path.splitext(entry.name)[1].lower() in EXTENSIONS and entry.is_file():
                            found.append(name)
                    except OSError:  # a link to itself, or to nothing readable
                        unreadable.append(name)
        except OSError:
            unreadable.append(rel or ".")
    if loops:
        say(f"{root}: skipped {len(loops)} link(s) to folders already indexed (a loop, e.g. {loops[0]!r}); each "
            f"folder's images are indexed once")
    if unreadable:
        say(f"{root}: skipped {len(unreadable)} entr{'ies' if len(unreadable) > 1 else 'y'} that could not be read "
            f"(e.g. {unreadable[0]!r}: a broken or looping link, or no permission)")
    return found


class FileTable:
    """Sorted relative paths in one buffer: `table[i]` is the i-th path, `table.classes[i]` its class
    index (-1 for files directly under the root), `table.held_out[i]` whether the split holds it out
    (with `held_out_fraction`)."""

    def __init__(self, paths: Iterable[str], held_out_fraction: float | None = None) -> None:
        ordered = sorted(paths)
        encoded = [p.encode("utf-8", "surrogateescape") for p in ordered]  # os.fsencode, faster
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        del encoded
        heads = [p.partition("/") for p in ordered]
        self.class_names = sorted({head for head, sep, _ in heads if sep})
        lookup = {name: i for i, name in enumerate(self.class_names)}
        self.classes = np.fromiter((lookup[head] if sep else -1 for head, sep, _ in heads), dtype=np.int32,
                                   count=len(heads))
        del heads
        self.held_out = None
        if held_out_fraction is not None:
            self.held_out = np.array(held_out_names(ordered, held_out_fraction), dtype=bool)
            if len(self.held_out) and not self.held_out.any():  # a held-out set is never empty
                self.held_out[0] = True

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.blob[self.offsets[index]:self.offsets[index + 1]].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


def read_index(cache: Path, root: Path) -> list[str] | None:
    """The paths of `cache` when it indexes `root`, else None."""
    if not cache.is_file():
        return None
    data = cache.read_bytes()
    header = NUL_INDEX_HEADER + os.fsencode(root.resolve()) + b"\0"
    if data.startswith(header):
        rest = data[len(header):]
        return [os.fsdecode(p) for p in rest.split(b"\0")] if rest else []
    lines = data.decode("utf-8", errors="surrogateescape").splitlines()
    if not lines or lines[0] != INDEX_HEADER + str(root.resolve()):
        return None
    return lines[1:]


def write_index(cache: Path, root: Path, paths: list[str]) -> None:
    data = NUL_INDEX_HEADER + os.fsencode(root.resolve()) + b"\0" + b"\0".join(os.fsencode(p) for p in paths)
    atomic_write(cache, lambda tmp: Path(tmp).write_bytes(data))


def index_folder(root: str | Path, cache: Path | None = None, held_out_fraction: float | None = None,
                 flag: str = "--data_path") -> FileTable:
    """The folder's image files (split when `held_out_fraction` is given); with `cache`, read from it
    when it indexes the same folder (a resumed run), else written there. `flag` names it in errors."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{flag} {root} does not exist")
    if not root.is_dir():
        raise UserError(f"{flag} {root} is a file; pass the folder that holds the images")
    paths = read_index(cache, root) if cache is not None else None
    if paths is None:
        paths = scan(root)
        if cache is not None and paths and not cache.exists():  # another run's index is never overwritten
            write_index(cache, root, sorted(paths))
    if not paths:
        raise UserError(f"{flag} {root} holds no image files (looked for .jpg/.png/.tif/.npy and more, recursively)")
    return FileTable(paths, held_out_fraction)
