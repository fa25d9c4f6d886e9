"""Mask generators and the two-view augmentation."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from custom_datasets.masking import BlockwiseMaskGenerator, RandomMaskGenerator, default_num_mask_patches
from custom_datasets.transforms import TwoViewConfig, TwoViewTransform


@pytest.mark.parametrize("grid, count", [((14, 14), 75), ((8, 8), 24), ((7, 10), 30), ((14, 14), 150)])
def test_blockwise_masks_exact_count(grid, count):
    gen = BlockwiseMaskGenerator(grid, count, min_num_patches=min(16, count))
    rng = random.Random(0)
    for _ in range(200):
        mask = gen(rng)
        assert mask.shape == grid and mask.dtype == bool and int(mask.sum()) == count


def test_blocks_are_rectangles_within_the_aspect_limits():
    gen = BlockwiseMaskGenerator((14, 14), 16, min_num_patches=16, max_num_patches=16)
    rng = random.Random(1)
    rectangles = 0
    for _ in range(300):
        mask = gen(rng)
        rows, cols = np.nonzero(mask)
        h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
        if h * w == mask.sum():  # one block covered the whole budget (else a top-up patch was added)
            # aspect drawn in [0.3, 1/0.3], then rounded to whole patches; never the full grid side
            assert 0.25 <= h / w <= 4 and h < 14 and w < 14
            rectangles += 1
    assert rectangles > 50


def test_blockwise_is_clustered_and_random_is_not():
    rng = random.Random(2)
    block = BlockwiseMaskGenerator((14, 14), 75)
    bern = RandomMaskGenerator((14, 14), 75 / 196)
    block_parts = np.mean([ndimage.label(block(rng))[1] for _ in range(100)])
    bern_parts = np.mean([ndimage.label(bern(rng))[1] for _ in range(100)])
    assert block_parts < 8 < bern_parts


def test_random_masking_rate():
    masks = np.stack([RandomMaskGenerator((14, 14), 0.55)(random.Random(i)) for i in range(300)])
    assert abs(masks.mean() - 0.55) < 0.01


def test_default_num_mask_patches_is_beits_fraction():
    assert default_num_mask_patches(196) == 75 and default_num_mask_patches(64) == 24


def test_two_views_cover_the_same_region():
    yy, xx = np.mgrid[0:200, 0:300]
    pattern = np.stack([xx * 255 / 300, yy * 255 / 200, (xx + yy) % 256], -1).astype(np.uint8)
    image = Image.fromarray(pattern)
    transform = TwoViewTransform(TwoViewConfig(image_size=64, second_image_size=32, color_jitter=0.0, hflip=0.5))
    for seed in range(10):
        torch.manual_seed(seed)
        view, token_view = transform(image)
        assert view.shape == (3, 64, 64) and token_view.shape == (3, 32, 32)
        unnormalised = view * 0.5 + 0.5  # inception mean/std
        down = F.interpolate(unnormalised[None], size=32, mode="area")[0]
        assert (down - token_view).abs().mean() < 0.02
        assert 0 <= token_view.min() and token_view.max() <= 1
