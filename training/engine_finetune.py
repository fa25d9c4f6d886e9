"""One fine-tuning epoch and one evaluation pass for any downstream task (MAE/BEiT style). The
shared step core (`training/step.py`) does accumulation, AMP, clipping and the lr schedule; what is
particular to fine-tuning is the task's own training-batch transform (Mixup/CutMix), the EMA copy
updated after every optimizer step, and evaluation by the task's metrics: per-sample metrics
averaged over the held-out set, or metrics of the whole set at once (retrieval)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.utils.data import Dataset

from common.metrics import ScalarAverager
from custom_datasets.batch import batch_size
from models.downstream import DownstreamTask
from training.step import EpochHooks, StepSettings, autocast, scalars_of
from training.step import train_one_epoch as train_epoch

Batch = dict[str, Any]


def train_one_epoch(model: torch.nn.Module, task: DownstreamTask, loader: Iterable[Batch],
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, settings: StepSettings,
                    prepare: Callable[[Batch], Batch], model_ema=None, scaler: torch.amp.GradScaler | None = None,
                    log_writer=None, skipped_so_far: int = 0) -> dict[str, float]:
    """`model`: the task, DDP-wrapped when there are several processes; `task`: the task itself."""
    after_step = (lambda: model_ema.update(task)) if model_ema is not None else None
    return train_epoch(model, loader, optimizer, device, epoch, settings,
                       lambda batch: task.prepare_train_batch(prepare(batch)), scaler, log_writer, skipped_so_far,
                       hooks=EpochHooks(after_step=after_step))


@torch.no_grad()
def evaluate(task: DownstreamTask, loader: Iterable[Batch], device: torch.device, prepare,
             amp_dtype: torch.dtype | None = None, dataset: Dataset | None = None,
             eval_batch_size: int = 64) -> dict[str, float]:
    """The task's held-out metrics over the whole loader and all ranks (set-level metrics use the
    held-out `dataset` directly, on every rank)."""
    task.eval()
    if task.set_level_metrics:
        with autocast(device, amp_dtype):
            return task.evaluate_set(dataset, eval_batch_size, device)
    averager = ScalarAverager()
    task.start_evaluation()
    for batch in prepare.batches(loader):
        with autocast(device, amp_dtype):
            out = task(batch)
        averager.update(scalars_of(out), batch_size(batch))
    return task.finish_evaluation(averager.global_average(device))
