"""Segmentation: a polyp mask per image (every method of the registry but the detectors).

Trains on (image, mask) with the recipe's loss (``polypflow.train.losses``), selects epochs on validation Dice
(at the grid's best threshold when the recipe searches its threshold, as CRIS does), ships the threshold it was
selected with, and is scored per test set by Dice/IoU at 0.5 and at its threshold, the toolbox's metrics
(``polypflow.evaluate.seg_metrics``) and, when ``detection.mask_boxes``, its mask's components as boxes (COCO AP
against the masks' own boxes: the baseline a dedicated detector must beat). Cases are drawn as overlays; Grad-CAM
panels explain the first test images.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy.special import expit, logit
import torch
import torch.nn.functional as F
from torch import nn

from models.tta import VIEWS, FlipTTA, in_view, plain, with_temperature
from polypflow.data.images import ImageSet, SegDataset, load_image_set, read_facts, read_image, read_mask
from polypflow.evaluate.box_metrics import boxes_from_probability, coco_metrics, truth_boxes
from polypflow.evaluate.gradcam import save_panels
from polypflow.evaluate.runner import (Scorer, Source, TestSetScores, json_number, rows_of, sweep_thresholds,
                                       workers)
from polypflow.evaluate.stability import (FILM, SEQUENCE_COLUMNS, VideoScores, film_strip, sequences_of, smooth_whole,
                                           tune_smoothing, video_scores)
from polypflow.evaluate.seg_metrics import (LEVELS, MODEL_DICE, TOOLBOX_CURVES, dice_batch, score_image, summarize,
                                             toolbox_dice)
from polypflow.infer.device import CPU
from polypflow.infer.onnx import DeployGraph, export_onnx, onnx_session, parity, probability, quantize_int8
from polypflow.infer.predictor import OnnxBackend, Predictor, TorchBackend, to_resolution, trained_predictor
from polypflow.infer.temporal import OFF, Smoothing
from polypflow.io import write_png
from polypflow.settings.config import Params, Recipe
from polypflow.train.losses import build_loss
from polypflow.viz import draw_overlay, mask_case

THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
GRADCAM_PANELS = 4


def predict_probs(model: nn.Module, images: np.ndarray, normalize: str, device: torch.device,
                  channels_last: bool = False) -> np.ndarray:
    """Main-map probabilities (N×S×S float32) of uint8 images N×S×S×3, by the one predictor."""
    backend = TorchBackend(model, normalize, device, channels_last)
    return Predictor(backend, images.shape[1], 0.5).predict_resized(images)


def grid_dice(probs: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Mean Dice at each threshold of :data:`THRESHOLD_GRID`."""
    return np.array([dice_batch(probs, masks, t).mean() for t in THRESHOLD_GRID])


def search_threshold(probs: np.ndarray, masks: np.ndarray) -> float:
    """The binarisation threshold maximising mean Dice (grid 0.05..0.95), as CRIS chooses it."""
    return float(THRESHOLD_GRID[int(np.argmax(grid_dice(probs, masks)))])


def logits_of(prob: np.ndarray) -> np.ndarray:
    """Float64 logits of float32 probabilities (clipped where float32 saturates: those pixels stay saturated at
    any temperature above 1)."""
    return logit(np.clip(prob.astype(np.float64), 1e-7, 1 - 1e-7))


def selection_score(metrics: dict) -> float:
    """What epochs are selected on: the val Dice the model will be used with, i.e. ``val_dice_tuned`` (at the
    grid's best threshold) when the recipe searches its threshold after training, else ``val_dice`` (at 0.5)."""
    return metrics.get("val_dice_tuned", metrics["val_dice"])


class SegmentationTask:
    """A polyp mask per image (see the module docstring)."""

    name: ClassVar[str] = "segmentation"
    metric: ClassVar[str] = "val_dice"
    metric_label: ClassVar[str] = "val Dice"
    predicts_masks: ClassVar[bool] = True
    val_score: ClassVar[str] = "dice"
    int8_budget: ClassVar[str] = "int8_max_dice_drop"
    case_columns: ClassVar[tuple[str, ...]] = ("dataset", "kind", "rank", "key", "dice", "file")
    onnx_outputs: ClassVar[tuple[str, ...]] = ("probability",)
    answer_columns: ClassVar[dict[str, str]] = {"mask": "string", "polyp_fraction": "double", "max_probability": "double"}
    collate = None  # the default collate: image and mask tensors stack

    def __init__(self, params: Params, recipe: Recipe | None = None) -> None:
        self.params, self.recipe = params, recipe
        self.loss_fn = build_loss(recipe.loss, recipe.deep_supervision_weights) if recipe is not None else None

    # ------------------------------------------------------------ training (polypflow.train.engine.TrainingTask)

    def check(self) -> None:
        """The recipe's loss was built (and so checked) with the task."""

    def dataset(self, data: ImageSet) -> SegDataset:
        return SegDataset(data, self.recipe.normalize, self.recipe.augment)

    def target_to(self, target: torch.Tensor, device: torch.device) -> torch.Tensor:
        return target.to(device)

    def rescale_target(self, target: torch.Tensor, size: int, factor: float) -> torch.Tensor:
        return (F.interpolate(target, size=(size, size), mode="bilinear", align_corners=False) > 0.5).float()

    def loss(self, model: nn.Module, outputs: tuple[torch.Tensor, ...], target: torch.Tensor, epoch: int) -> torch.Tensor:
        return self.loss_fn(tuple(o.float() for o in outputs), target, epoch)

    def validate(self, model: nn.Module, val: ImageSet, device: torch.device) -> dict[str, float]:
        probs = predict_probs(model, val.images, self.recipe.normalize, device, self.recipe.channels_last)
        metrics = {"val_dice": float(dice_batch(probs, val.masks).mean()) if len(val.keys) else 0.0}
        if self.recipe.threshold_search and len(val.keys):
            metrics["val_dice_tuned"] = float(grid_dice(probs, val.masks).max())
        return metrics

    def select(self, metrics: dict[str, float]) -> float:
        return selection_score(metrics)

    def soft_target(self, teacher: nn.Module, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """The ``teacher``'s main-map probabilities on one of its flip-TTA views of ``x`` (drawn from ``rng``),
        flipped back: over the steps, the targets average to the views' mean map, so the single pass learns what
        the shipped TTA adds. A teacher without TTA gives its one view (a mean teacher)."""
        net, views = (teacher.net, VIEWS[teacher.tta]) if isinstance(teacher, FlipTTA) else (teacher, ((),))
        dims = views[int(rng.integers(len(views)))]
        return torch.sigmoid(in_view(net, x, dims)[0].float())

    def distill_loss(self, outputs: tuple[torch.Tensor, ...], soft: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the main map's logits against the teacher's probabilities (soft targets)."""
        return F.binary_cross_entropy_with_logits(outputs[0].float(), soft)

    def threshold(self, model: nn.Module, train: ImageSet, device: torch.device) -> float:
        """The binarisation threshold the model is used with: searched on the train set when the recipe says so."""
        if not (self.recipe.threshold_search and len(train.keys)):
            return 0.5
        probs = predict_probs(model, train.images, self.recipe.normalize, device, self.recipe.channels_last)
        return search_threshold(probs, train.masks)

    def meta(self) -> dict[str, Any]:
        return {}

    def calibrate(self, model: nn.Module, val: ImageSet, threshold: float, device: torch.device) -> dict[str, Any]:
        """The temperature ``T`` the model ships its map with, ``sigmoid(T * logit)``: of ``train.temperatures``,
        the one with the best mean toolbox meanDic on the validation images at the model's size (the first on a
        tie), set on ``model``. The threshold moves with it (``sigmoid(T * logit(threshold))``), so the same pixels
        are polyp at the model's size (at an image's size, the bilinear resize of the map moves a few rim pixels):
        the mask stays, the map's spread changes (meanDic averages Dice over 256 thresholds of the map). Returns
        ``temperature``, ``threshold`` and ``val_meandic`` (each candidate's score)."""
        candidates = self.params.train.temperatures
        if not len(val.keys) or candidates == [1.0]:
            return {"temperature": 1.0, "threshold": threshold, "val_meandic": {}}
        with_temperature(model, 1.0)
        logits = logits_of(predict_probs(model, val.images, self.recipe.normalize, device, self.recipe.channels_last))
        scores = [float(np.mean([toolbox_dice(expit(t * z).astype(np.float32), m)
                                 for z, m in zip(logits, val.masks, strict=True)])) for t in candidates]
        chosen = candidates[int(np.argmax(scores))]
        with_temperature(model, chosen)
        moved = float(expit(chosen * logits_of(np.array(threshold))))
        return {"temperature": float(chosen), "threshold": moved,
                "val_meandic": {f"{t:g}": score for t, score in zip(candidates, scores, strict=True)}}

    def video_meta(self, model: nn.Module, val: ImageSet, sequences: list[list[int]], threshold: float,
                   device: torch.device) -> dict[str, Any]:
        """The moving average over frames with the least flicker on the validation sequences at a Dice cost of at
        most ``video.smoothing.max_dice_drop`` (:func:`polypflow.evaluate.stability.tune_smoothing`)."""
        cfg = self.params.video.smoothing
        frames = sorted({i for seq in sequences for i in seq})
        where = {i: n for n, i in enumerate(frames)}
        probs = predict_probs(model, val.images[frames], self.recipe.normalize, device, self.recipe.channels_last)
        return {"smoothing": tune_smoothing(probs, val.masks[frames], [[where[i] for i in seq] for seq in sequences],
                                            threshold, cfg.ema, cfg.max_dice_drop, cfg.enabled)}

    def val_scores(self, model: nn.Module, val: ImageSet, threshold: float, device: torch.device) -> np.ndarray:
        if not len(val.keys):
            return np.zeros(0)
        return dice_batch(predict_probs(model, val.images, self.recipe.normalize, device), val.masks, threshold)

    # ------------------------------------------------------------ inference, served answers

    @classmethod
    def predictor(cls, model: nn.Module, meta: dict, threshold: float | None = None, device: torch.device | None = None,
                  batch_size: int = 16, source: str = "") -> Predictor:
        device = device or CPU
        backend = TorchBackend(model.to(device), (meta["mean"], meta["std"]), device)
        return trained_predictor(backend, meta, threshold, batch_size, source)

    @classmethod
    def check_threshold(cls, threshold: float) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1) (a pixel is polyp from this probability), got {threshold}")

    @classmethod
    def answer(cls, predictor: Predictor, image: np.ndarray, threshold: float,
               output: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        prob = predictor.predict([image])[0] if output is None else output
        mask = predictor.keep(prob, threshold)
        row = {"polyp_fraction": float(mask.mean()), "max_probability": float(prob.max())}
        return row, draw_overlay(image, mask), mask

    # ------------------------------------------------------------ evaluation

    def test_source(self, predictor: Predictor, meta: dict, facts: pd.DataFrame) -> Source:
        """A test set's probability maps at the model's input size."""
        cfg = self.params

        def maps(dataset: str, keys: list[str]) -> tuple[list[str], np.ndarray]:
            data = load_image_set(facts, keys, meta["image_size"], cfg.validate_.mask_threshold, cfg.paths.cache)
            return keys, predictor.predict_resized(data.images)

        return maps

    def scorer(self, threshold: float, facts: pd.DataFrame, cases_dir: Path, smoothing: Smoothing = Smoothing()) -> Scorer:
        video = set(self.params.video_datasets())

        def score(dataset: str, keys: list[str], probs: Sequence[np.ndarray]) -> TestSetScores:
            sequences = sequences_of(facts, keys, video) if dataset in video else {}
            smoothed = smooth_whole(probs, keys, sequences, self.params.video, smoothing) \
                if sequences and smoothing.ema < OFF else None
            shipped = smoothed if smoothing.active else probs
            stability = self.score_video(dataset, keys, probs, smoothed, shipped, sequences, threshold, facts,
                                         smoothing, cases_dir)
            probs = shipped
            tables, summary = self.score_maps(keys, probs, threshold, facts)
            cases = self.draw_cases(tables["per_image"], probs, dataset, facts, threshold, cases_dir)
            fixed = self.params.evaluate.threshold
            line = (f"mDice@{threshold:.2f} {summary[MODEL_DICE]:.4f}"
                    + ("" if threshold == fixed else f" (mDice@{fixed:.2f} {summary['dice']:.4f})")
                    + f" meanDic {summary['tb_dice']:.4f} S {summary['sm']:.4f}")
            if stability.summary.get("video_flicker") is not None:
                line += f" flicker {stability.summary['video_flicker']:.4f}"
            summary.update({k: json_number(v) for k, v in stability.summary.items()})
            return TestSetScores({**tables, "stability": stability.table}, summary, cases, line)

        return score

    def score_video(self, dataset: str, keys: list[str], probs: Sequence[np.ndarray], smoothed: Sequence[np.ndarray] | None,
                    shipped: Sequence[np.ndarray], sequences: dict[str, list[int]], threshold: float,
                    facts: pd.DataFrame, smoothing: Smoothing, cases_dir: Path) -> VideoScores:
        """Stability of one test set's maps over its sequences (none for a set of stills), raw and ``smoothed``, and
        the film strip of the least stable one as the model ``shipped`` it (:data:`~polypflow.evaluate.stability.FILM`)."""
        if not sequences:
            return VideoScores(pd.DataFrame(columns=[*SEQUENCE_COLUMNS, "variant", "filmed"]), {}, None)
        cfg, rows = self.params, rows_of(facts, keys)
        with ThreadPoolExecutor(workers()) as pool:
            truth = list(pool.map(lambda path: read_mask(path, cfg.validate_.mask_threshold), rows["mask_path"]))
        scores = video_scores(keys, probs, smoothed, truth, sequences, threshold, cfg.video, cfg.detection.min_box_area,
                              smoothing, cfg.report.n_boot, cfg.seed, cfg.report.confidence)
        if scores.filmed is not None:
            seq = sequences[scores.filmed]
            strip = film_strip([read_image(rows["image_path"].iloc[i]) for i in seq], [truth[i] for i in seq],
                               [shipped[i] for i in seq], threshold, cfg.video.film_frames)
            write_png(cases_dir / FILM.format(dataset=dataset), strip)
        return scores

    def score_maps(self, keys: list[str], probs: Sequence[np.ndarray], threshold: float,
                   facts: pd.DataFrame) -> tuple[dict[str, pd.DataFrame], dict]:
        """Per-image metrics, the mean PR curve, threshold sweep and toolbox curves of one test set, each map resized
        to its mask's original resolution; the summary, with its mask's components scored as boxes (``box_*``)
        when ``detection.mask_boxes``."""
        cfg = self.params
        pr_t, sweep_t = np.linspace(0, 1, cfg.evaluate.pr_points), sweep_thresholds(cfg.evaluate)
        boxes = cfg.detection.mask_boxes

        def one(item):
            prob, mask_path = item
            gt = read_mask(mask_path, cfg.validate_.mask_threshold)
            full = to_resolution(prob, gt.shape)
            scores = score_image(full, gt, cfg.evaluate.threshold, threshold, pr_t, sweep_t)
            found = (truth_boxes(gt, cfg.detection.min_box_area),
                     boxes_from_probability(full, threshold, cfg.detection.min_box_area)) if boxes else None
            return scores, found

        with ThreadPoolExecutor(workers()) as pool:
            results = list(pool.map(one, zip(probs, rows_of(facts, keys)["mask_path"], strict=True)))
        rows, prs, sweeps, curves = [], [], [], {name: [] for name in TOOLBOX_CURVES}
        for key, (scores, _) in zip(keys, results, strict=True):
            rows.append({"key": key, **scores.row})
            prs.append(scores.pr)
            sweeps.append(pd.DataFrame(scores.sweep))
            for name in TOOLBOX_CURVES:
                curves[name].append(scores.curves[name])
        pr_mean = np.mean(prs, axis=0)
        curve = pd.DataFrame({"level": np.arange(LEVELS), "threshold": np.arange(LEVELS) / (LEVELS - 1),
                              **{name: np.mean(values, axis=0) for name, values in curves.items()}})
        tables = {"per_image": pd.DataFrame(rows),
                  "pr": pd.DataFrame({"threshold": pr_t, "precision": pr_mean[:, 0], "recall": pr_mean[:, 1]}),
                  "sweep": pd.concat(sweeps).groupby("threshold", as_index=False).mean(), "curves": curve}
        toolbox = {name: curve[name].to_numpy() for name in TOOLBOX_CURVES}
        summary = {k: json_number(v) for k, v in summarize(tables["per_image"], toolbox).items()}
        if boxes:
            truth, found = zip(*(found for _, found in results), strict=True)
            summary.update({f"box_{k}": json_number(v) for k, v in coco_metrics(list(found), list(truth)).metrics.items()})
        return tables, summary

    def draw_cases(self, per_image: pd.DataFrame, probs: Sequence[np.ndarray], dataset: str, facts: pd.DataFrame,
                   threshold: float, out: Path) -> list[dict]:
        """Overlays of the best and worst ``evaluate.cases`` images of one test set, by the Dice at the model's
        ``threshold`` (the prediction drawn at it)."""
        k = min(self.params.evaluate.cases, len(per_image))
        order = per_image.reset_index(drop=True).sort_values([MODEL_DICE, "key"], ascending=[False, True], kind="stable")
        picks = [("best", r, i) for r, i in enumerate(order.index[:k], 1)] + \
                [("worst", r, i) for r, i in enumerate(order.index[::-1][:k], 1)]
        rows = []
        for kind, rank, i in picks:
            record = per_image.iloc[i]
            paths = rows_of(facts, [record["key"]]).iloc[0]
            name = f"{dataset}_{kind}{rank}.png"
            image, truth = read_image(paths["image_path"]), read_mask(paths["mask_path"], self.params.validate_.mask_threshold)
            write_png(out / name, mask_case(image, truth, probs[i], threshold))
            rows.append({"dataset": dataset, "kind": kind, "rank": rank, "key": record["key"],
                         "dice": float(record[MODEL_DICE]), "file": name})
        return rows

    def explain(self, model: nn.Module, meta: dict, facts: pd.DataFrame, keys: Sequence[str], out: Path) -> list[Path]:
        """Grad-CAM panels (image | truth | prediction | overlay) for the first test images, of the network without
        its flip test-time augmentation (one view: the layer's activations are those of the image shown)."""
        cfg = self.params
        size = (meta["image_size"] // 32) * 32
        data = load_image_set(facts, list(keys[:GRADCAM_PANELS]), size, cfg.validate_.mask_threshold, cfg.paths.cache)
        names = [k.replace("/", "_") for k in data.keys]
        return save_panels(plain(model).cpu(), list(data.images), out, masks=list(data.masks), names=names,
                           normalize=meta["normalize"], threshold=meta["threshold"])

    # ------------------------------------------------------------ export, registry

    @classmethod
    def export(cls, model: nn.Module, meta: dict, path: Path, opset: int) -> tuple[float, dict[str, Any]]:
        graph = DeployGraph(model, probability, meta["mean"], meta["std"])
        export_onnx(graph, path, meta["image_size"], opset, cls.onnx_outputs)
        return parity(graph, path, meta["image_size"]), {"output": "N x 1 x S x S polyp probability"}

    def quantize(self, fp32: Path, dst: Path, calibration: Iterable[np.ndarray], weight_bits: int,
                 float_modules: Sequence[str] = ()) -> None:
        """Static int8, QDQ (:func:`~polypflow.infer.onnx.quantize_int8`)."""
        quantize_int8(fp32, dst, calibration, weight_bits, float_modules)

    def graph_scores(self, graphs: Sequence[Path], meta: dict, keys: list[str]) -> tuple[str, np.ndarray]:
        """Dice at the model's threshold of each graph's map of each image of ``keys``, each map at its mask's
        original resolution, as :meth:`score_maps` scores them."""
        cfg, size, threshold = self.params, int(meta["image_size"]), float(meta["threshold"])
        facts = read_facts(cfg)
        data = load_image_set(facts, keys, size, cfg.validate_.mask_threshold, cfg.paths.cache)
        maps = [Predictor(OnnxBackend(onnx_session(path)), size, threshold).predict_resized(data.images)
                for path in graphs]
        return f"mDice@{threshold:g} at the masks' resolution", self.dice_at_masks(keys, maps, threshold, facts)

    def dice_at_masks(self, keys: list[str], maps: Sequence[np.ndarray], threshold: float,
                      facts: pd.DataFrame) -> np.ndarray:
        """Dice at ``threshold`` of each image of ``keys`` (columns) in each of ``maps`` (rows: maps of ``keys``
        at the model's size), each map at its mask's original resolution."""
        def one(item: tuple[int, str]) -> list[float]:
            i, mask_path = item
            gt = read_mask(mask_path, self.params.validate_.mask_threshold)
            return [float(dice_batch(to_resolution(m[i], gt.shape)[None], gt[None], threshold)[0]) for m in maps]

        with ThreadPoolExecutor(workers()) as pool:
            return np.array(list(pool.map(one, enumerate(rows_of(facts, keys)["mask_path"])))).reshape(len(keys), -1).T
