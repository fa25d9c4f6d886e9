"""Labelled texts for text classification: JSON list / JSON Lines of `{"text": ..., "label": ...}`
or CSV with `text,label` columns. Labels may be names or integers; names get sorted indices."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from common.console import say
from common.errors import UserError
from custom_datasets.text_data import json_lines


def labelled_example(row: Any) -> tuple[str, str] | None:
    """(text, label) of a row, or None when it has no text or no label (a CSV row cut short, an empty
    cell, a label that is not a name or an integer)."""
    if not isinstance(row, dict):
        return None
    text, label = row.get("text"), row.get("label")
    if not isinstance(text, str) or not text.strip():
        return None
    if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
        return None
    return text, str(label).strip()


def read_labelled_texts(path: str | Path) -> list[tuple[str, str]]:
    """(text, label) examples; rows without a text or a label are skipped and counted."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data_file_path {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        elif suffix == ".jsonl":
            rows = list(json_lines(path))
        elif suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
        else:
            raise UserError(f"--data_file_path {path}: use .csv (text,label), .json or .jsonl ({{\"text\", \"label\"}})")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"--data_file_path {path} cannot be parsed ({err})") from None
    if not isinstance(rows, list) or not rows:
        raise UserError(f"--data_file_path {path} holds no examples")
    out = [example for row in rows if (example := labelled_example(row)) is not None]
    if not out:
        raise UserError(f"--data_file_path {path}: none of its {len(rows)} rows has a non-empty \"text\" and a "
                        f"\"label\"; check the file (a CSV needs the header text,label)")
    if len(out) < len(rows):
        say(f"{path}: skipped {len(rows) - len(out)} of {len(rows)} rows without a text or a label (empty, missing, "
            f"or not valid JSON)")
    return out


def label_index(examples: list[tuple[str, str]]) -> dict[str, int]:
    names = sorted({label for _, label in examples}, key=lambda x: (not x.lstrip("-").isdigit(), int(x) if x.lstrip("-").isdigit() else 0, x))
    return {name: i for i, name in enumerate(names)}


class LabelledTexts(Dataset):
    def __init__(self, examples: list[tuple[str, str]], labels: dict[str, int]) -> None:
        unknown = sorted({label for _, label in examples} - set(labels))
        if unknown:
            raise UserError(f"held-out labels {unknown[:5]} do not occur in the training data")
        self.examples, self.labels = examples, labels

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        text, label = self.examples[index]
        return {"caption": text, "label": torch.tensor(self.labels[label])}
