"""params.yaml -> frozen, strict settings: the repository's file loads; unknown keys, wrong types and
dangling method names are errors naming the file and the key; recipes merge defaults < method < extra."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from polypflow.config import Params, ParamsError, Recipe, load_params
from tests.conftest import REPO

BASE = yaml.safe_load((REPO / "params.yaml").read_text())


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def edited(**changes) -> dict:
    """The repository's params with dotted-path ``changes`` (``None`` value: delete the key)."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    return data


def test_repository_params_load():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.train.methods and all(m in params.methods for m in params.train.methods)
    assert params.validate_.mask_threshold == BASE["validate"]["mask_threshold"]
    for method in params.methods:
        assert isinstance(params.recipe(method), Recipe)
    with pytest.raises(ValidationError):  # frozen
        params.seed = 1


def test_paper_profile_applied_to_repository_params_loads(tmp_path):
    """Every recipe override of the paper profile is checked at load time, so it must load cleanly."""
    from polypflow.profiles import apply

    profile = REPO / "profiles" / "paper.yaml"
    if not profile.exists():
        pytest.skip("no paper profile in this checkout")
    target = write(tmp_path, BASE)
    apply(profile, target)
    params = load_params(target)
    for method in params.train.methods:
        params.recipe(method)


@pytest.mark.parametrize(("changes", "key_path"), [
    ({"seeed": 1}, "seeed"),
    ({"paths__rawdata": "x"}, "paths.rawdata"),
    ({"train__defaults__epoch": 3}, "train.defaults.epoch"),
    ({"ingest__datasets__kvasir__url": "x"}, "ingest.datasets.kvasir.url"),
    ({"methods__unet__modell": {}}, "methods.unet.modell"),
    ({"validate__treshold": 1}, "validate.treshold"),
])
def test_unknown_key_names_file_and_key_path(tmp_path, changes, key_path):
    path = write(tmp_path, edited(**changes))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert str(path) in message and key_path in message and "Extra inputs are not permitted" in message


@pytest.mark.parametrize(("changes", "key_path"), [
    ({"methods__unet__recipe": {"epoch": 3}}, "methods.unet.recipe.epoch"),
    ({"methods__unet__recipe": {"lr": "fast"}}, "methods.unet.recipe.lr"),
    ({"crossval__recipe": {"epochs": 2, "image_sise": 96}}, "crossval.recipe.image_sise"),
])
def test_bad_recipe_override_names_file_and_key_path(tmp_path, changes, key_path):
    """Recipe overrides are free-form dicts in the schema; they must still be checked at load time."""
    path = write(tmp_path, edited(**changes))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value) and key_path in str(info.value)


def test_recipe_rejects_unknown_extra_key():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(ValueError, match="epoch"):
        params.recipe("unet", {"epoch": 3})
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        params.recipe("nope")


@pytest.mark.parametrize(("changes", "key_path"), [
    ({"seed": "forty-two"}, "seed"),
    ({"device": "gpu"}, "device"),
    ({"train__defaults__epochs": "many"}, "train.defaults.epochs"),
    ({"train__defaults__epochs": 0}, "train.defaults.epochs"),
    ({"train__defaults__lr": -1.0}, "train.defaults.lr"),
    ({"train__defaults__optimizer": "lion"}, "train.defaults.optimizer"),
    ({"train__methods": "unet"}, "train.methods"),
    ({"validate__mask_threshold": 300}, "validate.mask_threshold"),
    ({"split__scheme": "50_50"}, "split.scheme"),
    ({"evaluate__threshold": 1.5}, "evaluate.threshold"),
    ({"ingest__datasets__kvasir__source": {"kind": "url", "url": "http://x", "sha256": "abc"}},
     "ingest.datasets.kvasir.source.url.sha256"),
    ({"export__opset": None}, "export.opset"),
])
def test_wrong_type_or_value_names_file_and_key(tmp_path, changes, key_path):
    path = write(tmp_path, edited(**changes))
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert str(path) in str(info.value) and key_path in str(info.value)


def test_train_method_absent_from_methods(tmp_path):
    path = write(tmp_path, edited(train__methods=["unet", "pranet_typo"]))
    with pytest.raises(ParamsError, match="pranet_typo") as info:
        load_params(path)
    assert str(path) in str(info.value) and "methods" in str(info.value)


def test_report_pair_absent_from_methods(tmp_path):
    path = write(tmp_path, edited(report__pairs=[["unet_if", "unet"], ["unet", "unet_typo"]]))
    with pytest.raises(ParamsError, match=r"report.pairs names \['unet_typo'\]"):
        load_params(path)


def test_crossval_method_absent_from_methods(tmp_path):
    with pytest.raises(ParamsError, match="ghost"):
        load_params(write(tmp_path, edited(crossval__method="ghost")))


def test_split_dataset_absent_from_ingest(tmp_path):
    with pytest.raises(ParamsError, match="etis"):
        load_params(write(tmp_path, edited(split__unseen=["etis"])))


@pytest.mark.parametrize("content", ["", "seed: [1\n", "- a list\n"])
def test_unreadable_or_empty_file(tmp_path, content):
    path = tmp_path / "params.yaml"
    path.write_text(content)
    with pytest.raises(ParamsError, match=str(path)):
        load_params(path)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="cannot read"):
        load_params(tmp_path / "absent.yaml")


def test_recipe_merge_order_defaults_method_extra(tmp_path):
    data = edited(methods__unet__recipe={"epochs": 9, "lr": 5e-4})
    data["methods"]["other"] = {"arch": "unet", "recipe": {"loss": "structure"}}
    params = load_params(write(tmp_path, data))
    defaults = params.train.defaults

    method = params.recipe("unet")
    assert (method.epochs, method.lr) == (9, 5e-4)  # method beats defaults
    assert method.batch_size == defaults.batch_size  # untouched keys come from defaults

    extra = params.recipe("unet", {"epochs": 2, "batch_size": 3})
    assert (extra.epochs, extra.batch_size, extra.lr) == (2, 3, 5e-4)  # extra beats method and defaults

    other = params.recipe("other")
    assert other.loss == "structure" and other.epochs == defaults.epochs and other.lr == defaults.lr
    assert params.methods["other"].arch == "unet"
    assert params.train.defaults == defaults  # merging does not touch the defaults
