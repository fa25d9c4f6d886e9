"""NLVR2 as distributed: JSON Lines files `train.json`, `dev.json`, `test1.json` (in --data_path,
its data/ or nlvr2/data/ folder), one statement per line with `identifier` (split-set-pair-sentence),
`sentence`, `label` ("True"/"False") and, for train, `directory`; the pair's images are
`<split-set-pair>-img0.png` and `-img1.png` in images/train/<directory>/ (or train/<directory>/)
and in dev/, test1/ (or images/dev/, images/test1/)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset

from common.console import say
from common.errors import UserError
from custom_datasets import batch as B
from custom_datasets.image_io import open_rgb
from custom_datasets.pair_data import require_readable_images
from custom_datasets.text_data import json_lines

SPLITS = ("train", "dev", "test1")
LABELS = {"true": 1, "false": 0}


@dataclass(frozen=True)
class Statement:
    sentence: str
    label: int  # 1: true of the two images
    images: tuple[Path, Path]  # left, right
    identifier: str


def find_statements_file(root: Path, split: str) -> Path:
    for folder in (root, root / "data", root / "nlvr2" / "data"):
        if (folder / f"{split}.json").is_file():
            return folder / f"{split}.json"
    raise UserError(f"--data_path {root}: no {split}.json there or in data/ or nlvr2/data/; NLVR2's JSON Lines files "
                    f"(train.json, dev.json, test1.json) come from github.com/lil-lab/nlvr")


def label_of(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    return LABELS.get(value.lower()) if isinstance(value, str) else None


def image_folders(root: Path, split: str) -> list[Path]:
    return [root / "images" / split, root / split]


def pair_stem(identifier: str) -> str:
    """"dev-850-0-1" -> "dev-850-0": the image pair a statement is about."""
    return identifier.rsplit("-", 1)[0]


def read_nlvr2_split(root: str | Path, split: str) -> list[Statement]:
    """Every usable statement of `split`; malformed lines are skipped and counted."""
    root = Path(root)
    path = find_statements_file(root, split)
    records = list(json_lines(path))
    usable = [r for r in records if isinstance(r, dict) and isinstance(r.get("sentence"), str) and r["sentence"].strip()
              and label_of(r.get("label")) is not None and isinstance(r.get("identifier"), str)
              and r["identifier"].count("-") >= 3]
    if not usable:
        raise UserError(f"{path}: none of its {len(records)} lines is an NLVR2 statement (each needs identifier, "
                        f"sentence and label); check the file")
    if len(usable) < len(records):
        say(f"{path}: skipped {len(records) - len(usable)} of {len(records)} lines (malformed)")

    def folder_of(record: dict, base: Path) -> Path:
        return base / str(record["directory"]) if "directory" in record else base

    first = usable[0]
    bases = image_folders(root, split)
    base = next((b for b in bases if (folder_of(first, b) / f"{pair_stem(first['identifier'])}-img0.png").is_file()),
                bases[0])
    statements = []
    for r in usable:
        folder, stem = folder_of(r, base), pair_stem(r["identifier"])
        statements.append(Statement(r["sentence"], label_of(r["label"]),
                                    (folder / f"{stem}-img0.png", folder / f"{stem}-img1.png"), r["identifier"]))
    return statements


class StatementPairs(Dataset):
    """A sample: `build(left) | {"image_2": build(right)["image"], "caption": sentence, "label"}`;
    None when either image cannot be read."""

    def __init__(self, statements: list[Statement], build: Callable[..., dict[str, Any]], what: str) -> None:
        self.statements, self.build = statements, build
        require_readable_images([s.images[0] for s in statements[:20]], what,
                                "check --data_path: NLVR2's images go in images/train/<directory>/, dev/ and test1/")

    def __len__(self) -> int:
        return len(self.statements)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        s = self.statements[index]
        try:
            left, right = open_rgb(s.images[0]), open_rgb(s.images[1])
        except Exception:  # noqa: BLE001 - missing/corrupt images are skipped and counted
            return None
        return {**self.build(left, index), B.IMAGE_2: self.build(right, index)[B.IMAGE], B.CAPTION: s.sentence,
                B.LABEL: s.label}
