"""A method's deployable graphs beyond the one export@ writes: its int8 graph (quantised by its task from the exported
fp32 graph, calibrated on the images it trained on, checked against fp32 on every test set), the plain network of a
model shipped with test-time augmentation (one pass, same weights: what the augmentation costs and buys), and the
graphs rebuilt at other input sizes (what profile@ times)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from models.tta import plain
from polypflow.settings.config import Params
from polypflow.tasks import task_of
from polypflow.tasks.plan import calibration_batches


def require_parity(graph: Path, diff: float, atol: float) -> None:
    """Refuse the exported ``graph`` whose largest difference to PyTorch, ``diff``, is over ``atol``
    (``export.atol``): an error naming the file."""
    if diff > atol:
        raise RuntimeError(f"{graph}: ONNX differs from PyTorch by {diff:.2e} > export.atol {atol}")


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


def plain_graphs(params: Params, method: str, model: nn.Module, meta: dict, fp32: Path, int8: Path) -> dict[str, Any]:
    """For a model shipped with flip test-time augmentation (:mod:`models.tta`), its plain network, one pass with the
    same weights: the fp32 graph written to ``fp32`` (its parity to PyTorch must stay under ``export.atol``) and
    :func:`int8_check` of it to ``int8``, both scored on every test set like the shipped graphs. A model without
    augmentation writes nothing (``applies: false``): its shipped graphs are its plain network."""
    net = plain(model)
    if net is model:
        fp32.unlink(missing_ok=True)  # graphs of an earlier run must not outlive a model that no longer has TTA
        int8.unlink(missing_ok=True)
        return {"applies": False, "reason": "no test-time augmentation: the shipped graphs are the plain network"}
    diff, _ = task_of(meta["arch"]).export(net.cpu(), meta, fp32, params.export.opset)
    require_parity(fp32, diff, params.export.atol)
    return {"applies": True, "shipped_tta": model.tta, "max_abs_diff": diff,
            **int8_check(params, method, meta, fp32, int8)}


def graphs_by_size(params: Params, method: str, model: nn.Module, meta: dict, sizes: list[int],
                   folder: Path) -> dict[str, dict[int, dict[str, Path]]]:
    """:func:`graphs_at` each of ``sizes`` for the ``shipped`` model and, where it is shipped with test-time
    augmentation, for its ``plain`` network too: graph -> size -> precision -> file, written under ``folder``."""
    bare = plain(model)
    models = {"shipped": model} | ({"plain": bare} if bare is not model else {})
    graphs = {}
    for graph, net in models.items():
        (folder / graph).mkdir(parents=True, exist_ok=True)
        graphs[graph] = {s: graphs_at(params, method, net, meta, s, folder / graph) for s in sizes}
    return graphs
