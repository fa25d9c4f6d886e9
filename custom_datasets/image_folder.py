"""Unlabelled or class-folder image collections searched recursively, robust to bad files. The file
list is a `FileTable` (custom_datasets/file_index.py): linear to build, shared by workers."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from common.console import say
from common.errors import UserError
from custom_datasets.batch import LABEL
from custom_datasets.file_index import FileTable, index_folder
from custom_datasets.image_io import ARRAY_EXTENSIONS, BandScaler, band_count, open_rgb, open_tile_rgb

log = logging.getLogger(__name__)
TILE_SCAN = 10_000  # files looked at for tiles to fit the band statistics on


def list_image_files(root: str | Path, flag: str = "--data_path") -> list[Path]:
    """Every image file under `root`, sorted (what predict and search read); `flag` names it in errors."""
    root = Path(root)
    return [root / p for p in index_folder(root, flag=flag)]


def is_tile(path: str | Path) -> bool:
    return Path(path).suffix.lower() in ARRAY_EXTENSIONS


class ImageFiles(Dataset):
    """Images of a folder tree (the rows `indices` of its table). A sample is `build(image) |
    {"label": int}` or None when the file cannot be read (the collate function drops and counts it)."""

    def __init__(self, root: str | Path, build: Callable[[Image.Image], dict[str, Any]],
                 bands: Sequence[int] | None = None, table: FileTable | None = None,
                 indices: np.ndarray | None = None, class_to_idx: dict[str, int] | None = None,
                 scaler: BandScaler | None = None) -> None:
        """`scaler`: the training set's band statistics, so held-out tiles are scaled the same way."""
        self.root = Path(root)
        self.table = table if table is not None else index_folder(self.root)
        self.indices = np.arange(len(self.table)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.build, self.bands = build, bands
        self.class_to_idx = class_to_idx if class_to_idx is not None else {
            name: i for i, name in enumerate(self.table.class_names)}
        unknown = [c for c in self.table.class_names if c not in self.class_to_idx]
        if unknown:
            raise UserError(f"{self.root} has class folders the training set does not have: {', '.join(unknown[:5])}")
        remap = np.array([self.class_to_idx[c] for c in self.table.class_names] + [-1], dtype=np.int64)
        self.labels = remap[self.table.classes]  # -1 (the last entry) for files without a class folder
        self.scaler = scaler if scaler is not None else self._fit_band_scaler()
        self._check_some_readable()

    def path(self, index: int) -> Path:
        return self.root / self.table[int(self.indices[index])]

    def _fit_band_scaler(self) -> BandScaler | None:
        tiles = [p for i in range(min(len(self), TILE_SCAN)) if is_tile(p := self.path(i))]
        scaler = BandScaler.fit(tiles, self.bands) if tiles else None
        if scaler is not None and scaler.non_finite:
            say(f"{self.root}: {scaler.non_finite} non-finite pixels (NaN/inf) in {scaler.tiles_with_non_finite} of the "
                f"tiles the band statistics were fitted on; they are left out and read as each band's low value")
        return scaler

    def _check_some_readable(self, probe: int = 20) -> None:
        errors = []
        for i in range(min(probe, len(self))):
            try:
                self.load(self.path(i))
                return
            except Exception as err:  # noqa: BLE001 - any reader error means "unreadable"
                errors.append(err)
        first = self.path(0)
        hint = self._band_hint(first) or f"e.g. {first}: {str(errors[0]).splitlines()[0][:160] if errors else ''}"
        raise UserError(f"--data_path {self.root}: none of the first {min(probe, len(self))} image files could be "
                        f"read ({hint}); check the files")

    def _band_hint(self, path: Path) -> str | None:
        if self.bands is None or not is_tile(path):
            return None
        try:
            count = band_count(path)
        except Exception:  # noqa: BLE001 - the file itself is unreadable: the generic message says so
            return None
        return f"--bands {','.join(map(str, self.bands))} but {path} has {count} bands (indices 0..{count - 1})"

    def load(self, path: Path, for_sample: bool = False) -> Image.Image:
        """`for_sample`: the image of a sample; a builder that can plan its crop first (drawing the
        sample's random choices) lets a JPEG decode at a reduced size."""
        if is_tile(path):
            return open_tile_rgb(path, self.bands, self.scaler)
        return open_rgb(path, getattr(self.build, "draft_planner", None) if for_sample else None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path = self.path(index)
        try:
            image = self.load(path, for_sample=True)
        except Exception as err:  # noqa: BLE001 - corrupt/truncated/unsupported files are skipped and counted
            log.debug("skipping unreadable %s: %s", path, err)
            return None
        row = int(self.indices[index])
        sample = self.build(image, row)  # the row of the table: a key that does not move with subsets
        label = int(self.labels[row])
        if label >= 0:
            sample[LABEL] = label
        return sample
