"""Shared test utilities."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"

requires_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Perturb every parameter so equivalence tests cannot pass on zero/one initial values."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def colour_folders(root: Path, train: int, val: int, render_size: int, seed: int = 1) -> Path:
    """`root/{train,val}/<colour>/<i>.png`: synthetic scenes in one folder per colour of their first
    object (the ImageNet layout, 8 classes)."""
    from custom_datasets.synthetic_classification import write_synthetic_classification

    return write_synthetic_classification(root, train, val, render_size, seed)
