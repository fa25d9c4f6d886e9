"""The stage metrics against naive re-implementations: retrieval recall with several captions per
image (COCO/Flickr30k protocol) and leave-one-out k-NN."""
from __future__ import annotations

import pytest
import torch

from training.stage_eval import knn_leave_one_out, recall_at_k


def naive_recall(similarity, owner, k):
    n_images, n_texts = len(similarity), len(similarity[0])
    i2t = sum(any(owner[j] == i for j in sorted(range(n_texts), key=lambda j: -similarity[i][j])[:k])
              for i in range(n_images)) / n_images
    t2i = sum(owner[j] in sorted(range(n_images), key=lambda i: -similarity[i][j])[:k] for j in range(n_texts)) / n_texts
    return i2t, t2i


def test_recall_at_k_with_several_captions_per_image():
    gen = torch.Generator().manual_seed(0)
    similarity = torch.randn(7, 15, generator=gen)
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6])
    got = recall_at_k(similarity, owner)
    for k in (1, 5, 10):
        i2t, t2i = naive_recall(similarity.tolist(), owner.tolist(), k)
        assert got[f"itc_i2t_r{k}"] == pytest.approx(i2t) and got[f"itc_t2i_r{k}"] == pytest.approx(t2i)
    perfect = torch.full((7, 15), -1.0)
    perfect[owner, torch.arange(15)] = 1.0
    assert recall_at_k(perfect, owner)["itc_i2t_r1"] == recall_at_k(perfect, owner)["itc_t2i_r1"] == 1.0


def test_knn_leave_one_out_matches_a_loop():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (40,), generator=gen)
    features = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen) + labels[:, None].float(), dim=-1)
    k, t = 5, 0.07
    correct = 0
    for i in range(40):
        sims = [(float(features[i] @ features[j]), j) for j in range(40) if j != i]
        votes = [0.0, 0.0, 0.0]
        for s, j in sorted(sims, reverse=True)[:k]:
            votes[int(labels[j])] += torch.tensor(s / t).exp().item()
        correct += max(range(3), key=lambda c: votes[c]) == int(labels[i])
    assert knn_leave_one_out(features, labels, k, t) == pytest.approx(correct / 40)


def test_mim_loss_and_accuracy_are_means_over_every_masked_patch(monkeypatch):
    """Batches of different sizes: both are per-patch means over the whole set, not means of batch means."""
    from custom_datasets import batch as B
    from training import stage_eval

    gen = torch.Generator().manual_seed(2)
    logits = [torch.randn(n, 6, generator=gen) for n in (5, 9)]
    targets = [torch.randint(0, 6, (n,), generator=gen) for n in (5, 9)]
    calls = iter(zip(logits, targets))
    monkeypatch.setattr(stage_eval, "mim_logits", lambda backbone, head, batch: next(calls))

    class TwoBatches:
        def batches(self, loader, header=""):
            yield from ({B.VISUAL_TOKENS: torch.zeros(1)} for _ in range(2))

    out = stage_eval.mim_and_knn(None, torch.nn.Identity(), ([0], None), TwoBatches(), 1)
    all_logits, all_targets = torch.cat(logits), torch.cat(targets)
    assert out["image_mim_acc"] == pytest.approx((all_logits.argmax(1) == all_targets).float().mean().item())
    assert out["image_mim_loss"] == pytest.approx(torch.nn.functional.cross_entropy(all_logits, all_targets).item())
