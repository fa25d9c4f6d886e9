"""`--data_path "A::B" --data_weights 3 1`: several image folders, each split as a single one
would be; the training sources mixed with the weights, the held-out images of all together."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import ConcatDataset

from common.errors import UserError
from custom_datasets.image_folder import ImageFiles
from custom_datasets.mixing import SEPARATOR, MixedSources, check_weights, split_sources
from custom_datasets.settings import PretrainDataConfig
from custom_datasets.sources.base import DataSource
from custom_datasets.sources.image_folder import held_out_split, in_data_path, parse_bands


def _claims(cfg: PretrainDataConfig, kind: str) -> bool:
    return bool(cfg.data.data_path) and SEPARATOR in cfg.data.data_path


def _build(cfg: PretrainDataConfig, kind: str, builders):
    train_build, val_build = builders
    data = cfg.data
    roots = split_sources(data.data_path)
    weights = check_weights(roots, data.data_weights)
    bands = parse_bands(data.bands)
    trains, vals = [], []
    for root in map(Path, roots):
        table, train, held_out = held_out_split(root, None, data.val_fraction, "--val_fraction 0")
        trains.append(ImageFiles(root, train_build, bands, table, train))
        vals.append(ImageFiles(root, val_build, bands, table, held_out, scaler=trains[-1].scaler))
    return MixedSources(trains, weights, roots), ConcatDataset(vals)


def _check(cfg: PretrainDataConfig, kind: str) -> None:
    data = cfg.data
    check_weights(split_sources(data.data_path), data.data_weights)
    if data.eval_data_path:
        raise UserError("--eval_data_path with several --data_path sources: leave it out (each source holds out a "
                        "--val_fraction of its own) or mix the sources into one folder")
    parse_bands(data.bands)


SOURCE = DataSource("mixed image folders", '--data_path "A::B" --data_weights', ("image",), _claims, _build,
                    in_data_path, inputs=lambda cfg: {"data_path": split_sources(cfg.data.data_path)}, check=_check)
