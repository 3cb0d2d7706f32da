"""params.yaml -> frozen, strict settings: the repository's file loads; unknown keys, wrong types and
dangling method names are errors naming the file and the key; recipes merge defaults < method < extra."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from polypflow.settings.config import SETTINGS_FILES, Params, ParamsError, Recipe, load_params, read_settings
from tests.conftest import REPO

pytestmark = pytest.mark.quick

BASE = read_settings(REPO / "params.yaml")[0]  # params.yaml and the settings files beside it, merged


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


@pytest.mark.parametrize("profile", sorted(p.stem for p in (REPO / "profiles").glob("*.yaml")))
def test_every_profile_over_the_repository_settings_loads(profile):
    """Every profile (an overlay) gives valid settings, and every method it trains has its builder's arguments."""
    from models import check_kwargs
    from polypflow.settings.profiles import deep_merge, read_profile

    params = Params.model_validate(deep_merge(BASE, read_profile(REPO / "profiles", profile)))
    for method in params.train.methods:
        params.recipe(method)
        check_kwargs(*params.method_arch(method), where=f"{profile}: methods.{method}.model")


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
    ({"export__int8_weight_bits": [6]}, "export.int8_weight_bits"),
    ({"export__int8_weight_bits": []}, "export.int8_weight_bits"),
    ({"export__int8_weight_bits": [8, 8]}, "export.int8_weight_bits"),
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


def test_settings_files_are_the_ones_dvc_reads():
    """dvc.yaml templates with the same files load_params merges (its `vars`, beside params.yaml)."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert dvc["vars"] == list(SETTINGS_FILES)
    data, origin = read_settings(REPO / "params.yaml")
    for name, keys in SETTINGS_FILES.items():
        assert {k for k, f in origin.items() if f.name == name} == set(keys), name


def test_a_key_in_two_settings_files_names_both(tmp_path):
    write(tmp_path, BASE)  # everything in params.yaml: allowed when no file beside it
    assert load_params(tmp_path / "params.yaml").seed == BASE["seed"]
    (tmp_path / "infra.yaml").write_text(yaml.safe_dump({"tracking": BASE["tracking"]}))
    with pytest.raises(ParamsError, match=r"infra\.yaml: key 'tracking' is also set in .*params\.yaml"):
        load_params(tmp_path / "params.yaml")


def test_an_error_names_the_settings_file_holding_the_key(tmp_path):
    from polypflow.settings.config import split_settings

    data = edited(methods__unet__recipe={"lr": -1})
    for name, part in split_settings(data).items():
        (tmp_path / name).write_text(yaml.safe_dump(part))
    with pytest.raises(ParamsError, match=r"methods\.unet\.recipe\.lr"):
        load_params(tmp_path / "params.yaml")
    data = edited(schedule__retries="many")
    for name, part in split_settings(data).items():
        (tmp_path / name).write_text(yaml.safe_dump(part))
    with pytest.raises(ParamsError, match=r"infra\.yaml: schedule\.retries"):
        load_params(tmp_path / "params.yaml")
