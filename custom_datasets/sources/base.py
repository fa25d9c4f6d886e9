"""What a reader of pretraining data is: which data kinds it gives, when a run's flags ask for it,
and how it builds the (training, held-out) datasets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch.utils.data import Dataset

from custom_datasets.settings import PretrainDataConfig

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
