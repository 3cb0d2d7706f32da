"""Paired bootstrap statistics on per-image scores (seeded, percentile intervals).

Two methods scored on the *same* images are compared through the per-image differences
``d_i = a_i - b_i``: the images are resampled with replacement ``n_boot`` times and the mean difference
recomputed; the central ``confidence`` part of those means is the interval. A difference is called
significant when the interval excludes 0. The two-sided bootstrap p-value
``2 * min(P(mean* <= 0), P(mean* >= 0))`` is reported beside it, with Holm's adjustment when many
comparisons are made at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

CHUNK = 256  # bootstrap replicates drawn at a time (bounded memory for large test sets)


@dataclass(frozen=True)
class Interval:
    """A bootstrap estimate: ``mean`` with its ``[low, high]`` interval over ``n`` paired images."""

    mean: float
    low: float
    high: float
    p_value: float
    n: int
    n_boot: int
    confidence: float

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` means of ``values`` resampled with replacement (seeded, reproducible)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or not len(values):
        raise ValueError(f"need a non-empty 1-D array of per-image values, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, CHUNK):
        stop = min(start + CHUNK, n_boot)
        means[start:stop] = values[rng.integers(0, len(values), (stop - start, len(values)))].mean(axis=1)
    return means


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> Interval:
    """Percentile interval of the mean of ``values``; the p-value tests mean = 0."""
    values = np.asarray(values, dtype=np.float64)
    means = bootstrap_means(values, n_boot, seed)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    p = min(1.0, 2 * min(np.mean(means <= 0), np.mean(means >= 0)))
    return Interval(float(values.mean()), float(low), float(high), float(p), len(values), n_boot, confidence)


def paired(a: pd.Series, b: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """The values of ``a`` and ``b`` (indexed by image key) on the images both scored, in one order."""
    common = a.index.intersection(b.index).sort_values()
    if a.index.has_duplicates or b.index.has_duplicates:
        raise ValueError("per-image scores must have one value per image key")
    return a.loc[common].to_numpy(np.float64), b.loc[common].to_numpy(np.float64)


def paired_bootstrap(a: pd.Series | np.ndarray, b: pd.Series | np.ndarray, n_boot: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> Interval:
    """Interval of mean(a - b) over the images both were scored on (Series: matched by key)."""
    if isinstance(a, pd.Series) and isinstance(b, pd.Series):
        a, b = paired(a, b)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in shape: {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, n_boot, seed, confidence)


def holm(p_values: list[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))))
    out = np.empty_like(p)
    out[order] = adjusted
    return out


def promotion_decision(challenger: pd.Series, champion: pd.Series | None, n_boot: int, seed: int,
                       confidence: float) -> dict:
    """Should ``challenger`` replace ``champion``? Per-image validation Dice, indexed by image key.

    Promoted when there is no champion; when the two were validated on different image sets (the
    split changed, so the champion's figure is not comparable and it may have trained on today's
    validation images); or when the paired bootstrap interval of the Dice gain lies above 0.
    """
    if champion is None:
        return {"promote": True, "reason": "no champion yet"}
    if set(challenger.index) != set(champion.index):
        return {"promote": True, "reason": "validation images differ from the champion's (split changed); "
                                           "no paired comparison possible"}
    ci = paired_bootstrap(challenger, champion, n_boot, seed, confidence)
    gain = ci.low > 0
    verdict = "lies above 0" if gain else ("includes 0" if ci.high >= 0 else "lies below 0: the challenger is worse")
    reason = (f"validation Dice gain {ci.mean:+.4f}, {confidence:.0%} CI [{ci.low:+.4f}, {ci.high:+.4f}] "
              f"{verdict} (paired bootstrap, n={ci.n}, {n_boot} resamples)")
    return {"promote": gain, "reason": reason, **{f"ci_{k}": v for k, v in ci.as_dict().items()}}
