"""One folder of images and/or `.npy` tiles (`--bands` picks a tile's three bands), held out by
file name (`--val_fraction`) or from `--eval_data_path`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import UserError
from custom_datasets.file_index import index_folder
from custom_datasets.image_folder import ImageFiles
from custom_datasets.mixing import SEPARATOR, check_weights
from custom_datasets.settings import PretrainDataConfig
from custom_datasets.sources.base import DataSource
from custom_datasets.split import require_training_left


def parse_bands(text: object) -> list[int] | None:
    if text is None:
        return None
    try:
        bands = [int(b) for b in str(text).split(",")]  # a --config file may give a number or a list
    except ValueError:
        raise UserError(f"--bands {text} must be comma-separated band indices, e.g. 3,2,1") from None
    if len(bands) != 3:
        raise UserError(f"--bands {text} must name exactly three bands (red, green, blue)")
    return bands


def held_out_split(root: Path, cache: Path | None, val_fraction: float, instead: str):
    """(the folder's index, its training rows, its held-out rows), with training left."""
    table = index_folder(root, cache, held_out_fraction=val_fraction)
    train = np.flatnonzero(~table.held_out)
    require_training_left(len(train), len(table), f"--data_path {root}", instead)
    return table, train, np.flatnonzero(table.held_out)


def _claims(cfg: PretrainDataConfig, kind: str) -> bool:
    return bool(cfg.data.data_path) and SEPARATOR not in cfg.data.data_path


def _build(cfg: PretrainDataConfig, kind: str, builders):
    train_build, val_build = builders
    data = cfg.data
    bands = parse_bands(data.bands)
    root = Path(data.data_path)
    cache = Path(cfg.index_cache) if cfg.index_cache else None
    if data.eval_data_path:
        train_set = ImageFiles(root, train_build, bands, index_folder(root, cache))
        return train_set, ImageFiles(data.eval_data_path, val_build, bands, scaler=train_set.scaler)
    table, train, held_out = held_out_split(root, cache, data.val_fraction, "--eval_data_path")
    train_set = ImageFiles(root, train_build, bands, table, train)
    return train_set, ImageFiles(root, val_build, bands, table, held_out, scaler=train_set.scaler)


def _check(cfg: PretrainDataConfig, kind: str) -> None:
    check_weights([cfg.data.data_path], cfg.data.data_weights)  # one folder: weights are refused
    parse_bands(cfg.data.bands)


def in_data_path(cfg: PretrainDataConfig, what: str) -> str:
    return f"{what} in {cfg.data.data_path}"


SOURCE = DataSource("image folder", "--data_path FOLDER (images, .npy tiles)", ("image",), _claims, _build,
                    in_data_path, check=_check)
