"""The transfer experiment's baselines on data with a known answer: separable classes are learned
(~100%), random labels stay at chance, and the hyperparameters are chosen on the selection split."""
from __future__ import annotations

import pytest
import torch

from experiments.baselines import (
    Split,
    baseline_rows,
    fit_logistic_regression,
    knn_accuracy,
    knn_predict,
    logistic_regression_accuracy,
    standardised,
)


def blobs(n: int, classes: int, dim: int, spread: float, seed: int, labels: torch.Tensor | None = None) -> Split:
    """`n` points around one centre per class (the centres are the same for every seed)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes if labels is None else labels
    return Split(centres[y] + spread * torch.randn(n, dim, generator=gen), y)


@pytest.mark.parametrize("method", [logistic_regression_accuracy, knn_accuracy])
def test_separable_classes_are_learned(method):
    train, selection, val = (blobs(n, 10, 50, 0.5, seed) for n, seed in ((300, 0), (100, 1), (200, 2)))
    accuracy, _ = method(train, selection, val, 10)
    assert accuracy >= 99.0


@pytest.mark.parametrize("method", [logistic_regression_accuracy, knn_accuracy])
def test_random_labels_stay_at_chance(method):
    """Features that say nothing about the labels: accuracy within a few points of 1/classes."""
    gen = torch.Generator().manual_seed(7)
    parts = [Split(torch.randn(n, 50, generator=gen), torch.randint(0, 4, (n,), generator=gen)) for n in (400, 200, 2000)]
    accuracy, _ = method(*parts, 4)
    assert abs(accuracy - 25.0) < 4.0  # 2000 val samples: the standard error of chance is ~1 point


def test_the_l2_weight_is_the_one_best_on_the_selection_split():
    """Few noisy samples in many dimensions: the weights differ in what they score, and the one
    reported is the best on the selection split (the smallest among equals), scored on val."""
    from experiments.baselines import L2_GRID, accuracy

    def weak_signal(n: int, seed: int) -> Split:  # one informative dimension among 400 of noise
        gen = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 2
        x = torch.randn(n, 400, generator=gen)
        x[:, 0] += 2.0 * y - 1.0
        return Split(x, y)

    parts = [weak_signal(n, seed) for n, seed in ((20, 0), (200, 1), (200, 2))]
    got, chosen = logistic_regression_accuracy(*parts, 2)
    train, selection, val = standardised(*parts)
    scores = {}
    for l2 in L2_GRID:
        model = fit_logistic_regression(train, 2, l2)
        with torch.no_grad():
            scores[l2] = (accuracy(model(selection.x).argmax(1), selection.y), accuracy(model(val.x).argmax(1), val.y))
    assert len({score for score, _ in scores.values()}) > 1  # the choice matters here
    best = max(scores, key=lambda l2: (scores[l2][0], -l2))
    assert chosen == best and got == scores[best][1]


def test_logistic_regression_reaches_the_optimum_it_states():
    """L-BFGS's result is a stationary point of the stated objective (its gradient vanishes)."""
    train = standardised(blobs(200, 3, 20, 2.0, 0))[0]
    model = fit_logistic_regression(train, 3, l2=1e-2)
    loss = torch.nn.functional.cross_entropy(model(train.x), train.y) + 1e-2 * model.weight.pow(2).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert max(g.abs().max().item() for g in grads) < 1e-4


def test_knn_votes_and_breaks_ties_by_nearness():
    train = Split(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.05, 0.95]]), torch.tensor([0, 0, 1, 1, 1]))
    query = torch.tensor([[1.0, 0.05], [0.2, 0.8]])
    assert knn_predict(train, query, 1, 2).tolist() == [0, 1]
    assert knn_predict(train, query, 5, 2).tolist() == [1, 1]  # three of five neighbours are class 1
    tie = Split(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    assert knn_predict(tie, torch.tensor([[0.8, 0.2]]), 2, 2).tolist() == [0]  # one vote each: the nearer wins


def test_rows_name_each_classifier_and_what_was_chosen():
    rows = baseline_rows({"raw pixels": tuple(blobs(n, 3, 8, 0.3, s) for n, s in ((90, 0), (30, 1), (60, 2)))}, 3)
    assert set(rows) == {"logistic regression on raw pixels", "k-nearest neighbours on raw pixels"}
    assert rows["logistic regression on raw pixels"]["chosen"].startswith("L2 ")
    assert rows["k-nearest neighbours on raw pixels"]["chosen"].startswith("k ")
