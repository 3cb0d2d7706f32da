"""Where training and inference run: bf16 autocast only where it pays, CUDA only when present."""

from __future__ import annotations

import pytest
import torch

from polypflow.infer.device import CPU, amp_enabled, resolve_device
from polypflow.settings.config import Recipe, load_params
from tests.conftest import REPO


def recipe(**overrides) -> Recipe:
    return load_params(REPO / "params.yaml").train.defaults.model_copy(update=overrides)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, True), (False, True, True), (False, False, False)])
@pytest.mark.quick
def test_cpu_amp_only_with_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert amp_enabled(recipe(amp=True), CPU) is expected
    assert amp_enabled(recipe(amp=False), CPU) is False
    assert amp_enabled(recipe(amp=True), torch.device("cuda")) is True


@pytest.mark.quick
def test_cuda_without_a_cuda_device_is_a_settings_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device: cuda, but no CUDA device is available"):
        resolve_device("cuda")
    assert resolve_device("auto") == resolve_device("cpu") == CPU
