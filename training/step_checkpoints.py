"""`--save_every_steps N`: a resumable checkpoint every N optimizer steps, written within the epoch
(`checkpoint-<epoch>-step<batches>.pth`) beside the epoch checkpoints, the newest
`--keep_last_checkpoints` kept. Besides what an epoch checkpoint holds it records where the epoch
stands on every rank (batches done, the running averages, skipped samples, the random generators)
and the mode's per-step choices, so that `--auto_resume` trains the epoch's remaining batches in
the straight run's order and ends with its weights. The loader's workers restart every epoch in
such a run: persistent workers would carry their random state from one epoch into the next, which a
resumed run cannot rebuild."""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from common import distributed as dist_util
from common.console import say
from common.errors import UserError
from training.run_checkpoint import MID_EPOCH, prune_step_checkpoints, step_checkpoint_name
from training.step import EpochProgress

if TYPE_CHECKING:
    from training.pretrain import Optimization, PretrainRun



def check_step_interval(every: int, batches: int, accum: int) -> None:
    """Step checkpoints are written within epochs (an epoch's end has its own): an interval that
    only ever lands on epoch ends would never write one, and one longer than an epoch is said."""
    steps = math.ceil(batches / accum)
    if every % steps == 0:
        raise UserError(f"--save_every_steps {every} lands on epoch ends only (an epoch is {steps} optimizer steps), "
                        f"where no step checkpoint is written: use --save_per_epochs {every // steps} for a checkpoint "
                        f"every {every} steps, or a --save_every_steps below {steps}")
    if every > steps:
        say(f"--save_every_steps {every}: an epoch is {steps} optimizer steps, so a step checkpoint comes about once "
            f"every {every / steps:.1f} epochs")


class StepCheckpointer:
    """Called after each optimizer step (EpochHooks.at_step_end); writes a checkpoint when one is due."""

    def __init__(self, run: "PretrainRun", optim: "Optimization",
                 save: Callable[[int, int, str, dict[str, Any]], None]) -> None:
        self.run, self.every, self.save = run, run.cfg.run.save_every_steps, save
        self.batches = len(optim.train_loader)
        self.accum = run.cfg.optim.accum_iter
        self.epoch, self.skipped_before = 0, 0

    def start_epoch(self, epoch: int, skipped_before: int) -> None:
        self.epoch, self.skipped_before = epoch, skipped_before

    def optimizer_steps(self, epoch: int, batches_done: int) -> int:
        return epoch * math.ceil(self.batches / self.accum) + math.ceil(batches_done / self.accum)

    def __call__(self, batches_done: int, snapshot: Callable[[], EpochProgress]) -> None:
        if self.optimizer_steps(self.epoch, batches_done) % self.every:
            return
        ranks = dist_util.gather_objects(asdict(snapshot()))  # every rank's generators and partial sums
        state = {"epoch": self.epoch, "batches_done": batches_done, "world_size": dist_util.world_size(),
                 "ranks": ranks, "mode": self.run.mode.step_state(), "skipped_before": self.skipped_before}
        self.save(self.epoch - 1, self.epoch * self.batches + batches_done,
                  step_checkpoint_name(self.epoch, batches_done), {MID_EPOCH: state})
        if self.run.ctx.is_main:
            prune_step_checkpoints(self.run.ctx.output_dir, self.run.cfg.run.keep_last_checkpoints)


# what decides which batches an epoch holds, in which order and with which random draws: a resume
# within an epoch continues exactly only with all of them unchanged
EPOCH_DEFINING = ("batch_size", "accum_iter", "seed", "num_workers", "data_path", "data_file_path", "eval_data_path",
                  "eval_data_file_path", "val_fraction", "data_weights", "max_train_samples", "train_num_samples",
                  "synthetic_train_size", "webdataset", "dataset_resampled", "shuffle_buffer")


def check_mid_epoch_resume(path: str, state: dict[str, Any], recorded: dict[str, Any], current: dict[str, Any],
                           batches_per_epoch: int) -> None:
    """Refuses, before any work, a resume within an epoch that could not continue it exactly: another
    number of processes, batch size or data (its remaining batches would repeat samples or leave some
    out), or an epoch now shorter than the part already trained."""
    epoch, done = state["epoch"], state["batches_done"]
    where = f"--resume {path} stopped within epoch {epoch}, after {done} of its batches"
    earlier = Path(path).with_name(f"checkpoint-{epoch - 1}.pth")
    instead = (f"or continue from the epoch checkpoint {earlier}, after which these may change" if earlier.exists()
               else "or start the run again in a new --output_dir")
    world = dist_util.world_size()
    if state["world_size"] != world:
        raise UserError(f"{where}, written by {state['world_size']} processes, and this run has {world}: the rest of "
                        f"that epoch cannot be split the same way; resume with {state['world_size']} processes, "
                        f"{instead}")
    changed = [f"--{name} {recorded[name]} -> {current[name]}" for name in EPOCH_DEFINING
               if name in recorded and name in current and recorded[name] != current[name]]
    if changed:
        raise UserError(f"{where}; this run changes {', '.join(changed)}, so the rest of that epoch would not be the "
                        f"batches it left (samples trained twice or never); resume with the run's own values, "
                        f"{instead}")
    if done >= batches_per_epoch:
        raise UserError(f"{where}, but this run's epoch has only {batches_per_epoch} batches, so nothing of it would "
                        f"be left to train; resume with the run's own data and batch size, {instead}")


def resumed_progress(run: "PretrainRun", state: dict[str, Any] | None) -> tuple[EpochProgress | None, int]:
    """(this rank's place in the resumed epoch, the unreadable samples skipped before it) from a
    step checkpoint's entry (checked by `check_mid_epoch_resume` when the run was built)."""
    if not state:
        return None, 0
    run.mode.load_step_state(state["mode"])
    say(f"continuing epoch {state['epoch']} after its first {state['batches_done']} batches (read again, not "
        f"trained on, so that the data and random draws continue as they were)")
    return EpochProgress(**state["ranks"][dist_util.rank()]), int(state["skipped_before"])


def note_world_change(path, recorded: int | None, world: int, mid_epoch: dict | None) -> None:
    """An epoch checkpoint continues with any number of processes; what changes is said."""
    if recorded is None or recorded == world or mid_epoch:  # a mid-epoch one is checked by resumed_progress
        return
    say(f"note: {path} was written by {recorded} processes and this run has {world}: the effective batch (and an lr "
        f"given as --blr, scaled from it) and each epoch's data order differ from a run that kept {recorded}; the "
        f"weights, optimizer state and schedule position carry on")
