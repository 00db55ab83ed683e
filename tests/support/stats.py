"""Pearson's chi-square test of observed counts against exact probabilities (no scipy here)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

ALPHA = 1e-4  # a correct sampler fails one check with this probability


def chi_square_quantile(dof: int, alpha: float = ALPHA) -> float:
    """Wilson-Hilferty: the chi-square distribution's 1 - alpha quantile (within 1% for dof >= 3)."""
    z = NormalDist().inv_cdf(1 - alpha)
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square(counts: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic of `counts` against p and its degrees of freedom; cells whose
    expected count is under 5 are pooled into one (a cell with p = 0 must never occur)."""
    assert counts[p == 0].sum() == 0, "drew an outcome of probability 0"
    expected = counts.sum() * p
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    keep = expected > 0
    statistic = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return statistic, int(keep.sum()) - 1


def assert_follows(counts: np.ndarray, p: np.ndarray, alpha: float = ALPHA) -> None:
    statistic, dof = chi_square(counts, p)
    assert statistic < chi_square_quantile(dof, alpha), f"chi-square {statistic:.1f} over {dof} dof"
