"""Stage split: seeded, leakage-safe train/val/test and k folds, for every scheme."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import synthetic_params, write_params

from polypflow.config import Split, load_params
from stages import ingest, split, validate
from stages.split import check_no_leakage, make_splits

# clinicdb: 120 frames in 16 video sequences of uneven length; kvasir: 200 single frames; colondb: unseen
SEQUENCE_LENGTHS = [3, 12, 5, 8, 10, 4, 12, 6, 9, 7, 11, 5, 8, 10, 6, 4]
SIZES = {"kvasir": 200, "clinicdb": 120, "colondb": 40}
TOLERANCE = max(SEQUENCE_LENGTHS)  # whole groups are taken, so a set may overshoot by up to one group
WITHIN_COPIES = [("kvasir/7", "kvasir/150"), ("clinicdb/2", "clinicdb/70")]  # same image, different groups
SCHEMES = ["70_15_15", "80_10_10", "pranet"]


def facts_frame(copies: list[tuple[str, str]] = WITHIN_COPIES) -> pd.DataFrame:
    """The columns split reads; ``copies``: (original, copy) keys whose image bytes are identical."""
    rows = [("kvasir", str(i), f"kvasir/{i}") for i in range(1, SIZES["kvasir"] + 1)]
    first = 1
    for seq, length in enumerate(SEQUENCE_LENGTHS, 1):
        rows += [("clinicdb", str(f), f"clinicdb/seq{seq}") for f in range(first, first + length)]
        first += length
    rows += [("colondb", str(i), f"colondb/seq{(i - 1) // 5 + 1}") for i in range(1, SIZES["colondb"] + 1)]
    df = pd.DataFrame(rows, columns=["dataset", "id", "group"])
    keys = df["dataset"] + "/" + df["id"]
    df["image_sha256"] = [hashlib.sha256(k.encode()).hexdigest() for k in keys]
    for original, copy in copies:
        df.loc[keys == copy, "image_sha256"] = df.loc[keys == original, "image_sha256"].item()
    return df


def config(scheme: str = "70_15_15", folds: int = 3) -> Split:
    return Split(scheme=scheme, datasets=["kvasir", "clinicdb"], unseen=["colondb"], folds=folds,
                 pranet_train={"kvasir": 150, "clinicdb": 90})


def placement(splits: dict) -> dict[str, str]:
    """key -> 'train' | 'val' | 'test'; fails if a key is listed twice."""
    listed = [(k, "train") for k in splits["train"]] + [(k, "val") for k in splits["val"]]
    listed += [(k, "test") for keys in splits["test"].values() for k in keys]
    place = dict(listed)
    assert len(place) == len(listed), "an image sits in more than one set"
    return place


def assert_together(facts: pd.DataFrame, where: dict[str, object], column: str) -> None:
    """Every image sharing ``column`` (a group or a hash) has one and the same ``where`` value."""
    keys = facts["dataset"] + "/" + facts["id"]
    for label, members in keys[keys.isin(where)].groupby(facts[column]):
        assert len({where[k] for k in members}) == 1, f"{column} {label} straddles: {sorted(members)}"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sets_partition_every_image_at_the_scheme_sizes(scheme):
    facts = facts_frame()
    splits = make_splits(facts, config(scheme), seed=1)
    place = placement(splits)
    assert sorted(place) == sorted(facts["dataset"] + "/" + facts["id"])
    assert sorted(splits["test"]) == ["clinicdb", "colondb", "kvasir"]
    for dataset in ("kvasir", "clinicdb"):
        n = SIZES[dataset]
        sets = pd.Series({k: v for k, v in place.items() if k.startswith(f"{dataset}/")})
        count = {s: int((sets == s).sum()) for s in ("train", "val")}
        if scheme == "pranet":
            trainval = count["train"] + count["val"]
            assert 0 <= trainval - config().pranet_train[dataset] < TOLERANCE
            assert 0 <= count["val"] - round(0.1 * trainval) < TOLERANCE
        else:
            f_train, f_val = split.FRACTIONS[scheme]
            assert abs(count["train"] - f_train * n) <= TOLERANCE
            assert abs(count["val"] - f_val * n) <= TOLERANCE
        assert len(splits["test"][dataset]) == n - count["train"] - count["val"] > 0


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("seed", range(4))
def test_sequences_and_exact_duplicates_never_straddle_sets(scheme, seed):
    facts = facts_frame()
    place = placement(make_splits(facts, config(scheme), seed))
    assert_together(facts, place, "group")
    assert_together(facts, place, "image_sha256")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("seed", range(4))
def test_duplicates_across_datasets_stay_together(scheme, seed):
    """validate may tolerate copies across datasets (max_duplicates_across); split must still not leak them."""
    copies = [*WITHIN_COPIES, ("kvasir/3", "clinicdb/50"), ("colondb/1", "kvasir/9")]
    facts = facts_frame(copies)
    place = placement(make_splits(facts, config(scheme), seed))
    assert_together(facts, place, "image_sha256")
    assert place["kvasir/9"] == "test"  # a copy of an unseen (test-only) image cannot be trained on


@pytest.mark.parametrize("scheme", SCHEMES)
def test_unseen_datasets_are_test_only(scheme):
    splits = make_splits(facts_frame(), config(scheme), seed=3)
    unseen = [f"colondb/{i}" for i in range(1, SIZES["colondb"] + 1)]
    assert sorted(splits["test"]["colondb"]) == sorted(unseen)
    assert splits["unseen"] == ["colondb"]
    trained = {*splits["train"], *splits["val"], *splits["folds"]["assignment"]}
    assert not any(k.startswith("colondb/") for k in trained)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_cover_train_and_val_and_keep_groups_whole(k):
    facts = facts_frame()
    splits = make_splits(facts, config("70_15_15", folds=k), seed=0)
    folds = splits["folds"]
    assert folds["k"] == k
    assert set(folds["assignment"]) == {*splits["train"], *splits["val"]}
    sizes = pd.Series(folds["assignment"]).value_counts()
    assert sorted(sizes.index) == list(range(k))
    assert sizes.min() >= 0.5 * sizes.mean()  # GroupKFold(shuffle=True) deals out groups, not images
    assert_together(facts, folds["assignment"], "group")
    assert_together(facts, folds["assignment"], "image_sha256")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_same_splits_other_seed_different(scheme):
    facts = facts_frame()
    first = make_splits(facts, config(scheme), seed=7)
    for shuffle in range(8):  # the facts' row order is irrelevant
        assert make_splits(facts.sample(frac=1, random_state=shuffle), config(scheme), seed=7) == first
    other = make_splits(facts, config(scheme), seed=8)
    assert other["train"] != first["train"]
    assert other["folds"]["assignment"] != first["folds"]["assignment"]


def test_pranet_without_a_training_size_names_the_dataset():
    cfg = Split(scheme="pranet", datasets=["kvasir", "clinicdb"], folds=3, pranet_train={"kvasir": 150})
    with pytest.raises(ValueError, match="clinicdb"):
        make_splits(facts_frame(), cfg, seed=0)


def leaky_frame(**changes: str) -> pd.DataFrame:
    df = pd.DataFrame({"leak_group": ["a", "a", "b", "c"], "image_sha256": ["h1", "h2", "h3", "h4"],
                       "set": ["train", "train", "val", "test"]})
    for column, value in changes.items():
        df.loc[3, column] = value
    return df


def test_check_no_leakage_raises_on_a_leaky_frame():
    check_no_leakage(leaky_frame())  # clean: no error
    with pytest.raises(ValueError, match=r"leak_group.*\['a'\]"):
        check_no_leakage(leaky_frame(leak_group="a"))  # a group member in test, the rest in train
    with pytest.raises(ValueError, match=r"image_sha256.*\['h3'\]"):
        check_no_leakage(leaky_frame(image_sha256="h3"))  # the same image in val and in test


def test_run_writes_splits_json_from_validated_facts(tmp_path, synthetic_root, monkeypatch):
    write_params(tmp_path, synthetic_params(synthetic_root))  # alpha + beta split 70/15/15, gamma unseen
    monkeypatch.chdir(tmp_path)
    params = load_params("params.yaml")
    ingest.run(params)
    validate.run(params)
    splits = split.run(params)
    assert json.loads(Path("data/splits.json").read_text()) == splits
    place = placement(splits)
    assert len(place) == 24 + 16 + 10
    assert splits["test"]["gamma"] == sorted(f"gamma/{i}" for i in range(1, 11))
    beta_seq = {f"beta/{i}": (i - 1) // 4 for i in range(1, 17)}  # 4 sequences of 4 frames
    for seq in range(4):
        assert len({place[k] for k, s in beta_seq.items() if s == seq}) == 1
    assert set(splits["folds"]["assignment"].values()) == {0, 1}
