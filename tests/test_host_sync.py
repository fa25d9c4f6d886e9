"""The training step reads nothing back to the host between --print_freq steps (losses are summed
on the device, the finiteness watch lives there too), and the watch still names the first
non-finite step, of the loss or of the gradients, before anything of the epoch is returned."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from common.errors import UserError
from training.step import StepSettings, train_one_epoch

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__format__", "numpy", "cpu")


class InfiniteGradient(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (a finite loss whose gradients blow up)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Toy(nn.Module):
    """A linear regression whose loss turns NaN (or whose weights' gradient turns inf) at one step."""

    def __init__(self, nan_loss_at: int | None = None, inf_grad_at: int | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.nan_loss_at, self.inf_grad_at, self.calls = nan_loss_at, inf_grad_at, 0
        self.losses: list[float] = []

    def forward(self, batch):
        step, self.calls = self.calls, self.calls + 1
        error = (self.fc(batch["x"]).squeeze(1) - batch["y"]).pow(2)
        if step == self.inf_grad_at:
            error = InfiniteGradient.apply(error)
        loss = error.mean() + (torch.tensor(float("nan")) if step == self.nan_loss_at else 0)
        self.losses.append(loss.detach().clone())
        return {"loss": loss, "loss_mse": loss.detach(), "acc_fake": (error < 1).float().mean()}


def batches(n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(8, 4, generator=gen), "y": torch.randn(8, generator=gen)} for _ in range(n)]


def run(model: Toy, steps: int, print_freq: int = 1000, clip_grad: float | None = None) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    settings = StepSettings(lr=0.01, min_lr=0.0, warmup_epochs=0, epochs=1, print_freq=print_freq, clip_grad=clip_grad)
    return train_one_epoch(model, batches(steps), optimizer, torch.device("cpu"), 0, settings, lambda b: b)


def count_reads(monkeypatch, steps: int) -> int:
    calls = {"n": 0}
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            calls["n"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    run(Toy(), steps)
    monkeypatch.undo()
    return calls["n"]


def test_host_reads_do_not_grow_with_the_number_of_steps(monkeypatch):
    assert count_reads(monkeypatch, 6) == count_reads(monkeypatch, 30)


def test_the_epoch_average_is_the_mean_of_the_step_losses():
    model = Toy()
    stats = run(model, 7)
    assert stats["loss"] == pytest.approx(torch.stack(model.losses).mean().item(), rel=1e-6)
    assert stats["loss_mse"] == pytest.approx(stats["loss"], rel=1e-6)


def test_a_nan_loss_is_named_by_its_step_without_a_read_at_that_step():
    with pytest.raises(UserError, match=r"the loss became nan at epoch 0 step 3; nothing of this epoch was saved"):
        run(Toy(nan_loss_at=3), 10)  # print_freq 1000: the first read is at the last step


def test_non_finite_gradients_are_named_by_their_step():
    with pytest.raises(UserError, match=r"the gradients became non-finite at epoch 0 step 2 \(norm (inf|nan)\); nothing of"):
        run(Toy(inf_grad_at=2), 6, clip_grad=1.0)


def test_a_kernel_that_refuses_nan_still_gets_the_sentence_about_the_first_bad_step():
    class Sampling(Toy):
        def forward(self, batch):
            out = super().forward(batch)
            if self.calls == 5:  # what ITM's negative sampling does with NaN similarities
                torch.multinomial(torch.tensor([float("nan"), 1.0]), 1)
            return out

    with pytest.raises(UserError, match="at epoch 0 step 1"):
        run(Sampling(nan_loss_at=1), 8)
