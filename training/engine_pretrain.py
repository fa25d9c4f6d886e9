"""One pretraining epoch and one evaluation pass. Knows no objective: the shared step core
(`training/step.py`) backprops `out["loss"]` and logs every other scalar the mode returns; what is
particular to pretraining is the once-per-step regularizer (LoRA self-regularization) and an
evaluation that averages the mode's own scalars."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from common.metrics import ScalarAverager, with_progress
from custom_datasets.batch import NUM_SKIPPED, batch_size
from training.step import EpochHooks, StepSettings, autocast, scalars_of
from training.step import train_one_epoch as train_epoch

Batch = dict[str, Any]


def train_one_epoch(model: torch.nn.Module, loader: Iterable[Batch], optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, settings: StepSettings, prepare: Callable[[Batch], Batch],
                    scaler: torch.amp.GradScaler | None = None, log_writer=None, skipped_so_far: int = 0,
                    steps_per_epoch: int | None = None,
                    regularizer: Callable[[], torch.Tensor] | None = None,
                    batch_regularizer: Callable[[Batch], torch.Tensor | None] | None = None,
                    at_step_end=None, resumed=None) -> dict[str, float]:
    """`regularizer` (e.g. LoRA self-regularization) is computed from the weights once per optimizer
    step, on its last micro-batch; `batch_regularizer` (e.g. feature distillation) from every
    micro-batch; both are weighted by `settings.reg_loss_weight` and logged as `loss_reg`.
    `at_step_end` / `resumed`: mid-epoch checkpoints and resuming from one (training/step_checkpoints.py)."""
    return train_epoch(model, loader, optimizer, device, epoch, settings, prepare, scaler, log_writer, skipped_so_far,
                       steps_per_epoch, EpochHooks(regularizer=regularizer, batch_regularizer=batch_regularizer,
                                                   at_step_end=at_step_end), resumed)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[Batch], device: torch.device, prepare: Callable[[Batch], Batch],
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Sample-weighted averages of every scalar the mode returns, over the whole loader and all ranks."""
    model.eval()
    averager = ScalarAverager()
    for batch in with_progress(loader, "evaluation"):
        batch.pop(NUM_SKIPPED, None)
        if not batch:
            continue
        batch = prepare(batch)
        with autocast(device, amp_dtype):
            out = model(batch)
        averager.update(scalars_of(out), batch_size(batch))
    return averager.global_average(device)
