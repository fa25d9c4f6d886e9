"""The readers of pretraining data, one file each, and the registry that picks one for a run: the
first source in SOURCES that gives the run's data kind and claims its flags. A new reader is a new
file here and one line in SOURCES."""
from __future__ import annotations

from torch.utils.data import Dataset

from common.errors import UserError
from custom_datasets.settings import PretrainDataConfig
from custom_datasets.sources import (
    caption_files,
    image_folder,
    mixed_folders,
    pair_files,
    synthetic,
    webdataset_shards,
)
from custom_datasets.sources.base import Builders, DataSource

# in the order they are asked: a run's own caption or pair files before the synthetic world's
SOURCES: tuple[DataSource, ...] = (webdataset_shards.SOURCE, pair_files.SOURCE, caption_files.SOURCE,
                                   synthetic.SOURCE, mixed_folders.SOURCE, image_folder.SOURCE)
KINDS = {"image": "images", "text": "captions", "pair": "image-caption pairs"}


def source_for(cfg: PretrainDataConfig, kind: str) -> DataSource:
    """The reader of `kind` data the run's flags ask for; refused in one sentence when none does."""
    for source in SOURCES:
        if kind in source.kinds and source.claims(cfg, kind):
            return source
    given = f"--data_path {cfg.data.data_path} alone holds no {KINDS[kind]}; " if cfg.data.data_path else ""
    readers = "; ".join(s.reads for s in SOURCES if kind in s.kinds)
    raise UserError(f"{given}{KINDS[kind]} come from one of: {readers}")


def build_datasets(cfg: PretrainDataConfig, kind: str, builders: Builders) -> tuple[Dataset, Dataset]:
    """(training, held-out) datasets of `kind`, read by the source the flags ask for."""
    source = source_for(cfg, kind)
    source.check(cfg, kind)
    return source.build(cfg, kind, builders)
