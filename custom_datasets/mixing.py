"""Several image sources mixed with weights: `--data_path "A::B" --data_weights 3 1` (open_clip's
`::` spelling). Each epoch takes from source k exactly its share w_k / Σw of the epoch's samples
(largest remainders; the epoch is as long as all sources together unless --max_train_samples says
otherwise). A source walks through its own seeded permutations, continuing across epochs, so one
drawn less than its size is still seen whole over the epochs and one drawn more repeats as evenly as
possible. The epoch's picks are shuffled and split over the ranks in equal parts, as
DistributedSampler does; everything is a function of (seed, epoch), so a resumed run draws the same."""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler

from common.errors import UserError

SEPARATOR = "::"


def split_sources(spec: str) -> list[str]:
    return [part for part in spec.split(SEPARATOR)]


def exact_counts(total: int, weights: Sequence[float]) -> list[int]:
    """`total` split in proportion to `weights`, rounded by largest remainders (the sum is `total`)."""
    scale = total / sum(weights)
    counts = [math.floor(w * scale) for w in weights]
    order = sorted(range(len(weights)), key=lambda k: (weights[k] * scale - counts[k], -k), reverse=True)
    for k in order[:total - sum(counts)]:
        counts[k] += 1
    return counts


def check_weights(sources: list[str], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(sources)
    if len(sources) < 2:
        raise UserError('--data_weights mixes several sources: give them as --data_path "A::B"')
    if len(weights) != len(sources):
        raise UserError(f"--data_weights has {len(weights)} values for {len(sources)} sources in --data_path; give one "
                        f"weight per source (e.g. --data_weights {' '.join(['1'] * len(sources))})")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--data_weights {' '.join(f'{w:g}' for w in weights)}: each weight must be a finite number "
                        f"of at least 0, and their sum above 0 (e.g. --data_weights 3 1)")
    return list(weights)


class MixedSources(ConcatDataset):
    """The sources one after another (global index = source offset + local index); which of them
    an epoch reads, and how often, is the MixtureSampler's choice."""

    def __init__(self, sources: list[Dataset], weights: Sequence[float], names: list[str],
                 epoch_size: int | None = None) -> None:
        super().__init__(sources)
        self.weights, self.names = list(weights), names
        self.epoch_size = epoch_size or sum(len(s) for s in sources)
        self.sizes = [len(s) for s in sources]
        empty = [n for n, size, w in zip(names, self.sizes, self.weights) if size == 0 and w > 0]
        if empty:
            raise UserError(f"--data_path source {empty[0]} has no training images but a weight above 0")

    def counts(self) -> list[int]:
        return exact_counts(self.epoch_size, self.weights)

    def describe(self) -> str:
        counts = self.counts()
        return ", ".join(f"{n} {c} ({c / self.epoch_size:.3f})" for n, c in zip(self.names, counts))


class MixtureSampler(Sampler[int]):
    def __init__(self, data: MixedSources, rank: int, world: int, seed: int) -> None:
        self.data, self.rank, self.world, self.seed = data, rank, world, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _permutation(self, source: int, cycle: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + source * 10_007 + cycle)
        return torch.randperm(self.data.sizes[source], generator=gen)

    def _picks(self, source: int, count: int) -> torch.Tensor:
        """Positions epoch·count .. (epoch+1)·count of the source's endless permutation walk."""
        size = self.data.sizes[source]
        if count == 0:
            return torch.zeros(0, dtype=torch.long)
        start = self.epoch * count
        positions = torch.arange(start, start + count)
        cycles = positions // size
        out = torch.empty(count, dtype=torch.long)
        for cycle in cycles.unique().tolist():
            chosen = cycles == cycle
            out[chosen] = self._permutation(source, cycle)[positions[chosen] % size]
        return out + self.data.cumulative_sizes[source] - size

    def epoch_indices(self) -> list[int]:
        """Every rank's picks of this epoch, shuffled (before the split over ranks)."""
        picks = torch.cat([self._picks(k, n) for k, n in enumerate(self.data.counts())])
        order = torch.randperm(len(picks), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return picks[order].tolist()

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        padded = indices + indices[:len(self) * self.world - len(indices)]  # equal parts, as DistributedSampler
        return iter(padded[self.rank::self.world])

    def __len__(self) -> int:
        return math.ceil(self.data.epoch_size / self.world)
