"""Stage settings' checks (issue 22, items 1, 2, 8): every setting a stage would refuse, refused first, naming it."""

from __future__ import annotations

import pytest
from conftest import synthetic_params

from polypflow.settings.config import Params, ParamsError
from polypflow.tasks.plan import check_settings
from polypflow.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.quick


def params_with(synthetic_root, edit) -> Params:
    raw = synthetic_params(synthetic_root)
    edit(raw)
    return Params.model_validate(raw)


def test_good_settings_pass_and_name_the_methods_checked(synthetic_root):
    params = params_with(synthetic_root, lambda raw: None)
    assert set(check_settings(params)) == {*params.train.methods, params.crossval.method}


def test_modules_kept_in_float32_pass_where_the_network_has_them(synthetic_root):
    edit = lambda raw: raw["methods"]["unet"].update(int8_float_modules=["net.encoder.model.conv_stem"])  # noqa: E731
    assert check_settings(params_with(synthetic_root, edit)) == ["unet"]


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw["methods"][raw["train"]["methods"][0]].setdefault("model", {}).update(encoder_nmae="x"),
     r"methods\.\w+\.model: unknown argument\(s\) \['encoder_nmae'\]"),
    (lambda raw: raw["methods"][raw["train"]["methods"][0]].setdefault("recipe", {}).update(loss="dicee"),
     r"methods\.\w+.*dicee"),
    (lambda raw: raw["split"].update(scheme="pranet", test_lists="/nowhere/lists"),
     r"split\.test_lists: /nowhere/lists: no such folder"),
    (lambda raw: raw["methods"]["unet"].update(int8_float_modules=["net.encoder.model.conv_stem", "encoder.blocks.0"]),
     r"methods\.unet\.int8_float_modules: \['encoder\.blocks\.0'\] name no module .*top-level modules: net"),
    (lambda raw: raw["methods"]["unet"].update(int8_float_modules=["net.encoder.model.bn1.act"]),  # no parameters
     r"methods\.unet\.int8_float_modules: \['net\.encoder\.model\.bn1\.act'\] name no module with parameters"),
])
def test_a_setting_no_stage_could_use_is_refused_naming_it(synthetic_root, edit, message):
    with pytest.raises((ValueError, ParamsError), match=message):
        check_settings(params_with(synthetic_root, edit))


def test_an_unknown_method_lists_the_configured_ones(synthetic_root):
    with pytest.raises(ValueError, match=r"absent from methods: \(configured: .*unet"):
        params_with(synthetic_root, lambda raw: raw["train"]["methods"].append("unte"))


def test_a_truncated_checkpoint_says_what_to_do(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"checkpoint\.pt: not a loadable .*delete it and run `dvc repro`"):
        load_checkpoint(path)


def test_cuda_without_a_gpu_is_a_setting_to_fix(synthetic_root):
    """A ValueError: stages._cli ends it with "retrying will not help", so a flow does not retry it (item 8)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device: cuda, but no CUDA device"):
        check_settings(params_with(synthetic_root, lambda raw: raw.update(device="cuda")))
