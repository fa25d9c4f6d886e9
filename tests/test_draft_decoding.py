"""Reduced-size JPEG decoding in the image-MIM reader: the crop is planned from the image's size
before its pixels are decoded, with the same random draws in the same order as torchvision's
ColorJitter -> RandomHorizontalFlip -> RandomResizedCrop, so a sample that cannot be reduced is
bit-identical to BEiT's pipeline, and one that can is decoded at 1/2-1/8 size (PIL's draft mode)
and stays close to the full decode, EXIF orientation included."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from custom_datasets.image_io import PLAN_KEY, open_rgb
from custom_datasets.transforms import MODES, TwoViewConfig, TwoViewTransform, mean_std

CFG = TwoViewConfig(image_size=64, second_image_size=32)


def photo(path, size, orientation: int | None = None):
    """A smooth, photo-like JPEG (or PNG), optionally stored sideways with an EXIF orientation."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pixels = np.stack([np.sin(xx / 37 + c) * np.cos(yy / 53 - c) for c in range(3)], -1)
    image = Image.fromarray(np.clip(127 + 100 * pixels, 0, 255).astype(np.uint8))
    exif = None
    if orientation is not None:
        image = image.transpose(Image.Transpose.ROTATE_90)  # stored sideways; orientation 6 turns it back
        exif = Image.Exif()
        exif[0x0112] = orientation
    image.save(path, **({"exif": exif} if exif is not None else {}), **({"quality": 95} if path.suffix == ".jpg" else {}))
    return path


def beit_views(image: Image.Image, cfg: TwoViewConfig):
    """BEiT's pipeline as torchvision composes it: the reference the planned transform must equal."""
    pre = T.Compose([T.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter), T.RandomHorizontalFlip(cfg.hflip)])
    image = pre(image)
    top, left, h, w = T.RandomResizedCrop.get_params(image, scale=(cfg.min_crop_scale, 1.0), ratio=(3 / 4, 4 / 3))
    view = TF.resized_crop(image, top, left, h, w, [cfg.image_size] * 2, MODES[cfg.interpolation])
    token = TF.resized_crop(image, top, left, h, w, [cfg.second_image_size] * 2, MODES[cfg.second_interpolation])
    return T.Normalize(*mean_std(False))(TF.to_tensor(view)), TF.to_tensor(token)


@pytest.mark.parametrize("name, size", [("small.jpg", (90, 70)), ("any.png", (400, 300))])
def test_a_sample_that_cannot_be_reduced_is_bit_identical_to_beits_pipeline(tmp_path, name, size):
    path = photo(tmp_path / name, size)
    transform = TwoViewTransform(CFG)
    for seed in range(12):
        torch.manual_seed(seed)
        expected = beit_views(open_rgb(path), CFG)
        after_reference = torch.rand(1)
        torch.manual_seed(seed)
        image = open_rgb(path, transform.draft_planner)
        assert image.size == size  # a PNG is never reduced; a small JPEG's crops never allow it
        got = transform(image)
        assert torch.rand(1) == after_reference  # the same draws, in the same number
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        torch.manual_seed(seed)
        unplanned = transform(open_rgb(path))  # an image read without a planner draws at transform time
        assert torch.equal(unplanned[0], expected[0]) and torch.equal(unplanned[1], expected[1])


@pytest.mark.parametrize("orientation", [None, 6])
def test_a_large_jpeg_is_decoded_reduced_and_gives_the_full_decodes_views(tmp_path, orientation):
    path = photo(tmp_path / "large.jpg", (1600, 1200), orientation)
    transform = TwoViewTransform(CFG)
    reduced = 0
    for seed in range(10):
        torch.manual_seed(seed)
        image = open_rgb(path, transform.draft_planner)
        plan, full = image.info[PLAN_KEY]
        assert full == (1600, 1200)  # upright, whatever way it was stored
        reduced += image.size != full
        assert image.width / image.height == pytest.approx(4 / 3, rel=0.01)
        got = transform(image)
        full_image = open_rgb(path)
        full_image.info[PLAN_KEY] = (plan, full)  # the same choices on the full-size pixels
        expected = transform(full_image)
        assert (got[1] - expected[1]).abs().mean() < 0.01  # [0, 1] pixels: reduced decoding moves them by < 1%
        assert (got[0] - expected[0]).abs().mean() < 0.02  # normalised to [-1, 1]
    assert reduced >= 5  # at 64 px almost every crop of a 1600x1200 image allows 1/2 or less


def test_held_out_views_draw_nothing_and_reduce_their_centre_crop(tmp_path):
    path = photo(tmp_path / "large.jpg", (1600, 1200))
    transform = TwoViewTransform(TwoViewConfig(image_size=64, second_image_size=32, train=False))
    torch.manual_seed(0)
    next_draw = torch.rand(1)
    torch.manual_seed(0)
    image = open_rgb(path, transform.draft_planner)
    got = transform(image)
    assert torch.rand(1) == next_draw  # a held-out view is a function of the image alone
    assert image.size == (200, 150)  # 1/8: the 1200 px centre square keeps 150 >= 64 px a side
    expected = transform(open_rgb(path))
    assert (got[1] - expected[1]).abs().mean() < 0.01 and (got[0] - expected[0]).abs().mean() < 0.02
