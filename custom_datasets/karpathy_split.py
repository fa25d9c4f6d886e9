"""Karpathy's retrieval splits of COCO and Flickr30k (`dataset_coco.json`, `dataset_flickr30k.json`,
what VLMo, ALBEF and BLIP evaluate on), read as they are distributed: `{"dataset": ..., "images":
[{"filepath"?, "filename", "split", "sentences": [{"raw": ...}, ...]}, ...]}`. Training takes the
`train` and `restval` images (the usual 113k for COCO), evaluation `test` (5k COCO / 1k Flickr30k) or
`val`. Image paths are `--data_path/filepath/filename` (COCO: `val2014/...`) or
`--data_path/filename` (Flickr30k)."""
from __future__ import annotations

import json
from pathlib import Path

from common.errors import UserError
from custom_datasets.text_data import ImageRoot, report_skipped

TRAIN_SPLITS = ("train", "restval")


def is_karpathy_file(path: str | Path) -> bool:
    """A .json whose top level is an object with an "images" list (the pair files are JSON lists)."""
    path = Path(path)
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"{") and b'"images"' in head


def read_karpathy(path: str | Path, image_root: str | Path | None, splits: tuple[str, ...],
                  allow_outside: bool = False) -> list[tuple[Path, list[str]]]:
    """`(image path, its captions)` of the images in `splits`; entries without a file name or a
    sentence, or (unless `allow_outside`) whose image lies outside the root, are skipped and counted."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--data_file_path {path} is not valid JSON ({err})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise UserError(f"--data_file_path {path} has no \"images\" list; Karpathy's split files hold one")
    root = ImageRoot(Path(image_root) if image_root else path.parent, allow_outside)
    pairs, wanted = [], [e for e in images if isinstance(e, dict) and e.get("split") in splits]
    for entry in wanted:
        captions = [s["raw"] for s in entry.get("sentences") or [] if isinstance(s, dict) and isinstance(s.get("raw"), str)]
        filename = entry.get("filename")
        if captions and isinstance(filename, str) and filename:
            folder = [entry["filepath"]] if isinstance(entry.get("filepath"), str) else []
            if (image := root.image(*folder, filename)) is not None:
                pairs.append((image, captions))
    root.report(path, "images", len(pairs))
    report_skipped(path, len(wanted) - len(pairs) - len(root.outside), len(wanted), "images")
    if not pairs:
        raise UserError(f"--data_file_path {path} has no usable image in the {'/'.join(splits)} split")
    return pairs
