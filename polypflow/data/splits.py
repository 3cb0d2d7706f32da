"""Split schemes: seeded train/val/test sets per dataset and k-fold assignments, as the splits document.

- ``pranet``: the PraNet protocol exactly: the test images are the ids listed in
  ``<split.test_lists>/<dataset>_test.txt``, every other image of those datasets is train. Not leakage-safe
  (ClinicDB test frames have sequence mates in train); ``leakage_safe: false`` says so.
- ``pranet_grouped``: the protocol's sizes (``split.pranet_train``) with whole leakage groups on one side.
- ``70_15_15`` and ``80_10_10``: train/val/test per dataset, leakage groups kept whole.

Validation for epoch selection is ``val_fraction_of_train`` of the training groups. ``split.unseen`` datasets are
test-only. Folds (GroupKFold) cover train + val. Leakage groups come from :mod:`polypflow.data.leakage`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold

from polypflow.data.images import image_keys
from polypflow.data.leakage import check_no_leakage, leakage_groups
from polypflow.settings.config import Split

FRACTIONS = {"70_15_15": (0.70, 0.15), "80_10_10": (0.80, 0.10)}  # scheme -> (train, val) share of a dataset


def make_splits(facts: pd.DataFrame, cfg: Split, seed: int,
                test_lists: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The splits document: sets of ``dataset/id`` keys, per-dataset test sets, fold assignments.

    ``test_lists`` (scheme ``pranet``): each dataset's listed test ids, as :func:`read_test_lists` reads them."""
    df = facts[facts["dataset"].isin([*cfg.datasets, *cfg.unseen])].copy()
    df["key"] = image_keys(df)
    df["leak_group"] = leakage_groups(df)
    rng = np.random.default_rng(seed)
    df["set"] = ""
    df.loc[df["dataset"].isin(cfg.unseen), "set"] = "test"
    exact = cfg.scheme == "pranet"
    if exact:
        _place_listed(df, cfg, rng, test_lists)
    else:
        _place_groups(df, cfg, rng)
    test = df[df["set"] == "test"]
    return {
        "scheme": cfg.scheme, "seed": seed, "leakage_safe": not exact,
        "train": sorted(df.loc[df["set"] == "train", "key"]),
        "val": sorted(df.loc[df["set"] == "val", "key"]),
        "test": {d: sorted(test.loc[test["dataset"] == d, "key"]) for d in [*cfg.datasets, *cfg.unseen]},
        "unseen": list(cfg.unseen),
        "folds": {"k": cfg.folds, "assignment": fold_assignment(df, cfg.folds, seed)},
    }


def _place_listed(df: pd.DataFrame, cfg: Split, rng: np.random.Generator,
                  test_lists: dict[str, list[str]] | None) -> None:
    """Scheme ``pranet``: the protocol's own lists decide; sequence mates and copies may straddle sets, as in
    the papers."""
    if test_lists is None:
        raise ValueError("split.scheme pranet needs the protocol's test lists (split.test_lists)")
    for key in cfg.datasets:
        part = df[df["dataset"] == key]
        df.loc[part.index, "set"] = split_dataset(part, cfg, rng, test_lists[key])


def _place_groups(df: pd.DataFrame, cfg: Split, rng: np.random.Generator) -> None:
    """The leakage-safe schemes: whole groups per set; a group with an unseen image is test."""
    df.loc[df["leak_group"].isin(df.loc[df["dataset"].isin(cfg.unseen), "leak_group"]), "set"] = "test"
    for key in cfg.datasets:  # a group shared with an unseen or earlier dataset (a copy) is already placed
        part = df[(df["dataset"] == key) & (df["set"] == "")]
        if len(part):
            placed = dict(zip(part["leak_group"], split_dataset(part, cfg, rng)))
            df.loc[df["leak_group"].isin(placed), "set"] = df["leak_group"].map(placed)
    check_no_leakage(df)


def fold_assignment(df: pd.DataFrame, folds: int, seed: int) -> dict[str, int]:
    """``key`` -> fold for the train and val images, whole leakage groups per fold (sorted by key)."""
    pool = df[df["set"].isin(["train", "val"])].sort_values("key")
    splitter = GroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    assignment = {}
    for fold, (_, held_out) in enumerate(splitter.split(pool, groups=pool["leak_group"])):
        assignment.update({k: fold for k in pool["key"].iloc[held_out]})
    return dict(sorted(assignment.items()))


def split_dataset(df: pd.DataFrame, cfg: Split, rng: np.random.Generator,
                  test_ids: list[str] | None = None) -> pd.Series:
    """'train' | 'val' | 'test' per row of one dataset."""
    if cfg.scheme == "pranet":
        if test_ids is None:
            raise ValueError("split.scheme pranet needs the protocol's test lists (split.test_lists)")
        return _split_listed(df, cfg, rng, test_ids)
    if cfg.scheme == "pranet_grouped":
        key = df["dataset"].iloc[0]
        if key not in cfg.pranet_train:
            raise ValueError(f"split.pranet_train has no training size for dataset {key!r}")
        trainval = take_groups(df["leak_group"], min(cfg.pranet_train[key], len(df)), rng)
        in_train = df["leak_group"].isin(trainval)
        val = take_groups(df.loc[in_train, "leak_group"], round(cfg.val_fraction_of_train * in_train.sum()), rng)
        sets = np.where(df["leak_group"].isin(val), "val", np.where(in_train, "train", "test"))
        return pd.Series(sets, index=df.index)
    f_train, f_val = FRACTIONS[cfg.scheme]
    train = take_groups(df["leak_group"], round(f_train * len(df)), rng)
    rest = df.loc[~df["leak_group"].isin(train), "leak_group"]
    val = take_groups(rest, round(f_val * len(df)), rng)
    sets = np.where(df["leak_group"].isin(train), "train", np.where(df["leak_group"].isin(val), "val", "test"))
    return pd.Series(sets, index=df.index)


def _split_listed(df: pd.DataFrame, cfg: Split, rng: np.random.Generator, test_ids: list[str]) -> pd.Series:
    """Scheme ``pranet`` for one dataset: the listed ids are test, validation whole groups of the rest."""
    is_test = df["id"].astype(str).isin(test_ids)
    absent = sorted(set(test_ids) - set(df["id"].astype(str)))
    if absent:
        where = test_list_path(cfg, df["dataset"].iloc[0])
        raise ValueError(f"{where}: {len(absent)} listed test ids are not images of dataset "
                         f"{df['dataset'].iloc[0]!r}: {absent[:5]}")
    val = take_groups(df.loc[~is_test, "leak_group"], round(cfg.val_fraction_of_train * (~is_test).sum()), rng)
    in_val = df["leak_group"].isin(val) & ~is_test
    return pd.Series(np.where(is_test, "test", np.where(in_val, "val", "train")), index=df.index)


def take_groups(groups: pd.Series, target: int, rng: np.random.Generator) -> set[str]:
    """Shuffled whole groups until ``target`` images are covered (never splits a group)."""
    sizes = groups.value_counts()
    order = rng.permutation(sorted(sizes.index))
    chosen, count = set(), 0
    for g in order:
        if count >= target:
            break
        chosen.add(g)
        count += sizes[g]
    return chosen


def test_list_path(cfg: Split, dataset: str) -> Path:
    """``<split.test_lists>/<dataset>_test.txt``; an error when ``split.test_lists`` is not set."""
    if cfg.test_lists is None:
        raise ValueError("split.scheme pranet needs split.test_lists (the folder of <dataset>_test.txt lists)")
    return Path(cfg.test_lists) / f"{dataset}_test.txt"


def read_test_lists(cfg: Split) -> dict[str, list[str]]:
    """The ids of ``<split.test_lists>/<dataset>_test.txt`` (one per line; blank lines and ``#`` comments
    skipped) for every split dataset."""
    lists = {}
    for dataset in cfg.datasets:
        path = test_list_path(cfg, dataset)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the test list of dataset {dataset!r}: {exc}") from exc
        ids = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{path}: lists an id twice: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
        lists[dataset] = ids
    return lists
