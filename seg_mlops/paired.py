"""Paired statistics of two models' per-image scores on the same images: is B better than A?

The decision rule is a seeded percentile bootstrap confidence interval of the mean per-image
difference (B - A): it is in the users' unit (dice points), needs no assumption about the shape
or symmetry of the differences, and "B is better" means the whole interval lies above 0.
Wilcoxon's signed-rank p-value (scipy) is reported beside it, as a second opinion that does not
depend on resampling; it does not decide. With few images the percentile interval is optimistic
(too narrow): the image count is always reported with it.

Images are not always independent: Herlev's test split holds rotated and flipped copies of one
cell. Given groups (data.valid_group names them), the bootstrap resamples whole groups (a cluster
bootstrap: the mean difference of a resample = its differences' sum over its image count) and
Wilcoxon ranks the groups' mean differences, so copies of one image count once, not once per copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Resamples drawn per block: bounds the (block, n) index array's memory on large test splits.
_BLOCK = 1000


@dataclass(frozen=True)
class Paired:
    """Scores of A and B on the same images, compared.

    n: images scored by both (the pairs); skipped: images left out because a score is NaN (the
    image's truth has no foreground: nothing to score); difference: mean of B - A over the pairs;
    (ci_low, ci_high): its bootstrap interval at `confidence`; p_value: Wilcoxon's (two-sided).
    """

    n: int
    skipped: int
    groups: int  # independent units resampled: groups of images, or the images themselves
    mean_a: float
    mean_b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float
    resamples: int
    seed: int

    @property
    def b_better(self) -> bool:
        """B is significantly better: the interval lies above 0."""
        return self.ci_low > 0

    @property
    def a_better(self) -> bool:
        return self.ci_high < 0

    @property
    def verdict(self) -> str:
        """One line saying what the interval decides."""
        if self.groups < 2:
            return f"not decided: {self.groups} independent image group(s) paired, an interval needs at least 2"
        if self.b_better:
            return "B is better (the whole interval is above 0)"
        if self.a_better:
            return "A is better (the whole interval is below 0)"
        return "no significant difference (the interval contains 0)"


def bootstrap_interval(differences: np.ndarray, confidence: float, resamples: int,
                       seed: int, groups=None) -> tuple[float, float]:
    """Percentile interval of the mean of `differences` over `resamples` seeded resamples with
    replacement: of the values, or of whole groups when `groups` (one label per value) is given
    (each resample draws as many groups as there are, its mean = sum / count of the drawn
    groups' values); NaN for fewer than 2 values or groups."""
    d = np.asarray(differences, dtype=np.float64)
    labels = np.arange(d.size) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    sums, counts = np.bincount(labels, weights=d), np.bincount(labels).astype(np.float64)
    if sums.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = (rng.integers(0, sums.size, (min(_BLOCK, resamples - start), sums.size))
             for start in range(0, resamples, _BLOCK))
    means = np.concatenate([sums[i].sum(1) / counts[i].sum(1) for i in draws])
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the differences; 1.0 when all are 0 (scipy
    would divide by zero), NaN for none."""
    from scipy.stats import wilcoxon

    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        return float("nan")
    if not np.any(d):
        return 1.0
    return float(wilcoxon(d).pvalue)


def compare(a, b, *, confidence: float = 0.95, resamples: int = 10000, seed: int = 0,
            groups=None) -> Paired:
    """Compare per-image scores `a` and `b` (same images, same order; NaN = not scored).

    Args:
        a, b: one score per image, e.g. the per-image dice of two models.
        groups: one label per image (e.g. the cell an augmented copy shows); None: every image
            is its own group. Resampling and Wilcoxon then work on groups (see the module doc).
        confidence: of the interval, e.g. 0.95.
        resamples: bootstrap resamples.
        seed: of the bootstrap's numpy Generator: the same inputs give the same interval.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need two 1-D arrays of one length, got shapes {a.shape} and {b.shape}")
    both = ~(np.isnan(a) | np.isnan(b))
    a, b = a[both], b[both]
    d = b - a
    labels = np.unique(np.asarray(groups)[both] if groups is not None else np.arange(d.size),
                       return_inverse=True)[1]
    low, high = bootstrap_interval(d, confidence, resamples, seed, labels)
    per_group = np.bincount(labels, weights=d) / np.bincount(labels) if d.size else d
    return Paired(n=int(d.size), skipped=int((~both).sum()), groups=int(per_group.size), mean_a=_mean(a),
                  mean_b=_mean(b), difference=_mean(d), ci_low=low, ci_high=high, p_value=wilcoxon_p(per_group),
                  confidence=confidence, resamples=resamples, seed=seed)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")
