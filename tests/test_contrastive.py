"""The ITC loss against a naive implementation, and the cross-rank gather: two gloo processes give
the loss and gradients of one process holding both halves."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common import distributed as dist_util
from models.modes.image_text_itc import contrastive_loss
from tests.distributed_harness import run_in_processes

N, D = 6, 5


def naive_itc(images: torch.Tensor, texts: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-pair softmax written out with Python loops (CLIP's symmetric InfoNCE)."""
    total = 0.0
    for i in range(len(images)):
        sims = [scale * float(images[i] @ texts[j]) for j in range(len(texts))]
        total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    for j in range(len(texts)):
        sims = [scale * float(images[i] @ texts[j]) for i in range(len(images))]
        total += -(sims[j] - math.log(sum(math.exp(s) for s in sims)))
    return torch.tensor(total / (2 * len(images)))


def _embeddings():
    gen = torch.Generator().manual_seed(0)
    return (F.normalize(torch.randn(N, D, generator=gen), dim=-1), F.normalize(torch.randn(N, D, generator=gen), dim=-1))


def test_itc_loss_matches_a_naive_implementation():
    images, texts = _embeddings()
    out = contrastive_loss(images, texts, torch.tensor(7.0), lambda x: x)
    assert out["loss_itc"].item() == pytest.approx(naive_itc(images, texts, 7.0).item(), rel=1e-5)
    aligned = contrastive_loss(images, images, torch.tensor(50.0), lambda x: x)
    assert aligned["acc_i2t"].item() == aligned["acc_t2i"].item() == 1.0


def _encoder():
    torch.manual_seed(0)
    return torch.nn.Linear(D, D)


def _loss_and_grads(encoder, image_in, text_in, gather):
    images = F.normalize(encoder(image_in), dim=-1)
    texts = F.normalize(encoder(text_in), dim=-1)
    loss = contrastive_loss(images, texts, torch.tensor(10.0), gather)["loss_itc"]
    loss.backward()
    return loss.detach(), encoder.weight.grad.clone()


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, D, generator=gen), torch.randn(N, D, generator=gen)


def _gather_worker(rank: int, world: int, out_path: str) -> None:
    encoder = _encoder()
    image_in, text_in = _inputs()
    half = N // world
    loss, grad = _loss_and_grads(encoder, image_in[rank * half:(rank + 1) * half], text_in[rank * half:(rank + 1) * half],
                                 dist_util.gather_with_grad)
    grad = dist_util.all_reduce_sum(grad) / world  # what DDP does with the ranks' gradients
    if rank == 0:
        torch.save({"loss": loss, "grad": grad}, out_path)


def test_gather_across_two_processes_equals_one_process_with_both_halves(tmp_path):
    out = tmp_path / "gathered.pt"
    run_in_processes(_gather_worker, 2, str(out))
    loss, grad = _loss_and_grads(_encoder(), *_inputs(), lambda x: x)
    got = torch.load(out, weights_only=True)
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.allclose(got["grad"], grad, rtol=1e-5, atol=1e-7)


def test_a_stage_whose_contrastive_loss_stays_at_chance_is_told_so():
    """Collapsed embeddings (every image and caption the same vector) give exactly ln(batch), the
    loss a real run on 800 Flickr pairs stayed at for 15 epochs (3.465 at batch 32) without a word."""
    from training.pretrain_finish import contrastive_at_chance

    same = F.normalize(torch.ones(32, 8), dim=-1)
    out = contrastive_loss(same, same.clone(), torch.tensor(14.0), lambda x: x)
    assert float(out["loss_itc"]) == pytest.approx(math.log(32), abs=1e-5)
    warning = contrastive_at_chance({"train_loss_itc": float(out["loss_itc"])}, 32)
    assert warning is not None and "ln 32 = 3.466" in warning and "--blr" in warning
    assert contrastive_at_chance({"train_loss_itc": 3.465}, 64) is None  # 64 candidates: ln 64 = 4.16
    assert contrastive_at_chance({"train_loss_itc": 3.229}, 32) is None  # a stage that learned a little
    assert contrastive_at_chance({"train_loss_mim": 4.8}, 32) is None  # not a contrastive stage
