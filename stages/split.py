"""Stage 3, split: seeded, leakage-safe train/val/test splits and k-fold assignments -> ``splits.json``.

Schemes:

- ``pranet``: the PraNet protocol exactly, as the papers report on it: the test images are the ids listed in
  ``<split.test_lists>/<dataset>_test.txt`` (the authors' 100 Kvasir-SEG + 62 CVC-ClinicDB), every other image of those
  datasets is train (900 + 550 = 1450). The protocol is not leakage-safe (ClinicDB test frames have sequence
  mates in train); ``leakage_safe: false`` in splits.json says so and the report shows it.
- ``pranet_grouped``: the protocol's sizes (``split.pranet_train``) with whole video sequences and exact
  duplicates on one side: a leakage-safe variant that no paper reports.
- ``70_15_15`` and ``80_10_10``: train/val/test per dataset, sequences and duplicates kept whole.

In every scheme, validation for epoch selection is ``val_fraction_of_train`` of the training groups (whole
sequences), held out of the training images; the papers select on test. Images are grouped before splitting:
frames of one video sequence (``ingest.datasets.*.sequences``) and exact duplicates (same sha256, in any
dataset) share a group. ``split.unseen`` datasets are test-only. Folds (GroupKFold) cover train + val, so
cross-validation never sees a test image.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold

from polypflow import tracking
from polypflow.config import Params, Split
from polypflow.io import write_json
from polypflow.data import image_keys
from stages._cli import main, parser, project_params

log = logging.getLogger(__name__)

FRACTIONS = {"70_15_15": (0.70, 0.15), "80_10_10": (0.80, 0.10)}


def leakage_groups(df: pd.DataFrame) -> pd.Series:
    """One label per image such that sequence mates and exact duplicates share it (union-find)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, members in df.groupby("image_sha256")["group"]:
        roots = sorted({find(g) for g in members})  # the smallest label names a merged group: row order is irrelevant
        for other in roots[1:]:
            parent[other] = roots[0]
    return df["group"].map(find)


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


def split_dataset(df: pd.DataFrame, cfg: Split, rng: np.random.Generator, test_ids: list[str] | None = None) -> pd.Series:
    """'train' | 'val' | 'test' per row of one dataset."""
    n = len(df)
    if cfg.scheme == "pranet":
        is_test = df["id"].astype(str).isin(test_ids)
        absent = sorted(set(test_ids) - set(df["id"].astype(str)))
        if absent:
            where = test_list_path(cfg, df["dataset"].iloc[0])
            raise ValueError(f"{where}: {len(absent)} listed test ids are not images of dataset "
                             f"{df['dataset'].iloc[0]!r}: {absent[:5]}")
        val = take_groups(df.loc[~is_test, "leak_group"], round(cfg.val_fraction_of_train * (~is_test).sum()), rng)
        in_val = df["leak_group"].isin(val) & ~is_test
        return pd.Series(np.where(is_test, "test", np.where(in_val, "val", "train")), index=df.index)
    if cfg.scheme == "pranet_grouped":
        key = df["dataset"].iloc[0]
        if key not in cfg.pranet_train:
            raise ValueError(f"split.pranet_train has no training size for dataset {key!r}")
        n_train = min(cfg.pranet_train[key], n)
        trainval = take_groups(df["leak_group"], n_train, rng)
        in_train = df["leak_group"].isin(trainval)
        val = take_groups(df.loc[in_train, "leak_group"], round(cfg.val_fraction_of_train * in_train.sum()), rng)
        return pd.Series(np.where(df["leak_group"].isin(val), "val", np.where(in_train, "train", "test")), index=df.index)
    f_train, f_val = FRACTIONS[cfg.scheme]
    train = take_groups(df["leak_group"], round(f_train * n), rng)
    rest = df.loc[~df["leak_group"].isin(train), "leak_group"]
    val = take_groups(rest, round(f_val * n), rng)
    return pd.Series(np.where(df["leak_group"].isin(train), "train", np.where(df["leak_group"].isin(val), "val", "test")), index=df.index)


def make_splits(facts: pd.DataFrame, cfg: Split, seed: int, test_lists: dict[str, list[str]] | None = None) -> dict:
    """The splits document: sets of ``dataset/id`` keys, per-dataset test sets, fold assignments.

    ``test_lists`` (scheme ``pranet``): each dataset's listed test ids, as :func:`read_test_lists` reads them."""
    df = facts[facts["dataset"].isin([*cfg.datasets, *cfg.unseen])].copy()
    df["key"] = image_keys(df)
    df["leak_group"] = leakage_groups(df)
    rng = np.random.default_rng(seed)
    df["set"] = ""
    df.loc[df["dataset"].isin(cfg.unseen), "set"] = "test"
    exact = cfg.scheme == "pranet"
    if exact:  # the protocol's own lists decide; sequence mates and copies may straddle sets, as in the papers
        if test_lists is None:
            raise ValueError("split.scheme pranet needs the protocol's test lists (split.test_lists)")
        for key in cfg.datasets:
            part = df[df["dataset"] == key]
            df.loc[part.index, "set"] = split_dataset(part, cfg, rng, test_lists[key])
    else:
        df.loc[df["leak_group"].isin(df.loc[df["dataset"].isin(cfg.unseen), "leak_group"]), "set"] = "test"
        for key in cfg.datasets:  # a group shared with an unseen or earlier dataset (a copy) is already placed
            part = df[(df["dataset"] == key) & (df["set"] == "")]
            if len(part):
                placed = dict(zip(part["leak_group"], split_dataset(part, cfg, rng)))
                df.loc[df["leak_group"].isin(placed), "set"] = df["leak_group"].map(placed)
        check_no_leakage(df)
    pool = df[df["set"].isin(["train", "val"])].sort_values("key")
    folds = GroupKFold(n_splits=cfg.folds, shuffle=True, random_state=seed)
    assignment = {}
    for fold, (_, held_out) in enumerate(folds.split(pool, groups=pool["leak_group"])):
        assignment.update({k: fold for k in pool["key"].iloc[held_out]})
    test = df[df["set"] == "test"]
    return {
        "scheme": cfg.scheme, "seed": seed, "leakage_safe": not exact,
        "train": sorted(df.loc[df["set"] == "train", "key"]),
        "val": sorted(df.loc[df["set"] == "val", "key"]),
        "test": {d: sorted(test.loc[test["dataset"] == d, "key"]) for d in [*cfg.datasets, *cfg.unseen]},
        "unseen": list(cfg.unseen),
        "folds": {"k": cfg.folds, "assignment": dict(sorted(assignment.items()))},
    }


def check_no_leakage(df: pd.DataFrame) -> None:
    """Raise if one leakage group or one image hash sits in more than one of train/val/test."""
    for column in ("leak_group", "image_sha256"):
        spread = df.groupby(column)["set"].nunique()
        if (spread > 1).any():
            raise ValueError(f"split leaks {column} across sets: {list(spread[spread > 1].index[:5])}")


def log_to_mlflow(params: Params, splits: dict) -> None:
    import mlflow

    with tracking.stage_run(params, "split"):
        mlflow.log_params({"scheme": params.split.scheme, "seed": params.seed, "folds": params.split.folds,
                           "datasets": ",".join(params.split.datasets), "unseen": ",".join(params.split.unseen)})
        mlflow.log_metrics({"train": len(splits["train"]), "val": len(splits["val"]),
                            **{f"test.{k}": len(v) for k, v in splits["test"].items()}})
        mlflow.log_artifact(str(params.paths.splits))


def run(params: Params) -> dict:
    """Read the validated facts and write ``paths.splits``."""
    facts = pd.read_csv(params.paths.facts, keep_default_na=False, dtype={"id": str})
    lists = read_test_lists(params.split) if params.split.scheme == "pranet" else None
    splits = make_splits(facts, params.split, params.seed, lists)
    write_json(params.paths.splits, splits)
    log_to_mlflow(params, splits)
    log.info("%s: train %d, val %d, test %s", params.split.scheme, len(splits["train"]), len(splits["val"]),
             {k: len(v) for k, v in splits["test"].items()})
    return splits


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    main(lambda: run(project_params(args.params)))
