"""Where training and inference run, and whether bf16 autocast pays there."""

from __future__ import annotations

import torch

from polypflow.settings.config import Recipe

CPU = torch.device("cpu")


def resolve_device(setting: str) -> torch.device:
    """The device of ``device:`` in params.yaml (``auto``: CUDA when present); asking for CUDA without one is an
    error that retrying will not fix."""
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("params.yaml asks for device: cuda, but no CUDA device is available")
    return torch.device("cuda" if setting != "cpu" and torch.cuda.is_available() else "cpu")


def bf16_pays(device: torch.device) -> bool:
    """Whether bf16 autocast speeds ``device`` up: always on CUDA, on a CPU only with native bf16 (AVX512-BF16
    or AMX); elsewhere emulated bf16 would be slower than fp32."""
    if device.type == "cuda":
        return True
    native = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in native)


def amp_enabled(recipe: Recipe, device: torch.device) -> bool:
    """bf16 autocast when the recipe asks for AMP and it pays on ``device``; otherwise training stays fp32."""
    return recipe.amp and bf16_pays(device)
