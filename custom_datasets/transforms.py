"""BEiT's augmentation: one random resized crop seen at two resolutions (bicubic for the backbone,
lanczos for the visual tokenizer), after colour jitter and flip."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)  # BEiT's default ("inception" mean/std)


def mean_std(imagenet: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's mean/std, or 0.5/0.5."""
    return (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (HALF, HALF)


@dataclass
class TwoViewConfig:
    image_size: int = 224
    second_image_size: int = 112
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


class TwoViewTransform:
    """PIL image -> (backbone view normalised `[3, S, S]`, tokenizer view in [0, 1] `[3, S2, S2]`).
    At eval time: a centre crop of the whole image, no jitter or flip."""

    def __init__(self, cfg: TwoViewConfig) -> None:
        self.cfg = cfg
        self.normalize = T.Normalize(*mean_std(cfg.imagenet_default_mean_and_std))
        jitter = [T.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter)] if cfg.color_jitter > 0 else []
        self.pre = T.Compose(jitter + [T.RandomHorizontalFlip(cfg.hflip)]) if cfg.train else None

    def crop_params(self, image: Image.Image) -> tuple[int, int, int, int]:
        if self.cfg.train:
            return T.RandomResizedCrop.get_params(image, scale=(self.cfg.min_crop_scale, 1.0), ratio=(3 / 4, 4 / 3))
        w, h = image.size
        side = min(w, h)
        return (h - side) // 2, (w - side) // 2, side, side

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pre is not None:
            image = self.pre(image)
        top, left, h, w = self.crop_params(image)
        size, second = self.cfg.image_size, self.cfg.second_image_size
        view = TF.resized_crop(image, top, left, h, w, [size, size], interpolation_mode(self.cfg.interpolation))
        token_view = TF.resized_crop(image, top, left, h, w, [second, second],
                                     interpolation_mode(self.cfg.second_interpolation))
        return self.normalize(TF.to_tensor(view)), TF.to_tensor(token_view)
