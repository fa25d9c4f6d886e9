"""One pretraining epoch and one evaluation pass. Knows no objective: it backprops `out["loss"]`
and logs every other scalar the task returns."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from util import distributed as dist_util
from util.errors import UserError
from util.lr_sched import lr_at, set_lr
from util.metrics import ProgressPrinter, ScalarAverager

Batch = dict[str, Any]


@dataclass
class StepSettings:
    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int
    accum_iter: int = 1
    clip_grad: float | None = None
    amp_dtype: torch.dtype | None = None
    print_freq: int = 20
    max_bad_samples: int | None = None
    reg_loss_weight: float = 0.0  # weight of `regularizer()`, added once per optimizer step


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def check_bad_samples(settings: StepSettings, skipped: int) -> None:
    if settings.max_bad_samples is not None and skipped > settings.max_bad_samples:
        raise UserError(f"more than --max_bad_samples {settings.max_bad_samples} unreadable samples; "
                        f"fix or remove the bad files, or raise the limit")


def schedule_lr(optimizer: torch.optim.Optimizer, settings: StepSettings, epoch: int, step: int, total: int) -> None:
    """Per-iteration warmup + cosine, set at the first micro-batch of each optimizer step."""
    if step % settings.accum_iter == 0:
        set_lr(optimizer, lr_at(epoch + step / total, settings.lr, settings.min_lr, settings.warmup_epochs, settings.epochs))


def is_last_micro_batch(settings: StepSettings, step: int, total: int) -> bool:
    return (step + 1) % settings.accum_iter == 0 or step + 1 == total


def gradient_sync(model: torch.nn.Module, last_micro: bool):
    """DDP all-reduces gradients only on the micro-batch that ends an optimizer step."""
    return contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()


def check_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    if not math.isfinite(loss.item()):
        raise RuntimeError(f"loss is {loss.item()} at epoch {epoch} step {step}; lower --blr or use --amp bf16/none")


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   clip_grad: float | None) -> None:
    """Unscale (fp16), clip, step and clear the accumulated gradients."""
    if scaler:
        scaler.unscale_(optimizer)
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def global_skipped(skipped: int, device: torch.device) -> float:
    return dist_util.all_reduce_sum(torch.tensor(float(skipped), device=device)).item()


def _scalars(out: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in out.items() if k == "loss" or k.startswith(("loss_", "acc_"))}


def train_one_epoch(model: torch.nn.Module, loader: Iterable[Batch], optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, settings: StepSettings, prepare: Callable[[Batch], Batch],
                    scaler: torch.amp.GradScaler | None = None, log_writer=None, skipped_so_far: int = 0,
                    steps_per_epoch: int | None = None,
                    regularizer: Callable[[], torch.Tensor] | None = None) -> dict[str, float]:
    """`regularizer` (e.g. LoRA self-regularization) is computed from the weights once per optimizer
    step, on its last micro-batch, weighted by `settings.reg_loss_weight` and logged as `loss_reg`."""
    model.train()
    total = steps_per_epoch or len(loader)  # type: ignore[arg-type]
    averager = ScalarAverager()
    progress = ProgressPrinter(f"Epoch [{epoch}]", total, settings.print_freq)
    skipped = 0
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(loader):
        skipped += int(batch.pop("num_skipped", 0))
        check_bad_samples(settings, skipped_so_far + skipped)
        schedule_lr(optimizer, settings, epoch, step, total)
        if not batch:  # every sample of this batch was unreadable
            continue
        batch = prepare(batch)
        last_micro = is_last_micro_batch(settings, step, total)
        with gradient_sync(model, last_micro):
            with autocast(device, settings.amp_dtype):
                out = model(batch)
            loss = out["loss"]
            check_finite(loss, epoch, step)
            scaled = loss / settings.accum_iter
            reg = None
            if regularizer is not None and last_micro:
                reg = settings.reg_loss_weight * regularizer()
                scaled = scaled + reg
            (scaler.scale(scaled) if scaler else scaled).backward()
        if last_micro:
            optimizer_step(model, optimizer, scaler, settings.clip_grad)
        scalars = _scalars(out)
        if reg is not None:
            scalars["loss_reg"] = float(reg.detach())
        batch_size = len(next(iter(batch.values())))
        averager.update(scalars, batch_size)
        progress.step(step, batch_size, {"lr": optimizer.param_groups[0]["lr"], **scalars})
        if log_writer is not None and last_micro:
            epoch_1000x = int((epoch + step / total) * 1000)  # one axis for runs of different batch sizes
            for key, value in scalars.items():
                log_writer.add_scalar(f"train/{key}", value, epoch_1000x)
            log_writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], epoch_1000x)
    stats = averager.global_average(device)
    stats["skipped_samples"] = global_skipped(skipped, device)
    stats["lr"] = optimizer.param_groups[0]["lr"]
    return stats


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[Batch], device: torch.device, prepare: Callable[[Batch], Batch],
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Sample-weighted averages of every scalar the task returns, over the whole loader and all ranks."""
    model.eval()
    averager = ScalarAverager()
    for batch in loader:
        batch.pop("num_skipped", None)
        if not batch:
            continue
        batch = prepare(batch)
        with autocast(device, amp_dtype):
            out = model(batch)
        averager.update(_scalars(out), len(next(iter(batch.values()))))
    return averager.global_average(device)
