"""Paired bootstrap on crafted data: identical methods, a clearly better one, seeding, Holm, promotion."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from polypflow.evaluate.stats import bootstrap_ci, holm, paired_bootstrap, promotion_decision

pytestmark = pytest.mark.quick


def scores(values, prefix="img") -> pd.Series:
    return pd.Series(values, index=[f"{prefix}{i:03d}" for i in range(len(values))], dtype=float)


def test_identical_methods_ci_contains_zero():
    a = np.random.default_rng(0).uniform(0.3, 0.95, 80)
    ci = paired_bootstrap(a, a.copy(), n_boot=500, seed=1)
    assert ci.low <= 0 <= ci.high and not ci.significant and ci.mean == 0 and ci.p_value == 1.0


def test_noise_only_difference_is_not_significant():
    rng = np.random.default_rng(2)
    a = rng.uniform(0.3, 0.95, 100)
    b = a + rng.normal(0, 0.05, 100)
    b = b - (b - a).mean()  # mean difference exactly 0
    ci = paired_bootstrap(a, b, n_boot=1000, seed=0)
    assert ci.low < 0 < ci.high and not ci.significant


def test_clearly_better_method_ci_excludes_zero():
    rng = np.random.default_rng(3)
    b = rng.uniform(0.3, 0.9, 60)
    a = np.clip(b + 0.05 + rng.normal(0, 0.02, 60), 0, 1)
    ci = paired_bootstrap(a, b, n_boot=1000, seed=0)
    assert ci.significant and ci.low > 0.03 and ci.high < 0.07 and ci.p_value < 0.01
    reverse = paired_bootstrap(b, a, n_boot=1000, seed=0)
    assert reverse.high < 0 and reverse.significant


def test_pairs_by_key_not_by_position():
    a = scores([0.9, 0.8, 0.7])
    b = a.iloc[::-1] - 0.1  # same images, other order
    ci = paired_bootstrap(a, b, n_boot=200, seed=0)
    assert ci.n == 3 and ci.mean == pytest.approx(0.1) and ci.low == pytest.approx(0.1)


def test_seeded_and_close_to_the_normal_interval():
    x = np.random.default_rng(4).normal(0.2, 1.0, 400)
    one, two = bootstrap_ci(x, 2000, seed=7), bootstrap_ci(x, 2000, seed=7)
    assert one == two
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert one.high - one.low == pytest.approx(2 * half, rel=0.1)


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == pytest.approx([0.5])


def test_promotion_decision():
    rng = np.random.default_rng(5)
    champion = scores(rng.uniform(0.4, 0.9, 50))
    assert promotion_decision(champion, None, 500, 0, 0.95)["promote"]
    same = promotion_decision(champion.copy(), champion, 500, 0, 0.95)
    assert not same["promote"] and same["ci_low"] <= 0 <= same["ci_high"]
    better = promotion_decision(champion + 0.05, champion, 500, 0, 0.95)
    assert better["promote"] and better["ci_low"] > 0 and "lies above 0" in better["reason"]
    worse = promotion_decision(champion - 0.05, champion, 500, 0, 0.95)
    assert not worse["promote"] and worse["ci_high"] < 0 and "lies below 0" in worse["reason"]
    assert "includes 0" in same["reason"]
    other_split = promotion_decision(scores(champion.to_numpy(), "other"), champion, 500, 0, 0.95)
    assert other_split["promote"] and "split changed" in other_split["reason"]
