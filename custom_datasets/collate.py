"""Batching that tolerates unreadable samples: they arrive as None, are dropped and counted."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate


def collate_skipping_bad(samples: list[dict[str, Any] | None]) -> dict[str, Any]:
    good = [s for s in samples if s is not None]
    batch: dict[str, Any] = default_collate(good) if good else {}
    batch["num_skipped"] = torch.tensor(len(samples) - len(good))
    return batch
