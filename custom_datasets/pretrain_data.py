"""Datasets of every pretraining mode, by data kind: images (the synthetic world or a folder of
images / .npy tiles), captions (the synthetic world's or caption files) and image-caption pairs.
Image samples carry the backbone view, the tokenizer view and the MIM mask (made in the worker);
captions are tokenized and MLM-masked by the collate."""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from custom_datasets.collate import collate_skipping_bad
from custom_datasets.image_folder import ImageFiles, list_image_files
from custom_datasets.masking import BlockwiseMaskGenerator, RandomMaskGenerator, default_num_mask_patches
from custom_datasets.pair_data import ImageCaptionPairs, SyntheticCaptions
from custom_datasets.synthetic_world import SyntheticWorld
from custom_datasets.text_collate import CaptionCollator
from custom_datasets.text_data import CaptionCorpus, read_pairs
from custom_datasets.text_masking import masker_for
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


def _is_val_file(path: Path | str, fraction: float) -> bool:
    """A deterministic held-out choice that does not move when files are added or reordered."""
    digest = hashlib.md5(Path(path).name.encode()).digest()
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


@dataclass
class PretrainData:
    train: Dataset
    val: Dataset
    train_collate: Callable
    val_collate: Callable


def _split_indices(n: int, fraction: float) -> tuple[list[int], list[int]]:
    val = [i for i in range(n) if _is_val_file(f"item{i}", fraction)] or [0]
    held = set(val)
    return [i for i in range(n) if i not in held] or list(range(n)), val


def build_text_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    if not args.data_file_path:
        return (SyntheticCaptions("train", args.synthetic_train_size, args.seed),
                SyntheticCaptions("val", args.synthetic_val_size, args.seed))
    corpus = CaptionCorpus(args.data_file_path)
    if args.eval_data_file_path:
        return corpus, CaptionCorpus([args.eval_data_file_path])
    train, val = _split_indices(len(corpus), args.val_fraction)
    return Subset(corpus, train), Subset(corpus, val)


def build_webdataset_pairs(args: argparse.Namespace, train_build, val_build, root) -> tuple[Dataset, Dataset]:
    """Training pairs streamed from tar shards; held-out pairs from --eval_data_file_path (JSON) or
    --eval_data_path (shards, counted once)."""
    from custom_datasets.webdataset_pairs import WebDatasetPairs, count_samples, expand_shards, require_num_samples

    train = WebDatasetPairs(expand_shards(args.data_path), require_num_samples(args.train_num_samples), train_build,
                            seed=args.seed)
    if args.eval_data_file_path:
        return train, ImageCaptionPairs(read_pairs(args.eval_data_file_path, None), val_build)
    if args.eval_data_path:
        shards = expand_shards(args.eval_data_path)
        return train, WebDatasetPairs(shards, count_samples(shards), val_build, seed=args.seed, shuffle=False)
    raise UserError("--webdataset needs held-out pairs: --eval_data_path SHARDS or --eval_data_file_path PAIRS.json")


def build_pair_datasets(args: argparse.Namespace, grid: tuple[int, int]) -> tuple[Dataset, Dataset]:
    if not args.data_file_path and not getattr(args, "webdataset", False):
        return build_image_datasets(args, grid)  # the synthetic world's samples carry their captions
    masker = build_masker(args, grid)
    train_build = MIMSampleBuilder(TwoViewTransform(two_view_config(args, True)), masker)
    val_build = MIMSampleBuilder(TwoViewTransform(two_view_config(args, False)), masker)
    root = None if args.data_path in (None, SYNTHETIC) else args.data_path
    if getattr(args, "webdataset", False):
        return build_webdataset_pairs(args, train_build, val_build, root)
    pairs = [p for path in args.data_file_path for p in read_pairs(path, root)]
    if args.eval_data_file_path:
        return ImageCaptionPairs(pairs, train_build), ImageCaptionPairs(read_pairs(args.eval_data_file_path, root), val_build)
    val = [p for p in pairs if _is_val_file(p[0], args.val_fraction)] or pairs[:1]
    held = {id(p) for p in val}
    train = [p for p in pairs if id(p) not in held] or pairs
    return ImageCaptionPairs(train, train_build), ImageCaptionPairs(val, val_build)


def build_pretrain_data(args: argparse.Namespace, kind: str, grid: tuple[int, int], text_tokenizer=None,
                        mlm_masks: bool = False) -> PretrainData:
    """Datasets and collate functions for a mode's data kind ("image", "text" or "pair")."""
    if kind == "image":
        train, val = build_image_datasets(args, grid)
        return PretrainData(train, val, collate_skipping_bad, collate_skipping_bad)
    masker = masker_for(text_tokenizer, args.mlm_probability) if mlm_masks else None
    train, val = build_text_datasets(args) if kind == "text" else build_pair_datasets(args, grid)
    return PretrainData(train, val, CaptionCollator(text_tokenizer, args.max_text_len, masker, train=True),
                        CaptionCollator(text_tokenizer, args.max_text_len, masker, train=False))
