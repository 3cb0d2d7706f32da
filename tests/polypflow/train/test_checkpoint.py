"""Checkpoints: foreign files refused naming them, the trained-model round trip (weights_only loads)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from models import build_model, method_entry
from polypflow.tasks.segmentation import predict_probs
from polypflow.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, load_trained, save_trained
from tests.conftest import make_pair

CPU = torch.device("cpu")


def tiny_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("unet", **{**method_entry("unet").test_kwargs, "pretrained": "none"})


class Foreign:
    """Any pickled object that is not a checkpoint of ours."""


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["pickled_object", "torch_saved_object", "plain_state_dict",
                                  "wrong_format_tag", "tensor", "random_bytes", "empty"])
@pytest.mark.quick
def test_foreign_checkpoint_is_refused_naming_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "pickled_object":
        path.write_bytes(pickle.dumps(Foreign()))
    elif kind == "torch_saved_object":
        torch.save({"format": CHECKPOINT_FORMAT, "payload": Foreign()}, path)
    elif kind == "plain_state_dict":
        torch.save(nn.Linear(2, 2).state_dict(), path)
    elif kind == "wrong_format_tag":
        torch.save({"format": "someone-else-v1", "model": {}}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError, match=str(path)):
        load_checkpoint(path)


@pytest.mark.quick
def test_save_and_load_trained_round_trip(tmp_path):
    model = tiny_unet(seed=3).eval()
    kwargs = dict(method_entry("unet").test_kwargs)
    save_trained(tmp_path / "model.pt", model, arch="unet", model_kwargs=kwargs, threshold=0.35, image_size=64)
    loaded, meta = load_trained(tmp_path / "model.pt")
    assert meta["threshold"] == 0.35 and meta["image_size"] == 64 and "state_dict" not in meta
    assert not loaded.training
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])
    images = np.stack([np.asarray(make_pair(s)[0]) for s in range(200, 204)])
    probs = predict_probs(loaded, images, "imagenet", CPU)
    np.testing.assert_array_equal(probs, predict_probs(model, images, "imagenet", CPU))


@pytest.mark.quick
def test_a_checkpoint_set_aside_is_taken_back_when_its_settings_return(tmp_path):
    """Recipe A trained; recipe B set A aside and was killed before its first epoch; back to A: A resumes, nothing
    of A is deleted (issue 22, item 3)."""
    from polypflow.train.checkpoint import save_checkpoint, set_aside_foreign

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, epoch=4, fingerprint="aaaa")
    assert set_aside_foreign(path, "bbbb") == [tmp_path / "checkpoint.pt.other-aaaa"]  # B's run: A kept aside
    assert not path.exists()  # B was killed before its first epoch: no checkpoint of B
    assert set_aside_foreign(path, "aaaa") == []  # A's settings again
    assert load_checkpoint(path)["epoch"] == 4 and load_checkpoint(path)["fingerprint"] == "aaaa"
    assert set_aside_foreign(path, "bbbb") == [tmp_path / "checkpoint.pt.other-aaaa"]  # B again: A aside again
    save_checkpoint(path, epoch=0, fingerprint="bbbb")  # B's first epoch
    assert set_aside_foreign(path, "bbbb") == [tmp_path / "checkpoint.pt.other-aaaa"]  # B resumes B, A still kept
    assert load_checkpoint(path)["fingerprint"] == "bbbb"
