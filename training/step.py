"""The training-step core both engines share: per-iteration lr, gradient accumulation (DDP
all-reduces only on the micro-batch that ends an optimizer step), autocast, the finiteness check,
unscale + clip + step (fp16 scaler or not), the unreadable-sample limit, logging and progress.
The model is called with the prepared batch and returns `{"loss": ..., <name>: scalar, ...}`.
No step reads a device value back to the host: losses are summed on the device, and they and the
finiteness watch are read every --print_freq steps (console, TensorBoard) and at the epoch's end
(an fp16 loss scaler still reads its overflow flag each step, as torch's does)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from common import distributed as dist_util
from common import rng_state
from common.errors import UserError
from common.lr_sched import lr_at, set_lr
from common.metrics import ProgressPrinter, ScalarAverager, host_values
from common.sharded_tensors import full_tensor
from custom_datasets.batch import NUM_SKIPPED, batch_size
from training.finite import GRADIENTS, LOSS, FinitenessWatch, check_weights, likely_cause
from training.scaffold import first_step

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
    batch_reg_weight: float | None = None  # weight of `batch_regularizer(batch)` (None: reg_loss_weight)
    data_name: str = "the training data"  # what the run trains on, in words (for a refusal that names it)


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


def cause_of(settings: StepSettings) -> str:
    return likely_cause(settings.lr, settings.amp_dtype, settings.clip_grad)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   settings: StepSettings, step: int = 0, watch: FinitenessWatch | None = None) -> bool:
    """Unscale (fp16), clip, step and clear the accumulated gradients. Returns False when the fp16
    loss scaler skipped the step (an overflow, which it handles by lowering the scale). Without a
    scaler a non-finite clipped norm is noted in `watch` (the epoch then stops before it is saved)."""
    if scaler:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad) if settings.clip_grad else None
    norm = full_tensor(norm) if norm is not None else None  # a sharded model's norm is a DTensor
    applied = True
    if scaler:
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        applied = scaler.get_scale() >= before
    else:
        if norm is not None and watch is not None:
            watch.note(norm, step, GRADIENTS)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return applied


def global_skipped(skipped: int, device: torch.device) -> float:
    return dist_util.all_reduce_sum(torch.tensor(float(skipped), device=device)).item()


def scalars_of(out: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every scalar a model returned (the loss, its parts, accuracies, temperatures...), detached
    and left on the device."""
    return {k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor) and v.ndim == 0}


@dataclass
class EpochHooks:
    """What an engine adds to the shared loop: a regularizer computed from the weights once per
    optimizer step and one computed from every micro-batch (both weighted by
    `StepSettings.reg_loss_weight`, logged together as `loss_reg`), and a callback after each
    optimizer step (e.g. an EMA update)."""

    regularizer: Callable[[], torch.Tensor] | None = None
    batch_regularizer: Callable[[Batch], torch.Tensor | None] | None = None  # from each micro-batch, same weight
    after_step: Callable[[], None] | None = None
    overflow_steps: int = 0  # fp16 steps the loss scaler skipped
    # after each optimizer step but an epoch's last: (batches done, a snapshot of the epoch so far) -> a
    # mid-epoch checkpoint when one is due (the snapshot reads the device, so it is only taken then)
    at_step_end: Callable[[int, Callable[[], "EpochProgress"]], None] | None = None


@dataclass
class EpochProgress:
    """Where an epoch stands after an optimizer step, on one rank: what a mid-epoch checkpoint holds
    so that a resumed run trains the epoch's remaining batches and ends with the straight run's
    weights and averages. `rng`: the generators right after that step (common/rng_state.py)."""

    batches_done: int
    averager: dict[str, Any] = field(default_factory=dict)
    skipped: int = 0
    overflow_steps: int = 0
    rng: dict[str, Any] = field(default_factory=dict)


def _micro_batch(model, batch, optimizer, device, settings, scaler, hooks, step, total,
                 watch: FinitenessWatch) -> dict[str, torch.Tensor]:
    last_micro = is_last_micro_batch(settings, step, total)
    with gradient_sync(model, last_micro):
        # before the forward, while FSDP holds every weight in its shards (after it, the root's are whole)
        weights_term = hooks.regularizer() if hooks.regularizer is not None and last_micro else None
        with autocast(device, settings.amp_dtype):
            out = model(batch)
            from_batch = hooks.batch_regularizer(batch) if hooks.batch_regularizer is not None else None
        loss = out["loss"]
        watch.note(loss, step, LOSS, out)
        scaled = loss / settings.accum_iter
        reg = None
        if from_batch is not None:
            weight = settings.reg_loss_weight if settings.batch_reg_weight is None else settings.batch_reg_weight
            reg = weight * from_batch.float()
            scaled = scaled + reg / settings.accum_iter
        if weights_term is not None:
            weights_term = settings.reg_loss_weight * weights_term
            reg = weights_term if reg is None else reg + weights_term
            scaled = scaled + weights_term
        (scaler.scale(scaled) if scaler else scaled).backward()
    skipped_step = False
    if last_micro:
        skipped_step = not optimizer_step(model, optimizer, scaler, settings, step, watch)
        if hooks.after_step is not None:
            hooks.after_step()
    scalars = scalars_of(out)
    if skipped_step:
        hooks.overflow_steps += 1
    if reg is not None:
        scalars["loss_reg"] = reg.detach()
    return scalars


def report_step(progress: ProgressPrinter, log_writer, scalars: dict[str, float], optimizer, epoch: int, step: int,
                total: int, n: int) -> None:
    """The console line and the TensorBoard scalars of a --print_freq step."""
    lr = optimizer.param_groups[0]["lr"]
    progress.step(step, n, {"lr": lr, **scalars})
    if log_writer is not None:
        epoch_1000x = first_step(epoch) + int(step / total * 1000)  # one axis for runs of different batch sizes
        for key, value in {**scalars, "lr": lr}.items():
            log_writer.add_scalar(f"train/{key}", value, epoch_1000x)


def train_one_epoch(model: torch.nn.Module, loader: Iterable[Batch], optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, settings: StepSettings, prepare: Callable[[Batch], Batch],
                    scaler: torch.amp.GradScaler | None = None, log_writer=None, skipped_so_far: int = 0,
                    steps_per_epoch: int | None = None, hooks: EpochHooks | None = None,
                    resumed: EpochProgress | None = None) -> dict[str, float]:
    """One pass over `loader`; returns sample-weighted averages of every scalar over all ranks, the
    number of skipped samples and the last lr. `resumed`: the epoch's first `batches_done` batches
    were trained before a mid-epoch checkpoint; they are read again (so that the loader's workers
    draw what they drew then) but not trained on, and the epoch goes on from the checkpoint's state."""
    model.train()
    hooks = hooks or EpochHooks()
    total = steps_per_epoch or len(loader)  # type: ignore[arg-type]
    averager, skipped, skip = ScalarAverager(), 0, 0
    if resumed is not None:
        averager.load_state_dict(resumed.averager)
        skipped, skip, hooks.overflow_steps = resumed.skipped, resumed.batches_done, resumed.overflow_steps
    progress = ProgressPrinter(f"Epoch [{epoch}]", total, settings.print_freq)
    watch = FinitenessWatch(device)
    optimizer.zero_grad(set_to_none=True)
    try:
        for step, batch in enumerate(loader):
            if step < skip:
                if step + 1 == skip:  # the generators as they were right after the checkpoint's step
                    rng_state.restore(resumed.rng)
                continue
            skipped += int(batch.pop(NUM_SKIPPED, 0))
            check_bad_samples(settings, skipped_so_far + skipped)
            schedule_lr(optimizer, settings, epoch, step, total)
            if not batch:  # every sample of this batch was unreadable
                continue
            batch = prepare(batch)
            scalars = _micro_batch(model, batch, optimizer, device, settings, scaler, hooks, step, total, watch)
            n = batch_size(batch)
            averager.update(scalars, n)
            if progress.due(step):  # the only reads back to the host
                watch.check(epoch, cause_of(settings))
                report_step(progress, log_writer, host_values(scalars), optimizer, epoch, step, total, n)
            else:
                progress.count(n)
            if hooks.at_step_end is not None and step + 1 < total and is_last_micro_batch(settings, step, total):
                hooks.at_step_end(step + 1, lambda: _snapshot(step + 1, averager, skipped, hooks, watch, epoch, settings))
    except RuntimeError:  # a NaN that reached a kernel which refuses it (e.g. sampling): name the first bad step
        watch.check(epoch, cause_of(settings))
        raise
    watch.check(epoch, cause_of(settings))
    stats = averager.global_average(device)
    stats["skipped_samples"] = global_skipped(skipped, device)
    require_something_trained(stats, epoch, settings)
    stats["lr"] = optimizer.param_groups[0]["lr"]
    if scaler is not None:
        stats["amp_skipped_steps"] = float(hooks.overflow_steps)
    check_weights(model, epoch, cause_of(settings))
    return stats


def require_something_trained(stats: dict[str, float], epoch: int, settings: StepSettings) -> None:
    """An epoch in which no sample could be read trained nothing: the run stops there, before any
    checkpoint or report would call it done (every rank sees the same reduced statistics)."""
    if "loss" in stats:
        return
    skipped = int(stats["skipped_samples"])
    raise UserError(f"epoch {epoch} trained on nothing: all {skipped} samples it read from {settings.data_name} were "
                    f"unreadable and skipped (not images, or without a caption); fix or replace that data (nothing was "
                    f"saved)")


def _snapshot(batches_done: int, averager: ScalarAverager, skipped: int, hooks: EpochHooks, watch: FinitenessWatch,
              epoch: int, settings: StepSettings) -> EpochProgress:
    """The epoch so far; a non-finite loss or gradient since the last check stops the run here
    instead of going into a checkpoint."""
    watch.check(epoch, cause_of(settings))
    return EpochProgress(batches_done, averager.state_dict(), skipped, hooks.overflow_steps, rng_state.capture())
