"""Joint image + mask views for semantic segmentation, as mmseg's ADE20K pipeline: random rescale
(ratio 0.5-2.0 of a base scale whose short side is the crop size and long side at most 4x it),
a random crop that avoids crops of one class (at most 75% of the labelled pixels, 10 tries), a
horizontal flip, photometric distortion of the image only, normalisation, and padding to the crop
size (the mask padded with the ignore value). Geometry moves image and mask together: the image is
resampled bilinearly, the mask by nearest neighbour, so labels are never blended."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance

from common.confusion_matrix import SEG_IGNORE
from custom_datasets.transforms import mean_std

CAT_MAX_RATIO, CROP_TRIES = 0.75, 10


def base_size(width: int, height: int, crop: int, ratio: float = 1.0) -> tuple[int, int]:
    """(width, height) rescaled keeping the aspect so that the short side is at most `ratio x crop`
    and the long side at most `ratio x 4 crop` (mmseg's img_scale (2048, 512) for a 512 crop)."""
    scale = min(ratio * 4 * crop / max(width, height), ratio * crop / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_pair(image: Image.Image, mask: np.ndarray, size: tuple[int, int]) -> tuple[Image.Image, np.ndarray]:
    if image.size == size:
        return image, mask
    resized = Image.fromarray(mask.astype(np.int32)).resize(size, Image.NEAREST)
    return image.resize(size, Image.BILINEAR), np.asarray(resized, dtype=np.int64)


def crop_box(mask: np.ndarray, crop: int, rng: random.Random) -> tuple[int, int]:
    """(top, left) of a crop where no single class covers more than CAT_MAX_RATIO of the labelled
    pixels, when one is found in CROP_TRIES tries (else the last one tried)."""
    h, w = mask.shape
    for _ in range(CROP_TRIES):
        top, left = rng.randint(0, max(h - crop, 0)), rng.randint(0, max(w - crop, 0))
        labels = mask[top:top + crop, left:left + crop]
        _, counts = np.unique(labels[labels != SEG_IGNORE], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
            break
    return top, left


def photometric_distortion(image: Image.Image, rng: random.Random) -> Image.Image:
    """mmseg's PhotoMetricDistortion, each step with probability 1/2: brightness ±32, contrast
    x0.5-1.5 (before or after the colour steps), saturation x0.5-1.5, hue ±18 of 180 degrees."""
    arr = np.asarray(image, dtype=np.float32)
    if rng.random() < 0.5:
        arr = arr + rng.uniform(-32, 32)
    contrast_first = rng.random() < 0.5
    contrast = rng.uniform(0.5, 1.5) if rng.random() < 0.5 else None
    if contrast is not None and contrast_first:
        arr = arr * contrast
    image = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.5, 1.5))
    if rng.random() < 0.5:
        hue, sat, val = image.convert("HSV").split()
        shift = round(rng.uniform(-18, 18) * 256 / 180)
        hue = Image.fromarray(((np.asarray(hue, dtype=np.int32) + shift) % 256).astype(np.uint8))
        image = Image.merge("HSV", (hue, sat, val)).convert("RGB")
    if contrast is not None and not contrast_first:
        image = Image.fromarray((np.asarray(image, dtype=np.float32) * contrast).clip(0, 255).astype(np.uint8))
    return image


@dataclass
class SegmentationView:
    """PIL image + `[H, W]` integer mask -> {"image": `[3, h, w]`, "seg_mask": `[h, w]`}. Training:
    the random view above at `crop` x `crop`; evaluation: the image at its base scale and the mask
    untouched (metrics are taken at the mask's own size)."""

    crop: int
    train: bool
    ratio_range: tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5
    photometric: bool = True
    imagenet_mean_std: bool = False

    def __call__(self, image: Image.Image, mask: np.ndarray, rng: random.Random | None = None) -> dict[str, torch.Tensor]:
        if image.size != (mask.shape[1], mask.shape[0]):
            raise ValueError(f"image is {image.size[0]}x{image.size[1]} but its mask {mask.shape[1]}x{mask.shape[0]}")
        if not self.train:
            image = image.resize(base_size(*image.size, self.crop), Image.BILINEAR)
            return {"image": self.normalise(image), "seg_mask": torch.from_numpy(mask.astype(np.int64))}
        rng = rng or random.Random(random.getrandbits(64))
        image, mask = resize_pair(image, mask, base_size(*image.size, self.crop, rng.uniform(*self.ratio_range)))
        top, left = crop_box(mask, self.crop, rng)
        image = image.crop((left, top, left + min(self.crop, image.width), top + min(self.crop, image.height)))
        mask = mask[top:top + self.crop, left:left + self.crop]
        if rng.random() < self.hflip:
            image, mask = image.transpose(Image.FLIP_LEFT_RIGHT), mask[:, ::-1]
        if self.photometric:
            image = photometric_distortion(image, rng)
        return self.pad(self.normalise(image), torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64)))

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return mean_std(self.imagenet_mean_std)

    def normalise(self, image: Image.Image) -> torch.Tensor:
        mean, std = self.mean_std()
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)  # [3, H, W]
        return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    def pad(self, image: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Up to the crop size: the image with 0 (after normalisation), the mask with the ignore value."""
        h, w = mask.shape
        if (h, w) != (self.crop, self.crop):
            image = torch.nn.functional.pad(image, (0, self.crop - w, 0, self.crop - h))
            mask = torch.nn.functional.pad(mask, (0, self.crop - w, 0, self.crop - h), value=SEG_IGNORE)
        return {"image": image, "seg_mask": mask}
