"""Split schemes: seeded, leakage-safe train/val/test and k folds, for every scheme."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, placement, unless_present

from polypflow.data.splits import FRACTIONS, make_splits, read_test_lists
from polypflow.settings.config import Split, load_params

pytestmark = pytest.mark.quick

# clinicdb: 120 frames in 16 video sequences of uneven length; kvasir: 200 single frames; colondb: unseen
SEQUENCE_LENGTHS = [3, 12, 5, 8, 10, 4, 12, 6, 9, 7, 11, 5, 8, 10, 6, 4]
SIZES = {"kvasir": 200, "clinicdb": 120, "colondb": 40}
TOLERANCE = max(SEQUENCE_LENGTHS)  # whole groups are taken, so a set may overshoot by up to one group
WITHIN_COPIES = [("kvasir/7", "kvasir/150"), ("clinicdb/2", "clinicdb/70")]  # same image, different groups
SCHEMES = ["70_15_15", "80_10_10", "pranet_grouped"]  # the leakage-safe schemes; pranet (exact lists) below


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
        if scheme == "pranet_grouped":
            trainval = count["train"] + count["val"]
            assert 0 <= trainval - config().pranet_train[dataset] < TOLERANCE
            assert 0 <= count["val"] - round(0.1 * trainval) < TOLERANCE
        else:
            f_train, f_val = FRACTIONS[scheme]
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


def test_pranet_grouped_without_a_training_size_names_the_dataset():
    cfg = Split(scheme="pranet_grouped", datasets=["kvasir", "clinicdb"], folds=3, pranet_train={"kvasir": 150})
    with pytest.raises(ValueError, match="clinicdb"):
        make_splits(facts_frame(), cfg, seed=0)


# --- scheme pranet: the protocol's exact test lists ---------------------------------------------------------

SHARED = REPO.parent / "shared" / "data"
PRANET_LISTS = SHARED / "splits" / "pranet"


def exact_config(lists: Path, datasets: tuple[str, ...] = ("kvasir", "clinicdb")) -> Split:
    return Split(scheme="pranet", datasets=list(datasets), unseen=["colondb"], folds=3, test_lists=lists)


def write_lists(tmp_path: Path, kvasir: list[str], clinicdb: list[str]) -> Path:
    (tmp_path / "kvasir_test.txt").write_text("# a comment\n" + "\n".join(kvasir) + "\n\n")
    (tmp_path / "clinicdb_test.txt").write_text("\n".join(clinicdb) + "\n")
    return tmp_path


def test_pranet_takes_exactly_the_listed_test_images_and_trains_on_the_rest(tmp_path):
    facts = facts_frame()
    cfg = exact_config(write_lists(tmp_path, ["3", "150", "77"], ["1", "2", "40"]))  # clinicdb 1, 2: one sequence
    for seed in range(3):
        splits = make_splits(facts, cfg, seed, read_test_lists(cfg))
        assert splits["test"]["kvasir"] == sorted(["kvasir/3", "kvasir/150", "kvasir/77"])
        assert splits["test"]["clinicdb"] == ["clinicdb/1", "clinicdb/2", "clinicdb/40"]
        assert len(splits["test"]["colondb"]) == SIZES["colondb"]
        assert len(splits["train"]) + len(splits["val"]) == SIZES["kvasir"] + SIZES["clinicdb"] - 6
        assert splits["leakage_safe"] is False
        place = placement(splits)
        assert place["clinicdb/3"] != "test"  # sequence mate of test frames 1, 2: the protocol leaves it in training
        # validation is held out of training by whole sequences, never from test
        trainval = facts[~(facts["dataset"] + "/" + facts["id"]).isin([k for v in splits["test"].values() for k in v])]
        assert_together(trainval, {k: v for k, v in place.items() if v != "test"}, "group")
        for dataset in ("kvasir", "clinicdb"):
            n_val = sum(k.startswith(f"{dataset}/") for k in splits["val"])
            n_trainval = SIZES[dataset] - 3
            assert 0 <= n_val - round(0.1 * n_trainval) < TOLERANCE


def test_pranet_list_errors_name_the_file(tmp_path):
    facts = facts_frame()
    cfg = exact_config(write_lists(tmp_path, ["3", "9999"], ["1"]))
    with pytest.raises(ValueError, match=r"kvasir_test\.txt.*1 listed test ids.*9999"):
        make_splits(facts, cfg, 0, read_test_lists(cfg))
    (tmp_path / "kvasir_test.txt").write_text("3\n3\n")
    with pytest.raises(ValueError, match=r"kvasir_test\.txt: lists an id twice.*'3'"):
        read_test_lists(cfg)
    (tmp_path / "kvasir_test.txt").write_text("3\n")
    with pytest.raises(ValueError, match=r"gamma_test\.txt: cannot read the test list of dataset 'gamma'"):
        read_test_lists(exact_config(tmp_path, ("kvasir", "gamma")))
    with pytest.raises(ValueError, match=r"needs split\.test_lists"):
        read_test_lists(Split(scheme="pranet", datasets=["kvasir"], folds=2))


def real_facts() -> pd.DataFrame:
    """The columns split reads, for the real datasets in ../shared/data (ids are file stems; groups from the
    sequence ranges in params.yaml)."""
    params = load_params(REPO / "params.yaml")
    rows = []
    for key in ("kvasir", "clinicdb", "colondb"):
        spec = params.ingest.datasets[key]
        root = SHARED / spec.source.path.name
        for image in sorted((root / spec.images).iterdir()):
            seq = next((i for i, (a, b) in enumerate(spec.sequences) if image.stem.isdigit() and a <= int(image.stem) <= b), None)
            rows.append((key, image.stem, f"{key}/seq{seq}" if seq is not None else f"{key}/{image.stem}"))
    df = pd.DataFrame(rows, columns=["dataset", "id", "group"])
    df["image_sha256"] = df["dataset"] + "/" + df["id"]
    return df


@unless_present(SHARED.is_dir(), "the real datasets (../shared/data) are not on this machine")
def test_pranet_on_the_real_lists_gives_the_papers_162_test_and_1450_training_images():
    params = load_params(REPO / "params.yaml")
    assert params.split.scheme == "pranet"  # the default profile reports on the papers' protocol
    cfg = params.split.model_copy(update={"test_lists": PRANET_LISTS})
    splits = make_splits(real_facts(), cfg, params.seed, read_test_lists(cfg))
    kvasir = (PRANET_LISTS / "kvasir_test.txt").read_text().split()
    clinicdb = (PRANET_LISTS / "clinicdb_test.txt").read_text().split()
    assert (len(kvasir), len(clinicdb)) == (100, 62)
    assert splits["test"]["kvasir"] == sorted(f"kvasir/{i}" for i in kvasir)
    assert splits["test"]["clinicdb"] == sorted(f"clinicdb/{i}" for i in clinicdb)
    assert len(splits["train"]) + len(splits["val"]) == 1450
    assert sum(k.startswith("kvasir/") for k in splits["train"] + splits["val"]) == 900
    assert len(splits["test"]["colondb"]) == 380


@pytest.mark.parametrize("written, scheme", [("70_15_15", "70_15_15"), ("'80_10_10'", "80_10_10"),
                                             ("pranet_grouped", "pranet_grouped")])
def test_split_scheme_as_a_user_writes_it_in_yaml(tmp_path, written, scheme):
    """Unquoted 70_15_15 is the integer 701515 to YAML (and to `dvc exp run -S split.scheme=70_15_15`)."""
    value = yaml.safe_load(f"scheme: {written}")["scheme"]
    assert Split(scheme=value, datasets=["a"], folds=2).scheme == scheme
