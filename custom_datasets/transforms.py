"""BEiT's augmentation: one random resized crop seen at two resolutions (bicubic for the backbone,
lanczos for the visual tokenizer), after colour jitter and flip."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from custom_datasets.image_io import PLAN_KEY

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # BEiT's default ("inception" mean/std)


def mean_std(imagenet: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean/std, or 0.5/0.5."""
    return (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (HALF, HALF)


@dataclass
class TwoViewConfig:
    image_size: int = 224
    second_image_size: int | None = 112  # None: no tokenizer view (MAE reads pixels)
    min_crop_scale: float = 0.08
    color_jitter: float = 0.4
    hflip: float = 0.5
    imagenet_default_mean_and_std: bool = False
    train: bool = True
    interpolation: str = "bicubic"  # backbone view
    second_interpolation: str = "lanczos"  # tokenizer view


MODES = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
         "lanczos": InterpolationMode.LANCZOS, "nearest": InterpolationMode.NEAREST}


def interpolation_mode(name: str) -> InterpolationMode:
    """`random` picks bilinear or bicubic per image (BEiT's option); the global RNG is seeded per
    DataLoader worker and epoch."""
    if name == "random":
        return random.choice((InterpolationMode.BILINEAR, InterpolationMode.BICUBIC))
    return MODES[name]


@dataclass(frozen=True)
class ViewPlan:
    """The random choices of one sample, drawn before its pixels are decoded (they need only its
    size), in the order torchvision's ColorJitter, RandomHorizontalFlip and RandomResizedCrop draw
    them: `crop` is (top, left, height, width) in the full-size image's pixels."""

    jitter: tuple | None  # ColorJitter.get_params: (order, brightness, contrast, saturation, hue)
    flip: bool
    crop: tuple[int, int, int, int]

    def decode_size(self, size: tuple[int, int], needed: int) -> tuple[int, int] | None:
        """The smallest (width, height) a JPEG may be decoded at while the crop keeps at least
        `needed` pixels a side (PIL's draft mode decodes at 1/2, 1/4 or 1/8 by DCT scaling), or
        None when only the full size will do."""
        reduction = min(self.crop[2], self.crop[3]) / needed
        if reduction < 2:
            return None
        return math.ceil(size[0] / reduction), math.ceil(size[1] / reduction)


class TwoViewTransform:
    """PIL image -> (backbone view normalised `[3, S, S]`, tokenizer view in [0, 1] `[3, S2, S2]`).
    At eval time: a centre crop of the whole image, no jitter or flip. An image read with this
    transform's `plan` (custom_datasets/image_io.py `open_rgb(path, planner)`) carries its plan, and
    may have been decoded at a reduced size where the crop allows it; the views then come from the
    reduced pixels, with the same random choices."""

    def __init__(self, cfg: TwoViewConfig) -> None:
        self.cfg = cfg
        self.normalize = T.Normalize(*mean_std(cfg.imagenet_default_mean_and_std))
        self.jitter = T.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter) if cfg.color_jitter > 0 else None

    def plan(self, size: tuple[int, int]) -> ViewPlan:
        """The random choices for an image of `size` (width, height)."""
        w, h = size
        if not self.cfg.train:
            side = min(w, h)
            return ViewPlan(None, False, ((h - side) // 2, (w - side) // 2, side, side))
        j = self.jitter
        jitter = j.get_params(j.brightness, j.contrast, j.saturation, j.hue) if j is not None else None
        flip = bool(torch.rand(1) < self.cfg.hflip)
        shape_only = torch.empty(1).expand(1, h, w)  # get_params reads only the size
        crop = T.RandomResizedCrop.get_params(shape_only, scale=(self.cfg.min_crop_scale, 1.0), ratio=(3 / 4, 4 / 3))
        return ViewPlan(jitter, flip, tuple(crop))

    def draft_planner(self, size: tuple[int, int]) -> tuple[ViewPlan, tuple[int, int] | None]:
        """For `open_rgb`: the plan of an image of `size`, and the size it may be decoded at."""
        plan = self.plan(size)
        return plan, plan.decode_size(size, self.cfg.image_size)

    @staticmethod
    def whole_image_part(image: Image.Image, plan: ViewPlan) -> Image.Image:
        """Colour jitter and flip, applied to the whole image before the crop (as BEiT does)."""
        image = adjust_colours(image, plan.jitter)
        return TF.hflip(image) if plan.flip else image

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor | None]:
        plan, full_size = image.info.pop(PLAN_KEY, (None, image.size))  # a plan is used once
        plan = plan or self.plan(image.size)
        image = self.whole_image_part(image, plan)
        size, second = self.cfg.image_size, self.cfg.second_image_size
        view = resized_crop(image, plan.crop, full_size, size, interpolation_mode(self.cfg.interpolation))
        token_view = None if second is None else TF.to_tensor(
            resized_crop(image, plan.crop, full_size, second, interpolation_mode(self.cfg.second_interpolation)))
        return self.normalize(TF.to_tensor(view)), token_view


def adjust_colours(image: Image.Image, jitter: tuple | None) -> Image.Image:
    """ColorJitter's adjustments with drawn parameters, in its drawn order (as its forward does)."""
    if jitter is None:
        return image
    order, *factors = jitter
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for index in order.tolist():
        if factors[index] is not None:
            image = adjust[index](image, factors[index])
    return image


def resized_crop(image: Image.Image, crop: tuple[int, int, int, int], full_size: tuple[int, int], side: int,
                 mode: InterpolationMode) -> Image.Image:
    """The crop (in `full_size` pixels) of `image`, resized to `side` x `side`. An image decoded at
    a reduced size is cropped at the same place in its own pixels, to the sub-pixel."""
    top, left, h, w = crop
    if image.size == full_size:
        return TF.resized_crop(image, top, left, h, w, [side, side], mode)
    sx, sy = image.width / full_size[0], image.height / full_size[1]
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    return image.resize((side, side), TF.pil_modes_mapping[mode], box=box)
