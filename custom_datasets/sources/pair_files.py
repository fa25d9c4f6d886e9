"""Image-caption pairs listed in files (`--data_file_path PAIRS.json`), their images under
`--data_path` (or the synthetic world's), held out by image file (`--val_fraction`) or from
`--eval_data_file_path`."""
from __future__ import annotations

from custom_datasets.pair_data import ImageCaptionPairs
from custom_datasets.settings import PretrainDataConfig, is_synthetic
from custom_datasets.sources.base import DataSource, refuse_mixed_folders
from custom_datasets.sources.caption_files import in_files
from custom_datasets.split import file_key, split_held_out
from custom_datasets.text_data import read_pairs


def _claims(cfg: PretrainDataConfig, kind: str) -> bool:
    return bool(cfg.text.data_file_path) and not cfg.text.webdataset


def _build(cfg: PretrainDataConfig, kind: str, builders):
    train_build, val_build = builders
    text = cfg.text
    root = None if is_synthetic(cfg) else cfg.data.data_path
    allow = cfg.data.allow_outside_data_path
    pairs = [p for path in text.data_file_path for p in read_pairs(path, root, allow)]
    if text.eval_data_file_path:
        return (ImageCaptionPairs(pairs, train_build),
                ImageCaptionPairs(read_pairs(text.eval_data_file_path, root, allow, "--eval_data_file_path"), val_build))
    train, val = split_held_out(pairs, (file_key(p[0]) for p in pairs), cfg.data.val_fraction,
                                f"--data_file_path {' '.join(text.data_file_path)}")
    return ImageCaptionPairs(train, train_build), ImageCaptionPairs(val, val_build)


def _describe(cfg: PretrainDataConfig, what: str) -> str:
    root = f" (images under {cfg.data.data_path})" if cfg.data.data_path and not is_synthetic(cfg) else ""
    return in_files(cfg, what) + root


SOURCE = DataSource("pair files", "--data_file_path PAIRS.json with --data_path IMAGE_ROOT", ("pair",), _claims, _build,
                    _describe, check=refuse_mixed_folders)
