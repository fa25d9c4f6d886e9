"""Non-finite guards: a run stops with one sentence naming the epoch and step, what went
non-finite (loss, gradients, weights, evaluation) and the likely cause, before anything of it is
saved. Under fp16 an overflow step is normal: the loss scaler skips it, and it is counted."""
from __future__ import annotations

import math
from typing import Any

import torch

from common import distributed as dist_util
from common.errors import UserError
from training.fsdp import is_sharded, local_part


def likely_cause(lr: float, amp_dtype: torch.dtype | None, clip_grad: float | None) -> str:
    if amp_dtype == torch.float16:
        return "fp16 overflow: use --amp bf16 or --amp none"
    return f"the optimisation diverged: lower --blr / --lr (the lr is {lr:.3g})" + (
        "" if clip_grad else " or clip the gradients with --clip_grad 3.0")


def check_loss(loss: torch.Tensor, out: dict[str, Any], epoch: int, step: int, cause: str) -> None:
    value = loss.item()
    if math.isfinite(value):
        return
    empty = [k for k, v in out.items() if k.startswith("acc_") and isinstance(v, torch.Tensor) and torch.isnan(v).any()]
    if empty:  # an accuracy over no targets is NaN: nothing to predict in this batch
        raise UserError(f"the loss became {value} at epoch {epoch} step {step} because the batch had no prediction "
                        f"targets ({', '.join(empty)} over zero items, e.g. only empty captions); check the data")
    raise UserError(f"the loss became {value} at epoch {epoch} step {step}; likely cause: {cause}")


def check_gradients(norm: torch.Tensor | None, epoch: int, step: int, cause: str) -> None:
    """Without a loss scaler, non-finite gradients would be applied: stop before the step."""
    if norm is not None and not torch.isfinite(norm):
        raise UserError(f"the gradients became non-finite at epoch {epoch} step {step} (norm {norm.item()}); nothing "
                        f"was applied or saved; likely cause: {cause}")


def check_weights(model: torch.nn.Module, epoch: int, cause: str) -> None:
    """After an epoch, before evaluating and saving it."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(local_part(p)).all()]
    if is_sharded(model):  # each rank sees its shards: all stop together, or none does
        bad_anywhere = dist_util.all_reduce_sum(torch.tensor(len(bad), device=next(model.parameters()).device)).item()
        bad = bad or (["a shard on another rank"] * int(bad_anywhere))
    if bad:
        raise UserError(f"the weights became non-finite during epoch {epoch} (e.g. {bad[0]}, {len(bad)} tensors); this "
                        f"epoch was not saved, the last checkpoint is intact; likely cause: {cause}")


def check_evaluation(stats: dict[str, float], epoch: int, cause: str) -> None:
    """A NaN evaluation means diverged weights even when each one is finite (e.g. 1e30)."""
    bad = sorted(k for k, v in stats.items() if not math.isfinite(v))
    if bad:
        raise UserError(f"the evaluation after epoch {epoch} gave {bad[0]} {stats[bad[0]]}: the weights diverged; this "
                        f"epoch was not saved, the last checkpoint is intact; likely cause: {cause}")
