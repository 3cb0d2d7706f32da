"""A method's deployable graphs beyond the one export@ writes: its int8 graph (quantised by its task from the exported
fp32 graph, calibrated on the images it trained on, checked against fp32 on every test set, image by image), the
plain network of a model shipped with test-time augmentation (one pass, same weights: what the augmentation costs and
buys), and the graphs rebuilt at other input sizes (what profile@ times)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from models.tta import plain
from polypflow.data.images import read_splits
from polypflow.io import write_csv
from polypflow.settings.config import Params
from polypflow.tasks import Task, task_of
from polypflow.tasks.plan import calibration_batches


def require_parity(graph: Path, diff: float, atol: float) -> None:
    """Refuse the exported ``graph`` whose largest difference to PyTorch, ``diff``, is over ``atol``
    (``export.atol``): an error naming the file."""
    if diff > atol:
        raise RuntimeError(f"{graph}: ONNX differs from PyTorch by {diff:.2e} > export.atol {atol}")


def int8_check(params: Params, method: str, meta: dict, fp32: Path, dst: Path, scores: Path) -> dict[str, Any]:
    """Quantise the exported ``fp32`` graph of ``method`` to ``dst`` and score both on every test set by the task's
    per-image score (``score``: a segmenter's Dice, a detector's box F1; ``metric`` says how): per set ``fp32``,
    ``int8`` and their ``drop``; ``within_budget`` when no set drops by more than the task's budget (``max_drop``,
    the setting ``export.<budget>``: ``int8_max_dice_drop``, ``int8_max_f1_drop``). Each image's score by each graph
    goes to the CSV ``scores`` (``dataset``, ``key``, ``fp32``, ``int8``), so the report can pair the graphs with
    other methods image by image. With several ``export.int8_weight_bits``, :func:`choose_int8` picks the graph
    that ships on the validation images (``selection``); the method's ``int8_float_modules`` stay in float32
    (``float_modules``)."""
    task = task_of(meta["arch"])(params)
    for stale in (dst, scores):  # an earlier run's graph and scores must not pass for this one's if it fails half-way
        stale.unlink(missing_ok=True)
    chosen = choose_int8(params, method, task, meta, fp32, dst)
    metric, sets, rows = "", {}, []
    for dataset, keys in read_splits(params)["test"].items():
        if keys:
            metric, per_image = task.graph_scores([fp32, dst], meta, keys)
            before, after = (float(graph.mean()) for graph in per_image)
            sets[dataset] = {"n": len(keys), "fp32": before, "int8": after, "drop": before - after}
            rows.append(pd.DataFrame({"dataset": dataset, "key": keys, "fp32": per_image[0], "int8": per_image[1]}))
    write_csv(scores, pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=SCORE_COLUMNS))
    worst = max((s["drop"] for s in sets.values()), default=0.0)
    budget = getattr(params.export, task.int8_budget)
    bits, kept = chosen["weight_bits"], float_modules(params, method)
    mixed = f"; {', '.join(kept)} in float32" if kept else ""
    check = {"quantised": True, "format": f"QDQ, per-channel int8 weights ({WEIGHT_RANGE[bits]}), uint8 activations "
             f"(static, min/max){mixed}", "weight_bits": bits, "float_modules": kept,
             "calibration_images": params.export.int8_calibration_images,
             "score": task.val_score, "metric": metric, "test_sets": sets, "worst_drop": worst,
             "max_drop": budget, "budget": f"export.{task.int8_budget}", "within_budget": bool(worst <= budget)}
    if "selection" in chosen:
        check["selection"] = chosen["selection"]
    return check


WEIGHT_RANGE = {7: "7-bit range", 8: "full 8-bit range"}
SCORE_COLUMNS = ["dataset", "key", "fp32", "int8"]


def choose_int8(params: Params, method: str, task: Task, meta: dict, fp32: Path, dst: Path) -> dict[str, Any]:
    """Write to ``dst`` the int8 graph of ``fp32`` that ships: the only one of ``export.int8_weight_bits``, or of
    several, the one whose score drops least from the fp32 graph's on the validation images (the first listed on a
    tie; the candidates are quantised in a folder beside ``dst``, so ``dst`` is only ever a finished graph).
    Returns ``weight_bits``, with ``selection`` (each candidate's validation score and drop) where there was a
    choice."""
    candidates, size = params.export.int8_weight_bits, int(meta["image_size"])
    kept = float_modules(params, method)
    if len(candidates) == 1:
        task.quantize(fp32, dst, calibration_batches(params, method, size), candidates[0], kept)
        return {"weight_bits": candidates[0]}
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="int8-candidates-", dir=dst.parent) as folder:
        graphs = {bits: Path(folder) / f"{bits}bit.onnx" for bits in candidates}
        for bits, graph in graphs.items():
            task.quantize(fp32, graph, calibration_batches(params, method, size), bits, kept)
        keys = list(read_splits(params)["val"])
        metric, per_image = task.graph_scores([fp32, *graphs.values()], meta, keys)
        before, *after = (float(graph.mean()) for graph in per_image)
        scored = {bits: {"int8": score, "drop": before - score} for bits, score in zip(graphs, after)}
        best = min(scored, key=lambda bits: scored[bits]["drop"])  # min keeps the first listed on a tie
        os.replace(graphs[best], dst)
    return {"weight_bits": best, "selection": {"on": "validation", "n": len(keys), "metric": metric, "fp32": before,
                                               "candidates": {str(bits): s for bits, s in scored.items()}}}


def float_modules(params: Params, method: str) -> list[str]:
    """The modules of ``method``'s network its int8 graphs keep in float32 (``methods.<method>.int8_float_modules``)."""
    return list(params.methods[method].int8_float_modules)


def exported_weight_bits(check: dict, where: Path) -> int | None:
    """The weight range export@ quantised a graph in, from its ``check.json`` (``check``, read from ``where``);
    None where it did not quantise that graph. An error naming the file for a quantised graph without one."""
    if not check.get("quantised"):
        return None
    if "weight_bits" not in check:
        raise ValueError(f"{where}: a quantised graph without weight_bits (written before they were recorded): "
                         "run export@ again")
    return int(check["weight_bits"])


def graphs_at(params: Params, method: str, model: nn.Module, meta: dict, size: int, folder: Path,
              weight_bits: int | None) -> dict[str, Path]:
    """``method``'s fp32 graph (its task's export) and int8 graph (its task's quantisation in ``weight_bits``,
    calibrated on its training images at ``size``) for input ``size``, written to ``folder``: precision -> file,
    without int8 where ``weight_bits`` is None (export@ did not quantise the graph)."""
    task = task_of(meta["arch"])
    fp32, int8 = folder / f"fp32-{size}px.onnx", folder / f"int8-{size}px.onnx"
    task.export(model.cpu(), {**meta, "image_size": size}, fp32, params.export.opset)  # ONNX Runtime's CPU graphs
    if weight_bits is None:
        return {"fp32": fp32}
    task(params).quantize(fp32, int8, calibration_batches(params, method, size), weight_bits,
                          float_modules(params, method))
    return {"fp32": fp32, "int8": int8}


def plain_graphs(params: Params, method: str, model: nn.Module, meta: dict, fp32: Path, int8: Path,
                 scores: Path) -> dict[str, Any]:
    """For a model shipped with flip test-time augmentation (:mod:`models.tta`), its plain network, one pass with the
    same weights: the fp32 graph written to ``fp32`` (its parity to PyTorch must stay under ``export.atol``) and
    :func:`int8_check` of it to ``int8``, both scored on every test set like the shipped graphs (each image's scores
    in ``scores``). A model without augmentation writes nothing (``applies: false``): its shipped graphs are its
    plain network."""
    net = plain(model)
    if net is model:
        for stale in (fp32, int8, scores):  # what an earlier run wrote must not outlive a model without TTA now
            stale.unlink(missing_ok=True)
        return {"applies": False, "reason": "no test-time augmentation: the shipped graphs are the plain network"}
    diff, _ = task_of(meta["arch"]).export(net.cpu(), meta, fp32, params.export.opset)
    require_parity(fp32, diff, params.export.atol)
    return {"applies": True, "shipped_tta": model.tta, "max_abs_diff": diff,
            **int8_check(params, method, meta, fp32, int8, scores)}


def graphs_by_size(params: Params, method: str, model: nn.Module, meta: dict, sizes: list[int], folder: Path,
                   weight_bits: dict[str, int | None]) -> dict[str, dict[int, dict[str, Path]]]:
    """:func:`graphs_at` each of ``sizes`` for the ``shipped`` model and, where it is shipped with test-time
    augmentation, for its ``plain`` network too, each quantised in its ``weight_bits`` (graph -> bits as export@
    chose them, :func:`exported_weight_bits`): graph -> size -> precision -> file, written under ``folder``."""
    bare = plain(model)
    models = {"shipped": model} | ({"plain": bare} if bare is not model else {})
    graphs = {}
    for graph, net in models.items():
        (folder / graph).mkdir(parents=True, exist_ok=True)
        graphs[graph] = {s: graphs_at(params, method, net, meta, s, folder / graph, weight_bits[graph]) for s in sizes}
    return graphs
