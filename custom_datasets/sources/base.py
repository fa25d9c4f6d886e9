"""What a reader of pretraining data is: which data kinds it gives, when a run's flags ask for it,
and how it builds the (training, held-out) datasets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch.utils.data import Dataset

from common.errors import UserError
from custom_datasets.settings import PretrainDataConfig, is_synthetic

# (training, held-out) image -> sample functions of the image and pair kinds; None for text
Builders = "tuple[Callable, Callable] | None"


@dataclass(frozen=True)
class DataSource:
    name: str
    reads: str  # what it reads, as the flags say it: for messages and the docs
    kinds: tuple[str, ...]  # "image", "text", "pair"
    claims: Callable[[PretrainDataConfig, str], bool]  # the run's flags ask for this reader
    build: Callable[[PretrainDataConfig, str, Builders], tuple[Dataset, Dataset]]
    describe: Callable[[PretrainDataConfig, str], str]  # (cfg, what: "images", ...) -> what the run reads, in words
    # the local files and folders it opens, flag -> paths: checked to exist before any work
    inputs: Callable[[PretrainDataConfig], dict[str, list[str | None]]] = lambda cfg: given_folders(cfg)
    # refuses flag combinations it cannot read, in one sentence, before any work (raises UserError)
    check: Callable[[PretrainDataConfig, str], None] = lambda cfg, kind: None


def given_folders(cfg: PretrainDataConfig) -> dict[str, list[str | None]]:
    """--data_path (unless it names the synthetic world) and --eval_data_path as given (None: not given)."""
    return {"data_path": [None if is_synthetic(cfg) else cfg.data.data_path], "eval_data_path": [cfg.data.eval_data_path]}


def refuse_mixed_folders(cfg: PretrainDataConfig, kind: str) -> None:
    """`--data_path "A::B"` mixes image folders; a reader of one image root cannot take it."""
    from custom_datasets.mixing import SEPARATOR

    if cfg.data.data_path and SEPARATOR in cfg.data.data_path:
        raise UserError(f'--data_path "A::B" mixes image folders; {kind} data is read from files: mix them into one '
                        f"--data_file_path list instead")
