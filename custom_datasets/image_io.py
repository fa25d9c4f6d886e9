"""Opening whatever image files users have as 8-bit RGB: JPEG/PNG/... in any PIL mode
(grayscale, RGBA, palette, 16-bit) and `.npy` tiles (HWC or CHW, any dtype, 1..N bands)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ARRAY_EXTENSIONS = (".npy",)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS + ARRAY_EXTENSIONS


def _high_bit_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Per-image 1-99 percentile stretch; non-finite pixels (NaN, inf) read as the low end."""
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = np.percentile(arr[finite], 1), np.percentile(arr[finite], 99)
    scaled = np.clip((np.where(finite, arr, lo) - lo) / max(hi - lo, 1e-12), 0, 1)
    return (scaled * 255).astype(np.uint8)


SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations stored with width and height exchanged
PLAN_KEY = "view_plan"  # the `info` entry of an image read with a planner: (plan, its full size)


def open_rgb(path: str | Path, planner: Callable | None = None) -> Image.Image:
    """An image file as RGB. 16-bit and float modes are stretched to 8 bits per image;
    alpha is dropped; palette and grayscale are expanded.

    `planner(size) -> (plan, decode size or None)` (a transform's random choices, drawn from the
    upright size alone): a JPEG is then decoded at the reduced size it allows (PIL's draft mode,
    DCT scaling, several times faster), and the image carries `info[PLAN_KEY] = (plan, upright
    full size)` for the transform to use."""
    with Image.open(path) as img:
        plan = None
        if planner is not None:
            swapped = img.getexif().get(0x0112) in SWAPPING_ORIENTATIONS
            upright = img.size[::-1] if swapped else img.size
            plan, reduced = planner(upright)
            if reduced is not None and img.format == "JPEG":
                img.draft("RGB", reduced[::-1] if swapped else reduced)
        img.load()
        img = ImageOps.exif_transpose(img)  # photos from cameras and phones are stored sideways with an EXIF note
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            out = Image.fromarray(_high_bit_to_uint8(np.asarray(img))).convert("RGB")
        elif img.mode == "P" and "transparency" in img.info:
            out = img.convert("RGBA").convert("RGB")
        else:
            out = img.convert("RGB")
        if plan is not None:
            out.info[PLAN_KEY] = (plan, upright)
        return out


def to_hwc(arr: np.ndarray) -> np.ndarray:
    """`[H, W]`, `[H, W, C]` or `[C, H, W]` -> `[H, W, C]`. Channels-first only when the first axis
    is small (<= 32) and smaller than both others (so a 1x1 pixel with 3 bands, `(1, 1, 3)`, stays
    channels-last, as numpy and PIL store images)."""
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"expected a 2-D or 3-D array, got shape {arr.shape}")
    if arr.shape[0] <= 32 and arr.shape[0] < arr.shape[1] and arr.shape[0] < arr.shape[2]:
        return np.transpose(arr, (1, 2, 0))
    return arr


def band_count(path: str | Path) -> int:
    return to_hwc(np.load(path, allow_pickle=False, mmap_mode="r")).shape[2]


def read_tile(path: str | Path, bands: Sequence[int] | None) -> np.ndarray:
    """`[H, W, 3]` of the chosen bands (default: the first three; one band is repeated)."""
    arr = to_hwc(np.load(path, allow_pickle=False))
    if bands is not None:
        if max(bands) >= arr.shape[2]:
            raise ValueError(f"--bands {list(bands)} but {path} has {arr.shape[2]} bands")
        arr = arr[:, :, list(bands)]
    elif arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] >= 3:
        arr = arr[:, :, :3]
    else:
        raise ValueError(f"{path} has {arr.shape[2]} bands; pass --bands to choose three")
    return arr


@dataclass
class BandScaler:
    """Robust per-dataset, per-band scaling of non-8-bit tiles: the `low`/`high` percentiles of
    a sample of tiles map to 0/255, so one bright tile does not darken the rest. Non-finite pixels
    (NaN, inf: no-data in many satellite products) are left out of the statistics, counted, and
    read as the band's low value."""

    low: np.ndarray
    high: np.ndarray
    non_finite: int = 0  # pixels left out of the fit
    tiles_with_non_finite: int = 0

    @classmethod
    def fit(cls, paths: Sequence[Path], bands: Sequence[int] | None, percentiles=(2.0, 98.0),
            max_files: int = 64) -> "BandScaler | None":
        samples = []
        for path in list(paths)[:max_files]:
            try:
                samples.append(read_tile(path, bands).reshape(-1, 3))
            except (ValueError, OSError):
                continue
        if not samples or all(s.dtype == np.uint8 for s in samples):
            return None
        values = np.concatenate(samples).astype(np.float64)  # [pixels, 3]
        finite = np.isfinite(values)
        low, high = np.zeros(3), np.ones(3)
        for band in range(3):
            column = values[finite[:, band], band]
            if column.size:
                low[band], high[band] = np.percentile(column, percentiles[0]), np.percentile(column, percentiles[1])
        return cls(low, high, int((~finite).sum()), sum(int((~np.isfinite(s.astype(np.float64))).any()) for s in samples))

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        arr = arr.astype(np.float64)
        arr = np.where(np.isfinite(arr), arr, self.low)
        scaled = (arr - self.low) / np.maximum(self.high - self.low, 1e-12)
        return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def open_tile_rgb(path: str | Path, bands: Sequence[int] | None, scaler: BandScaler | None) -> Image.Image:
    arr = read_tile(path, bands)
    if arr.dtype != np.uint8:
        arr = scaler(arr) if scaler is not None else _high_bit_to_uint8(arr)
    return Image.fromarray(np.ascontiguousarray(arr))
