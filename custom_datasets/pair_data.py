"""Image-caption pairs from a JSON list / JSON Lines of `{"caption": ..., "filename": ...}`, and
captions of the synthetic world without rendering images."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Callable

from PIL import Image
from torch.utils.data import Dataset

from common.errors import UserError
from custom_datasets.image_io import open_rgb
from custom_datasets.synthetic_world import SPLIT_OFFSET, make_scene

log = logging.getLogger(__name__)


def require_readable_images(paths: list[Path], what: str, fix: str) -> None:
    """A data set whose first images all fail to open stops here, in one sentence naming one of them
    and `fix`, instead of training on nothing (a few bad files are skipped and counted later)."""
    first_error = None
    for path in paths:
        try:
            open_rgb(path)
            return
        except Exception as err:  # noqa: BLE001 - any reader error means "unreadable"
            first_error = first_error or f"{path}: {type(err).__name__}"
    if paths:
        raise UserError(f"none of the first {len(paths)} images of {what} could be read (e.g. {first_error}); {fix}")


class ImageCaptionPairs(Dataset):
    """A sample is `build(image) | {"caption": [str, ...]}`; None when the image cannot be read."""

    def __init__(self, pairs: list[tuple[Path, list[str]]], build: Callable[[Image.Image], dict[str, Any]]) -> None:
        self.pairs, self.build = pairs, build
        require_readable_images([path for path, _ in pairs[:20]], "the image-text pairs",
                                "check --data_path, the folder their file names are relative to")

    def __len__(self) -> int:
        return len(self.pairs)

    def captions(self, index: int) -> list[str]:
        return self.pairs[index][1]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path, captions = self.pairs[index]
        try:
            image = open_rgb(path)
        except Exception as err:  # noqa: BLE001 - missing/corrupt images are skipped and counted
            log.debug("skipping unreadable %s: %s", path, err)
            return None
        return {**self.build(image, index), "caption": captions}


class SyntheticCaptions(Dataset):
    """The synthetic world's captions alone (text stages): `{"caption": str}`."""

    def __init__(self, split: str, size: int, seed: int) -> None:
        self.split, self.size, self.seed = split, size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = make_scene(random.Random(f"{self.seed}:{SPLIT_OFFSET[self.split] + index}"))
        return {"caption": scene.caption}


def caption_texts(paths: list[str], synthetic_size: int, seed: int):
    """Every caption of caption files, or of the synthetic world's training split (`["synthetic"]`)."""
    from custom_datasets.text_data import CaptionCorpus

    if list(paths) == ["synthetic"]:
        captions = SyntheticCaptions("train", synthetic_size, seed)
        return (captions[i]["caption"] for i in range(len(captions)))
    return CaptionCorpus(list(paths)).texts()
