"""Unlabelled or class-folder image collections searched recursively, robust to bad files."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image
from torch.utils.data import Dataset

from common.errors import UserError
from custom_datasets.image_io import ARRAY_EXTENSIONS, BandScaler, is_image_file, open_rgb, open_tile_rgb

log = logging.getLogger(__name__)


def list_image_files(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise UserError(f"--data_path {root} does not exist")
    if not root.is_dir():
        raise UserError(f"--data_path {root} is a file; pass the folder that holds the images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise UserError(f"--data_path {root} holds no image files (looked for .jpg/.png/.tif/.npy and more, recursively)")
    return files


def class_of(path: Path, root: Path) -> str | None:
    """ImageNet layout: the first folder under root is the class."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


class ImageFiles(Dataset):
    """Images from a folder tree. A sample is `build(image) | {"label": int}` or None when the file
    cannot be read (the collate function drops and counts it)."""

    def __init__(self, root: str | Path, build: Callable[[Image.Image], dict[str, Any]],
                 bands: Sequence[int] | None = None, files: list[Path] | None = None,
                 class_to_idx: dict[str, int] | None = None) -> None:
        self.root = Path(root)
        self.files = files if files is not None else list_image_files(self.root)
        self.build = build
        self.bands = bands
        tiles = [f for f in self.files if f.suffix.lower() in ARRAY_EXTENSIONS]
        self.scaler = BandScaler.fit(tiles, bands) if tiles else None
        classes = sorted({c for f in self.files if (c := class_of(f, self.root)) is not None})
        self.class_to_idx = class_to_idx if class_to_idx is not None else {c: i for i, c in enumerate(classes)}
        unknown = [c for c in classes if c not in self.class_to_idx]
        if unknown:
            raise UserError(f"{self.root} has class folders the training set does not have: {', '.join(unknown[:5])}")
        self._check_some_readable()

    def _check_some_readable(self, probe: int = 20) -> None:
        for path in self.files[:probe]:
            try:
                self.load(path)
                return
            except Exception:  # noqa: BLE001 - any reader error means "unreadable"
                continue
        raise UserError(f"--data_path {self.root}: none of the first {min(probe, len(self.files))} image files could be "
                        f"read (e.g. {self.files[0]}); check the files or --bands")

    def load(self, path: Path) -> Image.Image:
        if path.suffix.lower() in ARRAY_EXTENSIONS:
            return open_tile_rgb(path, self.bands, self.scaler)
        return open_rgb(path)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path = self.files[index]
        try:
            image = self.load(path)
        except Exception as err:  # noqa: BLE001 - corrupt/truncated/unsupported files are skipped and counted
            log.debug("skipping unreadable %s: %s", path, err)
            return None
        sample = self.build(image)
        cls = class_of(path, self.root)
        if cls is not None:
            sample["label"] = self.class_to_idx[cls]
        return sample
