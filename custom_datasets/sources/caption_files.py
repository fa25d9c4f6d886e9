"""Caption files (`--data_file_path`: JSON, JSONL, CSV, TXT), held out by record (`--val_fraction`)
or from `--eval_data_file_path`."""
from __future__ import annotations

from torch.utils.data import Subset

from custom_datasets.settings import PretrainDataConfig
from custom_datasets.sources.base import DataSource, refuse_mixed_folders
from custom_datasets.split import record_keys, split_held_out
from custom_datasets.text_data import CaptionCorpus


def _claims(cfg: PretrainDataConfig, kind: str) -> bool:
    return bool(cfg.text.data_file_path)


def _build(cfg: PretrainDataConfig, kind: str, builders):
    text = cfg.text
    corpus = CaptionCorpus(list(text.data_file_path))
    if text.eval_data_file_path:
        return corpus, CaptionCorpus([text.eval_data_file_path])
    train, val = split_held_out(list(range(len(corpus))), record_keys(len(corpus)), cfg.data.val_fraction,
                                f"--data_file_path {' '.join(text.data_file_path)}")
    return Subset(corpus, train), Subset(corpus, val)


def in_files(cfg: PretrainDataConfig, what: str) -> str:
    return f"{what} in {' '.join(cfg.text.data_file_path)}"


SOURCE = DataSource("caption files", "--data_file_path CAPTIONS.json", ("text",), _claims, _build, in_files,
                    check=refuse_mixed_folders)
