"""One fine-tuning epoch and one evaluation pass for downstream classification (MAE/BEiT style):
mixup/cutmix targets, AMP, accumulation, clipping, per-iteration lr, EMA, top-1/top-5. The model
is called with the batch fields named in `input_keys` (images, or token ids and mask)."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from engine_pretrain import (StepSettings, autocast, check_bad_samples, check_finite, global_skipped, gradient_sync,
                             is_last_micro_batch, optimizer_step, schedule_lr)
from util.metrics import ProgressPrinter, ScalarAverager

Batch = dict[str, Any]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # [B, k]
    hits = top == labels[:, None]
    return {f"acc{k}": hits[:, :k].any(1).float().mean().item() * 100 for k in ks}


IMAGE_INPUTS = ("images",)


def _inputs(batch: Batch, keys: tuple[str, ...], device: torch.device) -> dict[str, torch.Tensor]:
    fields = {"images": "image"}  # batch field of each model argument
    return {k: batch[fields.get(k, k)].to(device, non_blocking=True) for k in keys}


def train_one_epoch(model: torch.nn.Module, criterion: Callable, loader: Iterable[Batch], optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, settings: StepSettings, mixup_fn=None, model_ema=None,
                    scaler: torch.amp.GradScaler | None = None, log_writer=None, skipped_so_far: int = 0,
                    input_keys: tuple[str, ...] = IMAGE_INPUTS) -> dict[str, float]:
    model.train()
    total = len(loader)  # type: ignore[arg-type]
    averager = ScalarAverager()
    progress = ProgressPrinter(f"Epoch [{epoch}]", total, settings.print_freq)
    skipped = 0
    optimizer.zero_grad(set_to_none=True)
    for step, batch in enumerate(loader):
        skipped += int(batch.pop("num_skipped", 0))
        check_bad_samples(settings, skipped_so_far + skipped)
        schedule_lr(optimizer, settings, epoch, step, total)
        if not batch:
            continue
        inputs, labels = _inputs(batch, input_keys, device), batch["label"].to(device, non_blocking=True)
        targets = labels
        if mixup_fn is not None:
            if len(labels) % 2:  # timm's Mixup pairs samples and needs an even batch
                inputs, labels = {k: v[:-1] for k, v in inputs.items()}, labels[:-1]
            inputs["images"], targets = mixup_fn(inputs["images"], labels)
        last_micro = is_last_micro_batch(settings, step, total)
        with gradient_sync(model, last_micro):
            with autocast(device, settings.amp_dtype):
                loss = criterion(model(**inputs).float(), targets)
            check_finite(loss, epoch, step)
            scaled = loss / settings.accum_iter
            (scaler.scale(scaled) if scaler else scaled).backward()
        if last_micro:
            optimizer_step(model, optimizer, scaler, settings.clip_grad)
            if model_ema is not None:
                model_ema.update(getattr(model, "module", model))  # the EMA copy is of the unwrapped model
        averager.update({"loss": loss.item()}, len(labels))
        progress.step(step, len(labels), {"lr": optimizer.param_groups[0]["lr"], "loss": loss.item()})
        if log_writer is not None and last_micro:
            epoch_1000x = int((epoch + step / total) * 1000)
            log_writer.add_scalar("train/loss", loss.item(), epoch_1000x)
            log_writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], epoch_1000x)
    stats = averager.global_average(device)
    stats["lr"] = optimizer.param_groups[0]["lr"]
    stats["skipped_samples"] = global_skipped(skipped, device)
    return stats


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable[Batch], device: torch.device,
             amp_dtype: torch.dtype | None = None, input_keys: tuple[str, ...] = IMAGE_INPUTS) -> dict[str, float]:
    """Cross-entropy loss, top-1 and top-5 accuracy (percent) over the loader and all ranks."""
    model.eval()
    averager = ScalarAverager()
    for batch in loader:
        batch.pop("num_skipped", None)
        if not batch:
            continue
        inputs, labels = _inputs(batch, input_keys, device), batch["label"].to(device)
        with autocast(device, amp_dtype):
            logits = model(**inputs).float()
        scalars = {"loss": torch.nn.functional.cross_entropy(logits, labels).item(), **topk_correct(logits, labels)}
        averager.update(scalars, len(labels))
    return averager.global_average(device)
