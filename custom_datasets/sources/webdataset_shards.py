"""Image-text pairs streamed from WebDataset tar shards (`--webdataset`: local, `https://`, `s3://`,
`pipe:`; several mixed with `::` and `--data_weights`); held-out pairs from `--eval_data_file_path`
(JSON) or `--eval_data_path` (shards, counted once)."""
from __future__ import annotations

from common.errors import UserError
from custom_datasets.mixing import check_weights, split_sources
from custom_datasets.pair_data import ImageCaptionPairs
from custom_datasets.settings import PretrainDataConfig
from custom_datasets.sources.base import DataSource
from custom_datasets.text_data import read_pairs


def _claims(cfg: PretrainDataConfig, kind: str) -> bool:
    return cfg.text.webdataset


def _build(cfg: PretrainDataConfig, kind: str, builders):
    from common.url_secrets import masked_url
    from custom_datasets.webdataset_pairs import (
        WebDatasetPairs,
        count_samples,
        expand_shards,
        note_epoch_length,
        require_num_samples,
    )

    train_build, val_build = builders
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
    shards = expand_shards(data.eval_data_path, "--eval_data_path")  # one of the two: _check
    return train, WebDatasetPairs(shards, count_samples(shards, **reading), val_build, seed=cfg.seed, shuffle=False,
                                  **reading)


def _check(cfg: PretrainDataConfig, kind: str) -> None:
    text, data = cfg.text, cfg.data
    check_weights(split_sources(data.data_path or ""), data.data_weights)
    if not (text.eval_data_file_path or data.eval_data_path):
        raise UserError("--webdataset needs held-out pairs: --eval_data_path SHARDS or --eval_data_file_path PAIRS.json")


def _describe(cfg: PretrainDataConfig, what: str) -> str:
    from common.url_secrets import masked_url

    return f"{what} in the WebDataset shards {masked_url(cfg.data.data_path)}"


SOURCE = DataSource("WebDataset shards", "--webdataset --data_path SHARDS", ("pair",), _claims, _build, _describe,
                    inputs=lambda cfg: {}, check=_check)
