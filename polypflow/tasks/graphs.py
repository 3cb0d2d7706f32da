"""A method's deployable graphs beyond the one export@ writes: its int8 graph (quantised by its task from the exported
fp32 graph, calibrated on the images it trained on, checked against fp32 on every test set), and both graphs rebuilt
at other input sizes (what profile@ times)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from polypflow.settings.config import Params
from polypflow.tasks import task_of
from polypflow.tasks.plan import calibration_batches


def int8_check(params: Params, method: str, meta: dict, fp32: Path, dst: Path) -> dict[str, Any]:
    """Quantise the exported ``fp32`` graph of ``method`` to ``dst`` and score both on every test set: per set
    ``fp32``, ``int8`` and their ``drop``; ``within_budget`` when no set drops by more than
    ``export.int8_max_dice_drop``. A task that does not quantise writes nothing and says why (``reason``)."""
    task = task_of(meta["arch"])(params)
    dst.unlink(missing_ok=True)  # a graph of an earlier run must not outlive a task that now declines
    reason = task.quantize(fp32, dst, calibration_batches(params, method, int(meta["image_size"])))
    if reason:
        return {"quantised": False, "reason": reason}
    scores = task.int8_scores(fp32, dst, meta)
    for scored in scores["test_sets"].values():
        scored["drop"] = scored["fp32"] - scored["int8"]
    worst = max((s["drop"] for s in scores["test_sets"].values()), default=0.0)
    budget = params.export.int8_max_dice_drop
    bits = "7-bit range" if params.export.int8_reduce_range else "full range"
    return {"quantised": True, "format": f"QDQ, per-channel int8 weights ({bits}), uint8 activations (static, min/max)",
            "calibration_images": params.export.int8_calibration_images, **scores, "worst_drop": worst,
            "max_drop": budget, "within_budget": bool(worst <= budget)}


def graphs_at(params: Params, method: str, model: nn.Module, meta: dict, size: int, folder: Path) -> dict[str, Path]:
    """``method``'s fp32 graph (its task's export) and int8 graph (its task's quantisation, calibrated on its
    training images at ``size``) for input ``size``, written to ``folder``: precision -> file, without int8 where the
    task does not quantise."""
    task = task_of(meta["arch"])
    fp32, int8 = folder / f"fp32-{size}px.onnx", folder / f"int8-{size}px.onnx"
    task.export(model.cpu(), {**meta, "image_size": size}, fp32, params.export.opset)  # ONNX Runtime's CPU graphs
    declined = task(params).quantize(fp32, int8, calibration_batches(params, method, size))
    return {"fp32": fp32} if declined else {"fp32": fp32, "int8": int8}
