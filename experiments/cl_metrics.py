"""Continual-learning metrics of an accuracy matrix.

R[i][p] is probe p measured after stage i; row 0 is the reference b (the chain's input, before any
stage), rows 1..T the stages. Each probe belongs to the stage that trains it (`owner[p]` in 1..T);
a probe no stage trains is shown but not scored. A stage's *task score* is the mean of its probes
whose values are fractions (accuracies, recalls, `mim_gain`), except `UNSCORED` ones; losses are not
averaged with them but are scored per probe, negated so that higher is better everywhere
(`LOWER_IS_BETTER`).

With s(t) the task score of stage t measured after stage i, written S[i][t]:
- ACC = mean_t S[T][t]                                      (final average)
- BWT = mean_{t<T} S[T][t] - S[t][t]                        (backward transfer; < 0 is forgetting)
- FWT = mean_{t>1} S[t-1][t] - S[0][t]                      (forward transfer, GEM's)
- forgetting = mean_{t<T} max_{t<=i<T} S[i][t] - S[T][t]    (Chaudhry et al. 2018)
- kept[p] = R[T][p] / R[owner][p] (for losses the inverse: a loss that doubled keeps 0.5)
"""
from __future__ import annotations

import math
from statistics import mean
from typing import Any

LOWER_IS_BETTER = frozenset({"image_mim_loss", "image_mae_loss"})
# shown, not scored: an argmax over visual tokens that include near-duplicate background colours,
# which can rise while the MIM loss worsens (a backbone drifting towards the most frequent token)
UNSCORED = frozenset({"image_mim_acc"})

Matrix = list[dict[str, float]]


def oriented(probe: str, value: float) -> float:
    """The value turned so that higher is better (losses negated)."""
    return -value if probe in LOWER_IS_BETTER else value


def is_fraction(probe: str) -> bool:
    return probe not in LOWER_IS_BETTER


def mim_gain(loss: float, vocab_size: int) -> float:
    """1 − loss / ln(vocab): 0 for a uniform guess over the visual tokens, 1 for certainty on the
    right one; the MIM loss as a score in the task scores' scale, without the argmax's blind spots."""
    return 1 - loss / math.log(vocab_size)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def task_score(row: dict[str, float], probes: list[str]) -> float | None:
    """Mean of the row's fraction-valued probes among `probes` (None when it has none of them)."""
    values = [row[p] for p in probes if is_fraction(p) and p not in UNSCORED and _finite(row.get(p))]
    return mean(values) if values else None


def task_matrix(matrix: Matrix, owner: dict[str, int], stages: int) -> list[list[float | None]]:
    """S[i][t-1]: the task score of stage t after stage i (rows 0..T, columns stages 1..T)."""
    by_stage = {t: [p for p, s in owner.items() if s == t] for t in range(1, stages + 1)}
    return [[task_score(row, by_stage[t]) for t in range(1, stages + 1)] for row in matrix]


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return mean(kept) if kept else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def summary(matrix: Matrix, owner: dict[str, int]) -> dict[str, Any]:
    """ACC, BWT, FWT, forgetting over stages, and per probe its BWT, forgetting and share kept
    (see the module docstring). `matrix` has T+1 rows (reference first)."""
    stages = len(matrix) - 1
    if stages < 1:
        raise ValueError("an accuracy matrix needs the reference row and at least one stage")
    owner = {p: s for p, s in owner.items() if 1 <= s <= stages}
    S = task_matrix(matrix, owner, stages)
    T = stages
    out: dict[str, Any] = {
        "acc": _mean([S[T][t - 1] for t in range(1, T + 1)]),
        "bwt": _mean([_diff(S[T][t - 1], S[t][t - 1]) for t in range(1, T)]),
        "fwt": _mean([_diff(S[t - 1][t - 1], S[0][t - 1]) for t in range(2, T + 1)]),
        "forgetting": _mean([_forgetting([S[i][t - 1] for i in range(t, T)], S[T][t - 1]) for t in range(1, T)]),
        "task_scores": S,
        "probes": {},
    }
    for probe, s in sorted(owner.items(), key=lambda item: (item[1], item[0])):
        learned, last = matrix[s].get(probe), matrix[T].get(probe)
        if not (_finite(learned) and _finite(last)):
            continue
        earlier = [oriented(probe, matrix[i][probe]) for i in range(s, T) if _finite(matrix[i].get(probe))]
        out["probes"][probe] = {
            "stage": s,
            "learned": learned,
            "final": last,
            "bwt": oriented(probe, last) - oriented(probe, learned),
            "forgetting": _forgetting(earlier, oriented(probe, last)) if s < T else None,
            "kept": _share_kept(probe, learned, last),
        }
    return out


def _forgetting(earlier: list[float | None], last: float | None) -> float | None:
    values = [v for v in earlier if v is not None]
    return None if not values or last is None else max(values) - last


def _share_kept(probe: str, learned: float, last: float) -> float | None:
    num, den = (learned, last) if probe in LOWER_IS_BETTER else (last, learned)
    return num / den if den else None
