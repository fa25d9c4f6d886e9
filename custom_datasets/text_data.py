"""Caption corpora and image-caption pair lists.

Formats (by extension): `.json` a JSON list of `{"caption": str | [str, ...], "filename": ...}`
(the seeds' CC3M format), `.jsonl` one such object per line (read lazily by byte offset, for
corpora too large to load at once), `.txt` one caption per line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from torch.utils.data import Dataset

from common.errors import UserError

TEXT_FORMATS = (".json", ".jsonl", ".txt")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"--data_file_path {path} does not exist")
    if path.suffix.lower() not in TEXT_FORMATS:
        raise UserError(f"--data_file_path {path} has an unknown format; use .json (a list of {{\"caption\": ...}}), "
                        f".jsonl or .txt (one caption per line)")


def _captions_of(record: Any, where: str) -> list[str]:
    if isinstance(record, str):
        return [record]
    if not isinstance(record, dict) or "caption" not in record:
        raise UserError(f"{where} is not an object with a \"caption\" field")
    caption = record["caption"]
    captions = [caption] if isinstance(caption, str) else caption
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise UserError(f"{where}: \"caption\" must be a string or a list of strings")
    return captions


def load_json_list(path: Path) -> list[Any]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--data_file_path {path} is not valid JSON ({err}); a .json file must hold one list") from None
    if not isinstance(records, list):
        raise UserError(f"--data_file_path {path} holds a {type(records).__name__}; it must be a JSON list of "
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

    def __getitem__(self, index: int) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[index])
            return f.readline().decode("utf-8", errors="replace").strip()


class CaptionCorpus(Dataset):
    """Every caption of one or more files as one sample each: `{"caption": str}`."""

    def __init__(self, paths: list[str | Path]) -> None:
        self.sources: list[tuple[Any, str]] = []  # (random-access container, format)
        self.index: list[tuple[int, int, int]] = []  # (source, record, caption within record)
        for path in map(Path, paths):
            _check_file(path)
            suffix = path.suffix.lower()
            if suffix == ".json":
                records = [_captions_of(r, f"{path} item {i}") for i, r in enumerate(load_json_list(path))]
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
        if kind == ".txt":
            return {"caption": line}
        try:  # .jsonl: a bad line is skipped and counted, like an unreadable image
            return {"caption": _captions_of(json.loads(line), "line")[0]}
        except (json.JSONDecodeError, UserError):
            return None

    def texts(self) -> Iterator[str]:
        for i in range(len(self)):
            sample = self[i]
            if sample is not None:
                yield sample["caption"]


def read_pairs(path: str | Path, image_root: str | Path | None) -> list[tuple[Path, list[str]]]:
    """`(image path, captions)` from a JSON list / JSON Lines of `{"caption": ..., "filename": ...}`;
    relative filenames are resolved against `image_root` (default: the file's folder)."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".json":
        records = load_json_list(path)
    elif path.suffix.lower() == ".jsonl":
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise UserError(f"--data_file_path {path}: image-text pairs need .json or .jsonl with \"filename\" fields")
    root = Path(image_root) if image_root else path.parent
    pairs = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "filename" not in record:
            raise UserError(f"{path} item {i} has no \"filename\"; image-text pairs need {{\"caption\": ..., \"filename\": ...}}")
        pairs.append((root / record["filename"], _captions_of(record, f"{path} item {i}")))
    if not pairs:
        raise UserError(f"--data_file_path {path} holds no image-text pairs")
    return pairs
