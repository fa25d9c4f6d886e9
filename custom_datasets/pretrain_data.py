"""Datasets of every pretraining mode, by data kind: images (the synthetic world or a folder of
images / .npy tiles), captions (the synthetic world's or caption files) and image-caption pairs.
Image samples carry the backbone view, the tokenizer view and the MIM mask (made in the worker);
captions are tokenized and MLM-masked by the collate."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

from common.errors import UserError
from custom_datasets import batch as B
from custom_datasets.collate import collate_skipping_bad
from custom_datasets.file_index import index_folder
from custom_datasets.image_folder import ImageFiles
from custom_datasets.masking import (
    BlockwiseMaskGenerator,
    FractionMaskGenerator,
    RandomMaskGenerator,
    default_num_mask_patches,
)
from custom_datasets.mixing import SEPARATOR, MixedSources, check_weights, split_sources
from custom_datasets.pair_data import ImageCaptionPairs, SyntheticCaptions
from custom_datasets.settings import SYNTHETIC, PretrainDataConfig
from custom_datasets.split import file_key, record_keys, require_training_left, split_held_out
from custom_datasets.synthetic_world import SyntheticWorld
from custom_datasets.text_collate import CaptionCollator
from custom_datasets.text_data import CaptionCorpus, read_pairs
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


def is_synthetic(cfg: PretrainDataConfig) -> bool:
    """Asked for by name only: a run never falls back to the synthetic world."""
    return cfg.data.data_path == SYNTHETIC


def build_image_datasets(cfg: PretrainDataConfig, grid: tuple[int, int]) -> tuple[Dataset, Dataset]:
    """(train, val) datasets for image pretraining."""
    train_build, val_build = sample_builders(cfg, grid)
    data = cfg.data
    if is_synthetic(cfg):
        return (SyntheticWorld("train", data.synthetic_train_size, cfg.seed, data.synthetic_render_size, train_build),
                SyntheticWorld("val", data.synthetic_val_size, cfg.seed, data.synthetic_render_size, val_build))
    if SEPARATOR in data.data_path:
        return build_mixed_image_datasets(cfg, train_build, val_build)
    bands = parse_bands(data.bands)
    root = Path(data.data_path)
    cache = Path(cfg.index_cache) if cfg.index_cache else None
    if data.eval_data_path:
        train_set = ImageFiles(root, train_build, bands, index_folder(root, cache))
        return train_set, ImageFiles(data.eval_data_path, val_build, bands, scaler=train_set.scaler)
    table = index_folder(root, cache, held_out_fraction=data.val_fraction)
    train = np.flatnonzero(~table.held_out)
    require_training_left(len(train), len(table), f"--data_path {root}", "--eval_data_path")
    train_set = ImageFiles(root, train_build, bands, table, train)
    return train_set, ImageFiles(root, val_build, bands, table, np.flatnonzero(table.held_out), scaler=train_set.scaler)


def build_mixed_image_datasets(cfg: PretrainDataConfig, train_build, val_build) -> tuple[Dataset, Dataset]:
    """`--data_path "A::B" --data_weights 3 1`: each folder split as a single one would be; the
    training sources mixed with the weights, the held-out images of all of them together."""
    data = cfg.data
    roots = split_sources(data.data_path)
    weights = check_weights(roots, data.data_weights)
    if data.eval_data_path:
        raise UserError("--eval_data_path with several --data_path sources: leave it out (each source holds out a "
                        "--val_fraction of its own) or mix the sources into one folder")
    bands = parse_bands(data.bands)
    trains, vals = [], []
    for root in map(Path, roots):
        table = index_folder(root, None, held_out_fraction=data.val_fraction)
        train = np.flatnonzero(~table.held_out)
        require_training_left(len(train), len(table), f"--data_path {root}", "--val_fraction 0")
        trains.append(ImageFiles(root, train_build, bands, table, train))
        vals.append(ImageFiles(root, val_build, bands, table, np.flatnonzero(table.held_out), scaler=trains[-1].scaler))
    return MixedSources(trains, weights, roots), ConcatDataset(vals)


@dataclass
class PretrainData:
    train: Dataset
    val: Dataset
    train_collate: Callable
    val_collate: Callable


def build_text_datasets(cfg: PretrainDataConfig) -> tuple[Dataset, Dataset]:
    text, data = cfg.text, cfg.data
    if not text.data_file_path and is_synthetic(cfg):
        return (SyntheticCaptions("train", data.synthetic_train_size, cfg.seed),
                SyntheticCaptions("val", data.synthetic_val_size, cfg.seed))
    corpus = CaptionCorpus(list(text.data_file_path))
    if text.eval_data_file_path:
        return corpus, CaptionCorpus([text.eval_data_file_path])
    indices = list(range(len(corpus)))
    train, val = split_held_out(indices, record_keys(len(corpus)), data.val_fraction,
                                f"--data_file_path {' '.join(text.data_file_path)}")
    return Subset(corpus, train), Subset(corpus, val)


def build_webdataset_pairs(cfg: PretrainDataConfig, train_build, val_build) -> tuple[Dataset, Dataset]:
    """Training pairs streamed from tar shards; held-out pairs from --eval_data_file_path (JSON) or
    --eval_data_path (shards, counted once)."""
    from common.url_secrets import masked_url
    from custom_datasets.webdataset_pairs import (
        WebDatasetPairs,
        count_samples,
        expand_shards,
        note_epoch_length,
        require_num_samples,
    )

    text, data = cfg.text, cfg.data
    specs = split_sources(data.data_path)
    reading = {"retries": text.shard_retries, "timeout": text.shard_timeout}
    sources = [expand_shards(spec) for spec in specs]
    note_epoch_length(require_num_samples(text.train_num_samples), [s for shards in sources for s in shards])
    train = WebDatasetPairs(sources, text.train_num_samples,
                            train_build, seed=cfg.seed, resampled=text.dataset_resampled,
                            shuffle_buffer=text.shuffle_buffer, weights=check_weights(specs, data.data_weights),
                            names=[masked_url(spec) for spec in specs], **reading)
    if text.eval_data_file_path:
        return train, ImageCaptionPairs(read_pairs(text.eval_data_file_path, None, data.allow_outside_data_path,
                                                   "--eval_data_file_path"), val_build)
    if data.eval_data_path:
        shards = expand_shards(data.eval_data_path, "--eval_data_path")
        return train, WebDatasetPairs(shards, count_samples(shards, **reading), val_build, seed=cfg.seed, shuffle=False,
                                      **reading)
    raise UserError("--webdataset needs held-out pairs: --eval_data_path SHARDS or --eval_data_file_path PAIRS.json")


def build_pair_datasets(cfg: PretrainDataConfig, grid: tuple[int, int]) -> tuple[Dataset, Dataset]:
    text = cfg.text
    if not text.data_file_path and not text.webdataset:
        return build_image_datasets(cfg, grid)  # the synthetic world's samples carry their captions
    train_build, val_build = sample_builders(cfg, grid)
    if text.webdataset:
        return build_webdataset_pairs(cfg, train_build, val_build)
    root = None if is_synthetic(cfg) else cfg.data.data_path
    allow = cfg.data.allow_outside_data_path
    pairs = [p for path in text.data_file_path for p in read_pairs(path, root, allow)]
    if text.eval_data_file_path:
        return (ImageCaptionPairs(pairs, train_build),
                ImageCaptionPairs(read_pairs(text.eval_data_file_path, root, allow, "--eval_data_file_path"), val_build))
    train, val = split_held_out(pairs, (file_key(p[0]) for p in pairs), cfg.data.val_fraction,
                                f"--data_file_path {' '.join(text.data_file_path)}")
    return ImageCaptionPairs(train, train_build), ImageCaptionPairs(val, val_build)


def build_pretrain_data(cfg: PretrainDataConfig, kind: str, grid: tuple[int, int], text_tokenizer=None,
                        mlm_masks: bool = False) -> PretrainData:
    """Datasets and collate functions for a mode's data kind ("image", "text" or "pair")."""
    if kind == "image":
        train, val = build_image_datasets(cfg, grid)
        return PretrainData(train, val, collate_skipping_bad, collate_skipping_bad)
    masker = masker_for(text_tokenizer, cfg.text.mlm_probability) if mlm_masks else None
    train, val = build_text_datasets(cfg) if kind == "text" else build_pair_datasets(cfg, grid)
    max_len = cfg.text.max_text_len
    return PretrainData(train, val, CaptionCollator(text_tokenizer, max_len, masker, train=True),
                        CaptionCollator(text_tokenizer, max_len, masker, train=False))
