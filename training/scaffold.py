"""What every run does around its epochs, in one place: seeding, joining the process group, the
device, DDP wrapping, data loaders, TensorBoard, `log.txt` and the checkpoint cadence."""
from __future__ import annotations

import datetime
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler

from common import distributed as dist_util
from common.checkpoint_io import atomic_write
from common.console import say
from common.errors import UserError
from common.run_lock import RunLock
from common.json_records import json_record
from custom_datasets.mixing import MixedSources, MixtureSampler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class RunContext:
    """This process's place in the run: rank, world size, device and output folder."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    output_dir: Path
    seed: int
    lock: RunLock | None = None

    @classmethod
    def start(cls, device: str, output_dir: str, seed: int, exclusive: bool = True) -> "RunContext":
        """Join the process group, seed, and (`exclusive`, every run that writes a run's files) hold
        the output folder for the run's life."""
        rank, world, local_rank = dist_util.init_distributed(device)
        torch_device = torch.device(f"cuda:{local_rank}" if device.startswith("cuda") else device)
        seed_everything(seed + rank)
        ctx = cls(rank, world, local_rank, torch_device, Path(output_dir), seed)
        if exclusive:
            ctx.lock = RunLock(output_dir, rank).acquire()
            if ctx.lock.stale and ctx.is_main:
                say(f"{output_dir}: took over the lock of a run that ended without releasing it ({ctx.lock.stale})")
            ctx.remove_stale_temp_files()
        return ctx

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """DDP around `module` when the run has several processes."""
        if not dist_util.is_distributed():
            return module
        ids = [self.local_rank] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                                         find_unused_parameters=find_unused_parameters)

    def loader(self, dataset: Dataset, batch_size: int, num_workers: int, train: bool, collate: Callable,
               seeded_shuffle: bool = True, pin_memory: bool | None = None,
               persistent_workers: bool = True) -> DataLoader:
        """A DataLoader that shards across ranks. Training data is shuffled with a generator re-seeded
        every epoch (`seeded_shuffle`) or by the global RNG, which `start_epoch` seeds."""
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        if isinstance(dataset, IterableDataset):  # streams split and shuffle themselves (set_epoch)
            return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                              drop_last=train, pin_memory=pin)
        sampler = None
        if isinstance(dataset, MixedSources) and train:
            sampler = MixtureSampler(dataset, self.rank, self.world, self.seed)
        elif dist_util.is_distributed():
            sampler = DistributedSampler(dataset, shuffle=train, seed=self.seed)
        elif train and seeded_shuffle:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(self.seed))
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=train and sampler is None,
                          num_workers=num_workers, collate_fn=collate, drop_last=train, pin_memory=pin,
                          persistent_workers=persistent_workers and num_workers > 0)

    def start_epoch(self, loader: DataLoader, epoch: int) -> None:
        """Data order, augmentation and masks are functions of (seed, rank, epoch), so a resumed run
        continues where a straight run would be: exactly with --num_workers 0 or --save_every_steps
        (workers restarted each epoch); persistent workers carry their augmentation state from one
        epoch into the next, which a resumed run draws afresh (same order, other crops and masks)."""
        seed_everything(self.seed + self.rank + 1000 * epoch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
            if len(getattr(loader.dataset, "sources", ())) > 1:  # mixed shard sources (say() prints on rank 0)
                say(f"data mix of epoch {epoch}: {loader.dataset.describe_mix(loader.num_workers)}")
        elif isinstance(loader.sampler, (DistributedSampler, MixtureSampler)):
            loader.sampler.set_epoch(epoch)
            if isinstance(loader.sampler, MixtureSampler):  # say() prints on rank 0
                say(f"data mix of epoch {epoch}: {loader.sampler.data.describe()}")
        elif isinstance(loader.sampler, RandomSampler) and loader.sampler.generator is not None:
            loader.sampler.generator.manual_seed(self.seed + epoch)

    def reseed_for_evaluation(self) -> None:
        """Held-out masks are the same in every evaluation."""
        seed_everything(self.seed + self.rank)

    def tensorboard(self, log_dir: str, start_epoch: int = 0, done_in_epoch: float = 0.0):
        """The main process's TensorBoard writer. A run resumed at `start_epoch` (after the share
        `done_in_epoch` of it, from a mid-epoch checkpoint) purges what the interrupted run logged
        from there on, so re-run steps are not drawn twice."""
        if not self.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter

        purge = first_step(start_epoch) + int(done_in_epoch * 1000)
        return SummaryWriter(log_dir=log_dir, purge_step=purge if purge else None)

    def append_log(self, stats: dict) -> None:
        """One JSON line per epoch in `log.txt` (main process)."""
        if self.is_main:
            with open(self.output_dir / "log.txt", "a") as f:
                f.write(json_record(stats) + "\n")

    def remove_stale_temp_files(self) -> None:
        """Half-written files of a run killed mid-write (atomic writes leave `.<name>.<random>.tmp`,
        sharded checkpoints `.<name>.tmp/` folders)."""
        if not self.is_main or not self.output_dir.is_dir():
            return
        stale = list(self.output_dir.glob(".*.tmp"))
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if stale:
            say(f"{self.output_dir}: removed {len(stale)} half-written file(s) of an interrupted run")

    def truncate_log(self, last_epoch: int) -> None:
        """A resumed run replays the epochs after its checkpoint: their old lines go."""
        log_path = self.output_dir / "log.txt"
        if not self.is_main or not log_path.is_file():
            return
        kept = [line for line in log_path.read_text(errors="replace").splitlines(keepends=True)
                if logged_epoch(line) is not None and logged_epoch(line) <= last_epoch]
        atomic_write(log_path, lambda tmp: Path(tmp).write_text("".join(kept)))

    def finish(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        dist_util.cleanup()


def refuse_taken_output(output_dir: str | Path, evaluating: bool) -> None:
    """A fine-tuning folder holding a run (its log.txt) is never overwritten. Called once the data is
    read (a wrong --data_path is reported as such, even into a taken folder) and before anything is
    written."""
    if not evaluating and (Path(output_dir) / "log.txt").exists():
        raise UserError(f"--output_dir {output_dir} already holds a run (log.txt); choose another --output_dir "
                        f"(nothing is overwritten)")


def logged_epoch(line: str) -> int | None:
    """The epoch of a log.txt line; None for a line cut short (a run killed while writing it)."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    return entry.get("epoch", -1) if isinstance(entry, dict) else None


# TensorBoard's one x axis for every run: epoch x 1000 (training scalars at their fraction of the
# epoch, held-out ones at its last step), comparable across batch sizes and purgeable per epoch
def first_step(epoch: int) -> int:
    return epoch * 1000


def last_step(epochs_done: int) -> int:
    """The step of the end of epoch `epochs_done - 1`."""
    return epochs_done * 1000 - 1


def run_eta(start: float, epochs_done: int, epochs_left: int) -> str:
    """`run eta H:MM:SS` from the mean time of the epochs this process ran."""
    if epochs_done <= 0:
        return ""
    seconds = (time.time() - start) / epochs_done * epochs_left
    return f"run eta {datetime.timedelta(seconds=int(seconds))}"


def checkpoint_due(epoch: int, epochs: int, every: int, from_zero: bool = False) -> bool:
    """After every `every` epochs and the last; `from_zero`: at epochs 0, N, 2N, ... instead
    (ContinualTransformer's numbering)."""
    return (epoch % every == 0 if from_zero else (epoch + 1) % every == 0) or epoch + 1 == epochs
