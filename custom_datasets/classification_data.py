"""Labelled image folders for downstream classification (ImageNet layout: `train/<class>/*`,
`val/<class>/*`), with timm's BEiT-recipe transforms and the same class indices in both splits."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from custom_datasets.batch import IMAGE
from custom_datasets.file_index import scan
from custom_datasets.image_folder import ImageFiles
from custom_datasets.settings import AugmentSettings, FinetuneDataSettings
from custom_datasets.split import file_key, held_out_flags
from custom_datasets.transforms import mean_std


class LabelledSample:
    """PIL image -> {"image": tensor} (a class, so DataLoader workers can pickle it)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, image, key: int | None = None) -> dict[str, Any]:
        return {IMAGE: self.transform(image)}


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


def eval_transform(size: int, crop_pct: float = 0.875, imagenet: bool = False):
    """Resize + centre crop + normalise, the held-out view."""
    mean, std = mean_std(imagenet)
    return recorded_transform({"image_size": size, "crop_pct": crop_pct, "mean": mean, "std": std})


def recorded_transform(preprocessing: dict):
    """The held-out view a checkpoint records (`models/run_info.py`): what predict, search and
    exports apply."""
    from timm.data import create_transform

    return create_transform(int(preprocessing["image_size"]), is_training=False,
                            interpolation=preprocessing.get("interpolation", "bicubic"),
                            crop_pct=float(preprocessing["crop_pct"]), mean=tuple(preprocessing["mean"]),
                            std=tuple(preprocessing["std"]), crop_mode=preprocessing.get("crop_mode", "center"))


def whole_image_preprocessing(input_size: int, imagenet: bool) -> dict:
    """The held-out view of image-text reasoning (VQA, NLVR2): the whole image resized to a square."""
    mean, std = mean_std(imagenet)
    return {"image_size": input_size, "crop_pct": 1.0, "mean": list(mean), "std": list(std),
            "interpolation": "bicubic", "crop_mode": "squash"}


def whole_image_transform(aug: AugmentSettings, input_size: int, train: bool):
    """VQA and NLVR2 see the whole image, never cropped or flipped (counts, "left" and "right" must
    hold); training adds RandAugment (--aa) before the resize, as VLMo does."""
    from timm.data.auto_augment import rand_augment_transform
    from torchvision import transforms

    view = recorded_transform(whole_image_preprocessing(input_size, aug.imagenet_default_mean_and_std))
    if not (train and aug.aa):
        return view
    patch_timm_posterize()
    mean, _ = mean_std(aug.imagenet_default_mean_and_std)
    hparams = {"translate_const": int(input_size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
    return transforms.Compose([rand_augment_transform(aug.aa, hparams), view])


def build_transform(aug: AugmentSettings, input_size: int, train: bool, image_text: bool = False):
    """BEiT's fine-tuning views. Image-text tasks crop less (VLMo: at least half the image) and never
    flip, since a caption's "left" and "right" would no longer hold."""
    if not train:
        return eval_transform(input_size, aug.crop_pct, aug.imagenet_default_mean_and_std)
    from timm.data import create_transform

    patch_timm_posterize()
    mean, std = mean_std(aug.imagenet_default_mean_and_std)
    scale = aug.min_crop_scale if aug.min_crop_scale is not None else (0.5 if image_text else 0.08)
    return create_transform(input_size, is_training=True, scale=(scale, 1.0), hflip=0.0 if image_text else 0.5,
                            auto_augment=aug.aa or None, re_prob=aug.reprob, re_mode="pixel", interpolation="bicubic",
                            mean=mean, std=std)


def split_roots(data: FinetuneDataSettings) -> tuple[Path, Path]:
    root = Path(data.data_path)
    train = root / "train" if (root / "train").is_dir() else root
    val = Path(data.eval_data_path) if data.eval_data_path else root / "val"
    if not train.is_dir():
        raise UserError(f"--data_path {root} does not exist; pass a folder with train/<class>/ and val/<class>/")
    if not val.is_dir():
        raise UserError(f"no held-out images: {val} does not exist; add val/<class>/ folders or pass --eval_data_path")
    return train, val


def build_classification_datasets(data: FinetuneDataSettings, train_transform, val_transform):
    """(train, val, model-selection split or None); the selection split is a `--model_selection_fraction`
    of the training folder, seen with the held-out view."""
    train_root, val_root = split_roots(data)
    train = ImageFiles(train_root, LabelledSample(train_transform))
    if len(train.class_to_idx) < 2:
        raise UserError(f"{train_root} must hold one folder per class (found {len(train.class_to_idx)} classes)")
    val = ImageFiles(val_root, LabelledSample(val_transform), class_to_idx=train.class_to_idx, scaler=train.scaler)
    if not data.model_selection_fraction:
        return train, val, None
    held = np.array(held_out_flags((file_key(p) for p in train.table), data.model_selection_fraction))
    if held.all() or not held.any():
        raise UserError(f"--model_selection_fraction {data.model_selection_fraction} leaves no training or no "
                        f"selection images of the {len(held)} in {train_root}; use a value in (0, 1)")

    def part(rows: np.ndarray, transform) -> ImageFiles:
        return ImageFiles(train_root, LabelledSample(transform), table=train.table, indices=rows,
                          class_to_idx=train.class_to_idx, scaler=train.scaler)

    return part(np.flatnonzero(~held), train_transform), val, part(np.flatnonzero(held), val_transform)


def count_training_images(data_path: str, limit: int) -> int:
    """Image files under `--data_path`'s training folder, counted up to `limit` (cheap on any size)."""
    root = Path(data_path)
    return len(scan(root / "train" if (root / "train").is_dir() else root, limit)) if root.is_dir() else 0
