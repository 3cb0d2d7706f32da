"""The shipped default configuration, built as `dvc repro` builds it: every method of params.yaml's train.methods
with its methods.yaml arguments, which load the offline ImageNet weights (issue 22, item 10: that path was never
built by a test)."""

from __future__ import annotations

import torch
from conftest import REPO

from models import build_model
from models.encoders import OFFLINE_WEIGHTS, offline_state_dict
from polypflow.settings.config import load_params


def test_every_default_method_builds_with_the_packaged_imagenet_weights():
    params = load_params(REPO / "params.yaml")
    stems = {name: offline_state_dict(name)["conv_stem.weight"] for name in OFFLINE_WEIGHTS}
    for method in params.train.methods:
        arch, kwargs = params.method_arch(method)
        torch.manual_seed(0)
        state = build_model(arch, **kwargs).state_dict()
        loaded = [name for name, stem in stems.items()
                  if any(t.shape == stem.shape and torch.equal(t, stem) for t in state.values())]
        assert loaded, f"{method}: no encoder holds the packaged ImageNet weights ({arch}, {kwargs})"
