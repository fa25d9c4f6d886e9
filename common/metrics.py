"""Averaging named scalars over steps and ranks, and a console progress line."""
from __future__ import annotations

import datetime
import time
from collections import defaultdict
from typing import Iterable, Iterator, TypeVar

import torch

from common import distributed as dist_util

T = TypeVar("T")


class ScalarAverager:
    """Weighted running sums of named scalars; `global_average` reduces over ranks (every rank
    must call it, with the same keys). Scalars may be floats or 0-d tensors; a tensor's sum stays
    on its device, so averaging a step's losses reads nothing back to the host until the end."""

    def __init__(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = {}
        self.counts: dict[str, float] = defaultdict(float)

    def update(self, values: dict[str, float | torch.Tensor], weight: float = 1.0) -> None:
        for key, value in values.items():
            value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value * weight
            self.counts[key] += weight

    def state_dict(self) -> dict[str, dict[str, float]]:
        """This rank's sums and counts as floats (exact: the sums are float64), for a mid-epoch checkpoint."""
        keys = sorted(self.sums)
        return {"sums": dict(zip(keys, host_values({k: self.sums[k] for k in keys}, torch.float64).values())),
                "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        self.sums = dict(state["sums"])  # floats: the next update adds its tensor to them as before
        self.counts = defaultdict(float, state["counts"])

    def global_average(self, device: torch.device) -> dict[str, float]:
        keys = sorted(self.sums)
        sums = [torch.as_tensor(self.sums[k], dtype=torch.float64).to(device) for k in keys]
        counts = torch.tensor([self.counts[k] for k in keys], dtype=torch.float64, device=device)
        packed = dist_util.all_reduce_sum(torch.cat([torch.stack(sums) if sums else counts[:0], counts]))
        values = packed.tolist()  # the one read back to the host
        n = len(keys)
        return {k: values[i] / max(values[n + i], 1e-12) for i, k in enumerate(keys)}


def host_values(scalars: dict[str, float | torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """0-d tensors and floats as floats, reading all device tensors back in one transfer."""
    tensors = {k: v for k, v in scalars.items() if isinstance(v, torch.Tensor)}
    read = dict(zip(tensors, torch.stack([v.detach().to(dtype) for v in tensors.values()]).tolist())) if tensors else {}
    return {k: read[k] if k in read else float(v) for k, v in scalars.items()}


class ProgressPrinter:
    """Prints `header [i/n] eta ... scalars ... img/s` every `every` steps (main process only)."""

    def __init__(self, header: str, total: int, every: int) -> None:
        self.header, self.total, self.every = header, total, max(every, 1)
        self.start = time.time()
        self.samples = 0

    def count(self, batch_size: int) -> None:
        """A step that prints nothing (its samples still count towards the rate)."""
        self.samples += batch_size

    def due(self, index: int) -> bool:
        """Whether step `index` prints: every `every` steps and the last."""
        return index % self.every == 0 or index == self.total - 1

    def step(self, index: int, batch_size: int, scalars: dict[str, float]) -> None:
        self.samples += batch_size
        if not dist_util.is_main_process() or not self.due(index):
            return
        elapsed = time.time() - self.start
        eta = elapsed / (index + 1) * (self.total - index - 1)
        rate = self.samples * dist_util.world_size() / max(elapsed, 1e-9)
        text = "".join(f"  {k} {v:.4g}" for k, v in scalars.items())
        speed = f"  {rate:.1f} samples/s" if self.samples else ""
        print(f"{self.header} [{index + 1}/{self.total}] eta {datetime.timedelta(seconds=int(eta))}{text}{speed}", flush=True)


def with_progress(items: Iterable[T], header: str, every_seconds: float = 10.0) -> Iterator[T]:
    """`items`, printing `header [i/n] eta ...` every `every_seconds` on the main process, so a pass
    that turns out long (evaluation, feature caching) shows where it is; a short one prints nothing."""
    total = len(items) if hasattr(items, "__len__") else None
    start = last = time.time()
    for index, item in enumerate(items):
        yield item
        now = time.time()
        if now - last < every_seconds or not dist_util.is_main_process():
            continue
        last = now
        done = index + 1
        where = f"[{done}/{total}] eta {datetime.timedelta(seconds=int((now - start) / done * (total - done)))}" \
            if total else f"[{done}] {datetime.timedelta(seconds=int(now - start))} so far"
        print(f"{header} {where}", flush=True)
