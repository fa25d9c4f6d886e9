"""Labelled image folders for downstream classification (ImageNet layout: `train/<class>/*`,
`val/<class>/*`), with timm's BEiT-recipe transforms and the same class indices in both splits."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from custom_datasets.image_folder import ImageFiles
from util.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


class LabelledSample:
    """PIL image -> {"image": tensor} (a class, so DataLoader workers can pickle it)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, image) -> dict[str, Any]:
        return {"image": self.transform(image)}


def _posterize_at_least_one_bit(img, bits_to_keep, **_):
    from PIL import ImageOps

    return img if bits_to_keep >= 8 else ImageOps.posterize(img, max(1, int(bits_to_keep)))


def patch_timm_posterize() -> None:
    """timm's RandAugment 'PosterizeIncreasing' asks for 0 bits at high magnitude, which Pillow >= 10
    rejects ("bits must be between or equal to 1 and 8"); keep one bit instead, the nearest valid op."""
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize_at_least_one_bit


def mean_std(imagenet: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (HALF, HALF)


def eval_transform(size: int, crop_pct: float = 0.875, imagenet: bool = False):
    """Resize + centre crop + normalise, the held-out view (also what predict and search use)."""
    from timm.data import create_transform

    mean, std = mean_std(imagenet)
    return create_transform(size, is_training=False, interpolation="bicubic", crop_pct=crop_pct, mean=mean, std=std)


def build_transform(args: argparse.Namespace, train: bool):
    if not train:
        return eval_transform(args.input_size, args.crop_pct, args.imagenet_default_mean_and_std)
    from timm.data import create_transform

    patch_timm_posterize()
    mean, std = mean_std(args.imagenet_default_mean_and_std)
    return create_transform(args.input_size, is_training=True, auto_augment=args.aa or None, re_prob=args.reprob,
                            re_mode="pixel", interpolation="bicubic", mean=mean, std=std)


def split_roots(args: argparse.Namespace) -> tuple[Path, Path]:
    root = Path(args.data_path)
    train = root / "train" if (root / "train").is_dir() else root
    val = Path(args.eval_data_path) if args.eval_data_path else root / "val"
    if not train.is_dir():
        raise UserError(f"--data_path {root} does not exist; pass a folder with train/<class>/ and val/<class>/")
    if not val.is_dir():
        raise UserError(f"no held-out images: {val} does not exist; add val/<class>/ folders or pass --eval_data_path")
    return train, val


def build_classification_datasets(args: argparse.Namespace, train_transform=None, val_transform=None):
    train_root, val_root = split_roots(args)
    train = ImageFiles(train_root, LabelledSample(train_transform or build_transform(args, True)))
    if len(train.class_to_idx) < 2:
        raise UserError(f"{train_root} must hold one folder per class (found {len(train.class_to_idx)} classes)")
    val = ImageFiles(val_root, LabelledSample(val_transform or build_transform(args, False)),
                     class_to_idx=train.class_to_idx)
    return train, val
