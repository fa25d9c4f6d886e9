"""The baselines a pretrained backbone has to beat on a labelled image set, computed on the very
split fine-tuning uses: fit on its training images, tuned on its model-selection images (the
regularisation strength, the number of neighbours), scored on its val images. Two classifiers:
L2-regularised multinomial logistic regression (full-batch L-BFGS on standardised features) and
k-nearest neighbours (cosine similarity on standardised features, majority vote with the nearest
as tie-break), each on raw pixels (the held-out view, flattened) and on a frozen backbone's
mean-pooled patch features (a random init's: what the architecture gives without pretraining)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from custom_datasets import batch as B
from custom_datasets.collate import collate_skipping_bad

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # weight of the squared weight norm next to the mean cross-entropy
K_GRID = (1, 3, 5, 10, 20)


@dataclass
class Split:
    """Features `[N, D]` and labels `[N]` of one part of the data."""

    x: torch.Tensor
    y: torch.Tensor


@torch.no_grad()
def pixel_features(dataset: Dataset, batch_size: int = 64) -> Split:
    """The images as the held-out view gives them, flattened `[N, C*H*W]`; unreadable ones skipped."""
    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_skipping_bad):
        if B.IMAGE in batch:
            xs.append(batch[B.IMAGE].flatten(1).float())
            ys.append(batch[B.LABEL])
    return Split(torch.cat(xs), torch.cat(ys))


def standardised(train: Split, *others: Split) -> list[Split]:
    """Each feature centred and scaled by the training images' statistics."""
    mean, std = train.x.mean(0), train.x.std(0).clamp(min=1e-6)
    return [Split((s.x - mean) / std, s.y) for s in (train, *others)]


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (predicted == labels).float().mean().item()


def fit_logistic_regression(train: Split, num_classes: int, l2: float, max_iter: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression: mean cross-entropy + `l2` * squared weight norm (bias free),
    minimised by L-BFGS over the whole training set (deterministic)."""
    model = torch.nn.Linear(train.x.shape[1], num_classes)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(train.x), train.y) + l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


@torch.no_grad()
def knn_predict(train: Split, query: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
    """Majority vote of the `k` most cosine-similar training samples; ties go to the class whose
    members are nearer (each vote is weighted 1 + a tiny share of its similarity)."""
    sims = F.normalize(query, dim=1) @ F.normalize(train.x, dim=1).t()  # [Q, N]
    top, index = sims.topk(min(k, len(train.y)), dim=1)
    votes = torch.zeros(len(query), num_classes).scatter_add_(1, train.y[index], 1.0 + 1e-3 * top)
    return votes.argmax(1)


@torch.no_grad()
def logistic_regression_accuracy(train: Split, selection: Split, val: Split, num_classes: int) -> tuple[float, float]:
    """(val accuracy, the L2 weight chosen on `selection`)."""
    train, selection, val = standardised(train, selection, val)
    best_l2, best = L2_GRID[0], -1.0
    for l2 in L2_GRID:
        with torch.enable_grad():
            model = fit_logistic_regression(train, num_classes, l2)
        score = accuracy(model(selection.x).argmax(1), selection.y)
        if score > best:
            best_l2, best, chosen = l2, score, model
    return accuracy(chosen(val.x).argmax(1), val.y), best_l2


def knn_accuracy(train: Split, selection: Split, val: Split, num_classes: int) -> tuple[float, int]:
    """(val accuracy, the k chosen on `selection`)."""
    train, selection, val = standardised(train, selection, val)
    scores = {k: accuracy(knn_predict(train, selection.x, k, num_classes), selection.y) for k in K_GRID}
    k = max(K_GRID, key=lambda value: (scores[value], -value))  # the smallest k among the best
    return accuracy(knn_predict(train, val.x, k, num_classes), val.y), k


def baseline_rows(features: dict[str, tuple[Split, Split, Split]], num_classes: int) -> dict[str, dict]:
    """For each kind of features (e.g. "raw pixels"), both classifiers' val accuracy and what was
    chosen on the selection split."""
    rows = {}
    for name, (train, selection, val) in features.items():
        acc, l2 = logistic_regression_accuracy(train, selection, val, num_classes)
        rows[f"logistic regression on {name}"] = {"acc1": acc, "chosen": f"L2 {l2:g}"}
        acc, k = knn_accuracy(train, selection, val, num_classes)
        rows[f"k-nearest neighbours on {name}"] = {"acc1": acc, "chosen": f"k {k}"}
    return rows
