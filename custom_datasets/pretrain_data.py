"""Datasets for image pretraining: the synthetic world or a folder of images / .npy tiles, each
sample carrying the backbone view, the tokenizer view and the MIM mask (made in the worker)."""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from custom_datasets.image_folder import ImageFiles, list_image_files
from custom_datasets.masking import BlockwiseMaskGenerator, RandomMaskGenerator, default_num_mask_patches
from custom_datasets.synthetic_world import SyntheticWorld
from custom_datasets.transforms import TwoViewConfig, TwoViewTransform
from util.errors import UserError

SYNTHETIC = "synthetic"


class MIMSampleBuilder:
    """PIL image -> {"image", "tokenizer_image", "bool_masked_pos"} (a class, so workers can pickle it)."""

    def __init__(self, transform: TwoViewTransform, masker) -> None:
        self.transform, self.masker = transform, masker

    def __call__(self, image: Image.Image) -> dict[str, Any]:
        view, token_view = self.transform(image)
        mask = torch.from_numpy(self.masker().reshape(-1))
        return {"image": view, "tokenizer_image": token_view, "bool_masked_pos": mask}


def build_masker(args: argparse.Namespace, grid: tuple[int, int]):
    if args.mask_strategy == "random":
        return RandomMaskGenerator(grid, args.mim_probability)
    n = args.num_mask_patches or default_num_mask_patches(grid[0] * grid[1])
    if n > grid[0] * grid[1]:
        raise UserError(f"--num_mask_patches {n} exceeds the {grid[0] * grid[1]} patches of a "
                        f"{args.image_size}px image; lower it")
    return BlockwiseMaskGenerator(grid, n, min_num_patches=min(args.min_mask_patches_per_block, n),
                                  max_num_patches=args.max_mask_patches_per_block)


def two_view_config(args: argparse.Namespace, train: bool) -> TwoViewConfig:
    return TwoViewConfig(image_size=args.image_size, second_image_size=args.second_image_size,
                         min_crop_scale=args.min_crop_scale, color_jitter=args.color_jitter,
                         imagenet_default_mean_and_std=args.imagenet_default_mean_and_std, train=train)


def _is_val_file(path: Path, fraction: float) -> bool:
    digest = hashlib.md5(path.name.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < fraction


def parse_bands(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        bands = [int(b) for b in str(text).split(",")]
    except ValueError:
        raise UserError(f"--bands {text} must be comma-separated band indices, e.g. 3,2,1") from None
    if len(bands) != 3:
        raise UserError(f"--bands {text} must name exactly three bands (red, green, blue)")
    return bands


def build_image_datasets(args: argparse.Namespace, grid: tuple[int, int]) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for image pretraining."""
    masker = build_masker(args, grid)
    train_build = MIMSampleBuilder(TwoViewTransform(two_view_config(args, True)), masker)
    val_build = MIMSampleBuilder(TwoViewTransform(two_view_config(args, False)), masker)
    if args.data_path in (None, SYNTHETIC):
        return (SyntheticWorld("train", args.synthetic_train_size, args.seed, args.synthetic_render_size, train_build),
                SyntheticWorld("val", args.synthetic_val_size, args.seed, args.synthetic_render_size, val_build))
    bands = parse_bands(args.bands)
    root = Path(args.data_path)
    if args.eval_data_path:
        return ImageFiles(root, train_build, bands), ImageFiles(args.eval_data_path, val_build, bands)
    files = list_image_files(root)
    val = [f for f in files if _is_val_file(f, args.val_fraction)] or files[:1]
    train = [f for f in files if f not in set(val)] or files
    return ImageFiles(root, train_build, bands, train), ImageFiles(root, val_build, bands, val)
