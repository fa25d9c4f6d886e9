"""Which patches to mask for MIM, generated per sample in DataLoader workers."""
from __future__ import annotations

import math
import random

import numpy as np


class BlockwiseMaskGenerator:
    """BEiT's blockwise masking: rectangles of `min_patches..max_patches` patches with aspect
    ratio in `[min_aspect, 1/min_aspect]` are added until exactly `num_masking_patches` are masked
    (when no further block fits, the remainder is topped up with single random patches so the
    count is always exact)."""

    def __init__(self, grid: tuple[int, int], num_masking_patches: int, min_num_patches: int = 16,
                 max_num_patches: int | None = None, min_aspect: float = 0.3, max_aspect: float | None = None) -> None:
        self.height, self.width = grid
        if not 0 < num_masking_patches <= self.height * self.width:
            raise ValueError(f"num_masking_patches must be in 1..{self.height * self.width}, got {num_masking_patches}")
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches or num_masking_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, budget: int, rng: random.Random) -> int:
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < w < self.width and 0 < h < self.height:
                top, left = rng.randint(0, self.height - h), rng.randint(0, self.width - w)
                window = mask[top:top + h, left:left + w]
                new = h * w - int(window.sum())
                if 0 < new <= budget:
                    window[:] = True
                    return new
        return 0

    def __call__(self, rng: random.Random | None = None) -> np.ndarray:
        rng = rng or random  # the global RNG: seeded per DataLoader worker and per epoch
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            if budget < self.min_num_patches:
                break
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        if count < self.num_masking_patches:
            free = np.flatnonzero(~mask)
            mask.flat[rng.sample(list(free), self.num_masking_patches - count)] = True
        return mask


class RandomMaskGenerator:
    """ContinualTransformer's masking: each patch masked independently with `probability`."""

    def __init__(self, grid: tuple[int, int], probability: float) -> None:
        if not 0 < probability < 1:
            raise ValueError(f"mim_probability must be in (0, 1), got {probability}")
        self.grid, self.probability = grid, probability

    def __call__(self, rng: random.Random | None = None) -> np.ndarray:
        rng = rng or random  # the global RNG: seeded per DataLoader worker and per epoch
        mask = np.array([rng.random() < self.probability for _ in range(self.grid[0] * self.grid[1])])
        if not mask.any():  # at least one target per image
            mask[rng.randrange(mask.size)] = True
        return mask.reshape(self.grid)


class FractionMaskGenerator:
    """MAE's per-sample random masking: a uniformly random set of exactly N - int(N·(1 - ratio))
    patches (MAE keeps int(N·(1 - ratio)), so every image has the same number visible)."""

    def __init__(self, grid: tuple[int, int], ratio: float) -> None:
        if not 0 < ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {ratio}")
        self.grid, self.ratio = grid, ratio
        n = grid[0] * grid[1]
        self.num_masked = n - int(n * (1 - ratio))
        if not 0 < self.num_masked < n:
            raise ValueError(f"--mask_ratio {ratio} masks {self.num_masked} of {n} patches: none or all")

    def __call__(self, rng: random.Random | None = None) -> np.ndarray:
        rng = rng or random  # the global RNG: seeded per DataLoader worker and per epoch
        mask = np.zeros(self.grid[0] * self.grid[1], dtype=bool)
        mask[rng.sample(range(mask.size), self.num_masked)] = True
        return mask.reshape(self.grid)


def default_num_mask_patches(num_patches: int) -> int:
    """BEiT masks 75 of 196 patches; keep that fraction for other grids."""
    return max(1, round(num_patches * 75 / 196))
