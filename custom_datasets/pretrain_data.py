"""Datasets of every pretraining mode, by data kind ("image", "text", "pair"), from the reader the
flags ask for (custom_datasets/sources/, one file per reader). Image samples carry the backbone
view, the tokenizer view and the MIM mask (made in the worker); captions are tokenized and
MLM-masked by the collate."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image
from torch.utils.data import Dataset

from common.errors import UserError
from custom_datasets import batch as B
from custom_datasets.collate import collate_skipping_bad
from custom_datasets.masking import (
    BlockwiseMaskGenerator,
    FractionMaskGenerator,
    RandomMaskGenerator,
    default_num_mask_patches,
)
from custom_datasets.settings import PretrainDataConfig
from custom_datasets.sources import build_datasets
from custom_datasets.text_collate import CaptionCollator
from custom_datasets.text_masking import masker_for
from custom_datasets.transforms import TwoViewConfig, TwoViewTransform


class MIMSampleBuilder:
    """PIL image -> {"image", "tokenizer_image", "bool_masked_pos"} (a class, so workers can pickle it).
    Training masks come from the global RNG (seeded per worker and epoch); with `fixed_masks` (held-out
    data) a sample's mask is a function of its key alone, so every evaluation, stage report and
    worker count sees the same masks."""

    def __init__(self, transform: TwoViewTransform, masker, fixed_masks: bool = False, seed: int = 0) -> None:
        self.transform, self.masker, self.fixed_masks, self.seed = transform, masker, fixed_masks, seed

    def draft_planner(self, size: tuple[int, int]):
        """Readers pass this to `open_rgb`: a JPEG is decoded at the reduced size its crop allows."""
        return self.transform.draft_planner(size)

    def __call__(self, image: Image.Image, key: int | None = None) -> dict[str, Any]:
        view, token_view = self.transform(image)
        rng = random.Random(f"{self.seed}:mask:{key}") if self.fixed_masks and key is not None else None
        mask = torch.from_numpy(self.masker(rng).reshape(-1))
        sample = {B.IMAGE: view, B.MASKED_PATCHES: mask}
        if token_view is not None:  # MAE reads pixels: no tokenizer view
            sample[B.TOKENIZER_IMAGE] = token_view
        return sample


def build_masker(cfg: PretrainDataConfig, grid: tuple[int, int]):
    views = cfg.views
    if cfg.masks == "mae":
        try:
            return FractionMaskGenerator(grid, views.mask_ratio)
        except ValueError as err:
            raise UserError(str(err)) from None
    if views.mask_strategy == "random":
        return RandomMaskGenerator(grid, views.mim_probability)
    n = views.num_mask_patches or default_num_mask_patches(grid[0] * grid[1])
    if n > grid[0] * grid[1]:
        raise UserError(f"--num_mask_patches {n} exceeds the {grid[0] * grid[1]} patches of a "
                        f"{cfg.image_size}px image; lower it")
    return BlockwiseMaskGenerator(grid, n, min_num_patches=min(views.min_mask_patches_per_block, n),
                                  max_num_patches=views.max_mask_patches_per_block)


def two_view_config(cfg: PretrainDataConfig, train: bool) -> TwoViewConfig:
    views = cfg.views
    return TwoViewConfig(image_size=cfg.image_size, second_image_size=cfg.second_image_size,
                         min_crop_scale=views.min_crop_scale, color_jitter=views.color_jitter,
                         imagenet_default_mean_and_std=views.imagenet_default_mean_and_std, train=train,
                         interpolation=views.train_interpolation,
                         second_interpolation=views.second_interpolation or "lanczos")  # unset: BEiT's


def sample_builders(cfg: PretrainDataConfig, grid: tuple[int, int]) -> tuple[MIMSampleBuilder, MIMSampleBuilder]:
    """(training, held-out) image -> sample functions."""
    masker = build_masker(cfg, grid)
    return (MIMSampleBuilder(TwoViewTransform(two_view_config(cfg, True)), masker),
            MIMSampleBuilder(TwoViewTransform(two_view_config(cfg, False)), masker, fixed_masks=True, seed=cfg.seed))


def build_image_datasets(cfg: PretrainDataConfig, grid: tuple[int, int]) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for image pretraining."""
    return build_datasets(cfg, "image", sample_builders(cfg, grid))


@dataclass
class PretrainData:
    train: Dataset
    val: Dataset
    train_collate: Callable
    val_collate: Callable


def build_pretrain_data(cfg: PretrainDataConfig, kind: str, grid: tuple[int, int], text_tokenizer=None,
                        mlm_masks: bool = False) -> PretrainData:
    """Datasets and collate functions for a mode's data kind ("image", "text" or "pair")."""
    if kind == "image":
        train, val = build_image_datasets(cfg, grid)
        return PretrainData(train, val, collate_skipping_bad, collate_skipping_bad)
    masker = masker_for(text_tokenizer, cfg.text.mlm_probability) if mlm_masks else None
    train, val = build_datasets(cfg, kind, None if kind == "text" else sample_builders(cfg, grid))
    max_len = cfg.text.max_text_len
    return PretrainData(train, val, CaptionCollator(text_tokenizer, max_len, masker, train=True),
                        CaptionCollator(text_tokenizer, max_len, masker, train=False))
