"""Caption corpora and image-caption pair lists.

Formats (by extension): `.json` a JSON list of `{"caption": str | [str, ...], "filename": ...}`
(the seeds' CC3M format), `.jsonl` one such object per line (read lazily by byte offset, for
corpora too large to load at once), `.txt` one caption per line."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from torch.utils.data import Dataset

from common.console import say
from common.errors import UserError

TEXT_FORMATS = (".json", ".jsonl", ".txt")


def _check_file(path: Path, flag: str = "--data_file_path") -> None:
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist")
    if path.suffix.lower() not in TEXT_FORMATS:
        raise UserError(f"{flag} {path} has an unknown format; use .json (a list of {{\"caption\": ...}}), "
                        f".jsonl or .txt (one caption per line)")


def captions_of(record: Any) -> list[str] | None:
    """The non-empty captions of a record (a string, or an object whose "caption" is a string or a
    list of strings); None for a record that has none, which is skipped and counted."""
    if isinstance(record, str):
        captions: Any = [record]
    elif isinstance(record, dict) and "caption" in record:
        captions = [record["caption"]] if isinstance(record["caption"], str) else record["caption"]
    else:
        return None
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return None
    kept = [c for c in captions if c.strip()]  # an empty caption has nothing to predict or match
    return kept or None


def report_skipped(path: Path, skipped: int, total: int, what: str, flag: str = "--data_file_path") -> None:
    if not skipped:
        return
    if skipped == total:
        needs = {"pairs": 'a non-empty "caption" and a "filename"',
                 "images": 'a "filename" and "sentences" with "raw" text'}.get(what, 'a non-empty "caption"')
        raise UserError(f"{flag} {path}: none of its {total} {what} is usable (each needs {needs}); "
                        f"check the file")
    say(f"{path}: skipped {skipped} of {total} {what} (malformed, not UTF-8, or without a usable caption)")


def json_lines(path: Path) -> Iterator[Any]:
    """Each line's JSON value, or None for a line that is not UTF-8 or not JSON."""
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                yield json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                yield None


def load_json_list(path: Path, flag: str = "--data_file_path") -> list[Any]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{flag} {path} is not valid JSON ({err}); a .json file must hold one list") from None
    if not isinstance(records, list):
        raise UserError(f"{flag} {path} holds a {type(records).__name__}; it must be a JSON list of "
                        f"{{\"caption\": ...}} objects")
    return records


class LineIndexedFile:
    """Random access to the lines of a text file through their byte offsets (no full load)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offsets: list[int] = []
        with open(path, "rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    self.offsets.append(offset)
                offset += len(line)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> str | None:
        """The line, or None when it is not UTF-8."""
        with open(self.path, "rb") as f:
            f.seek(self.offsets[index])
            try:
                return f.readline().decode("utf-8").strip()
            except UnicodeDecodeError:
                return None


class CaptionCorpus(Dataset):
    """Every caption of one or more files as one sample each: `{"caption": str}`."""

    def __init__(self, paths: list[str | Path]) -> None:
        self.sources: list[tuple[Any, str]] = []  # (random-access container, format)
        self.index: list[tuple[int, int, int]] = []  # (source, record, caption within record)
        for path in map(Path, paths):
            _check_file(path)
            suffix = path.suffix.lower()
            if suffix == ".json":
                loaded = load_json_list(path)
                records = [c for r in loaded if (c := captions_of(r)) is not None]
                report_skipped(path, len(loaded) - len(records), len(loaded), "records")
                self._add(records, "captions", [len(r) for r in records])
            else:
                lines = LineIndexedFile(path)
                self._add(lines, suffix, [1] * len(lines))
        if not self.index:
            raise UserError(f"--data_file_path {', '.join(map(str, paths))} holds no captions")

    def _add(self, container: Any, kind: str, counts: list[int]) -> None:
        source = len(self.sources)
        self.sources.append((container, kind))
        self.index += [(source, i, j) for i, n in enumerate(counts) for j in range(n)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        source, record, which = self.index[index]
        container, kind = self.sources[source]
        if kind == "captions":
            return {"caption": container[record][which]}
        line = container[record]
        if line is None:  # not UTF-8: skipped and counted, like an unreadable image
            return None
        if kind == ".txt":
            return {"caption": line}
        try:  # .jsonl, read lazily: a bad line is skipped and counted
            captions = captions_of(json.loads(line))
        except json.JSONDecodeError:
            return None
        return {"caption": captions[0]} if captions else None

    def texts(self) -> Iterator[str]:
        for i in range(len(self)):
            sample = self[i]
            if sample is not None:
                yield sample["caption"]


OUTSIDE_FLAG = "--allow_outside_data_path"


class ImageRoot:
    """Where a pair file's images may be: under its root, unless the user allows any path. A name
    that leaves the root (absolute, or through '..') is skipped and counted otherwise: a pair file
    handed over by someone else must not make a run read /etc/passwd. Links inside the root are
    the user's own doing and are followed."""

    def __init__(self, root: Path, allow_outside: bool) -> None:
        self.root, self.allow_outside = root, allow_outside
        self.bound = os.path.normpath(root.absolute())
        self.outside: list[str] = []

    def image(self, *parts: str) -> Path | None:
        path = self.root.joinpath(*parts)
        normal = os.path.normpath(path.absolute())
        if self.allow_outside or normal == self.bound or normal.startswith(self.bound.rstrip(os.sep) + os.sep):
            return path
        self.outside.append("/".join(parts))
        return None

    def report(self, source: Path, what: str, kept: int, flag: str = "--data_file_path") -> None:
        if self.outside and not kept:
            raise UserError(f"{flag} {source}: no usable {what} left, {len(self.outside)} name images outside "
                            f"{self.root} (an absolute path or '..', e.g. {self.outside[0]!r}); pass the folder that "
                            f"holds them as --data_path, or {OUTSIDE_FLAG} to read them where they are")
        if self.outside:
            say(f"{source}: skipped {len(self.outside)} {what} whose image lies outside {self.root} (an absolute path "
                f"or '..', e.g. {self.outside[0]!r}); pass {OUTSIDE_FLAG} to read them")


def read_pairs(path: str | Path, image_root: str | Path | None, allow_outside: bool = False,
               flag: str = "--data_file_path") -> list[tuple[Path, list[str]]]:
    """`(image path, captions)` from a JSON list / JSON Lines of `{"caption": ..., "filename": ...}`;
    relative filenames are resolved against `image_root` (default: the file's folder), and stay
    under it unless `allow_outside`. `flag`: the flag a refusal names."""
    path = Path(path)
    _check_file(path, flag)
    if path.suffix.lower() == ".json":
        records = load_json_list(path, flag)
    elif path.suffix.lower() == ".jsonl":
        records = list(json_lines(path))
    else:
        raise UserError(f"{flag} {path}: image-text pairs need .json or .jsonl with \"filename\" fields")
    if not records:
        raise UserError(f"{flag} {path} holds no image-text pairs")
    root = ImageRoot(Path(image_root) if image_root else path.parent, allow_outside)
    pairs = []
    for record in records:
        captions = captions_of(record)
        filename = record.get("filename") if isinstance(record, dict) else None
        if captions and isinstance(filename, str) and filename and (image := root.image(filename)) is not None:
            pairs.append((image, captions))
    root.report(path, "pairs", len(pairs), flag)
    report_skipped(path, len(records) - len(pairs) - len(root.outside), len(records), "pairs", flag)
    return pairs
