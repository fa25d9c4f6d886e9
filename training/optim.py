"""Optimizer pieces both kinds of run share: the learning rate from the base lr, AdamW with no
decay on norms, biases, tokens and position tables, the precision and the fp16 gradient scaler."""
from __future__ import annotations

import math

import torch

from common.errors import UserError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


MAX_LR = {"adamw": 10.0, "sgd": 1000.0}  # far beyond anything that trains: a typo in an exponent


def learning_rate(lr: float | None, blr: float, eff_batch: int, optimizer: str = "adamw") -> float:
    """`--lr`, or `--blr` scaled by the effective batch (the linear rule, per 256 samples); refused
    when it cannot train (not positive, not finite, or absurdly large)."""
    value = lr or blr * eff_batch / 256
    if not math.isfinite(value) or value <= 0 or value > MAX_LR[optimizer]:
        given = f"--lr {lr:g}" if lr else f"--blr {blr:g} (x effective batch {eff_batch} / 256 = {value:g})"
        raise UserError(f"{given} is not a learning rate that trains ({optimizer.upper()}: positive and at most "
                        f"{MAX_LR[optimizer]:g}; typical AdamW values are 1e-5 .. 1e-3); check the exponent")
    return value


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms, biases, tokens, position tables; only trainable parameters."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


ADAMW_IMPLS = ("for_loop", "foreach", "fused")
# torch's own choice (foreach on GPU, a loop over tensors on CPU) stays the default so published
# figures repeat; fused is 7.5x faster per optimizer step on CPU (experiments/benchmark.py --mode adamw)
ADAMW_DEFAULT = "auto"


def adamw_options(impl: str) -> dict:
    """torch.optim.AdamW's switch for one implementation (the same update in other kernels, equal
    to about 1e-7 per step)."""
    return {"auto": {}, "for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, ...],
          impl: str = ADAMW_DEFAULT) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), **adamw_options(impl))


def amp_dtype(amp: str | None) -> torch.dtype | None:
    return AMP_DTYPES.get(amp or "none")


def grad_scaler(amp: str | None, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None
