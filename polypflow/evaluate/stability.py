"""Temporal stability of predicted masks along video sequences: how much a mask flickers from frame to frame, and
how often a polyp appears where the truth has none.

For each pair of consecutive frames of a sequence (in frame order, among the frames a test set holds):

- the **change** of a mask pair is the fraction of the frame's pixels whose label flips, ``|A xor B| / pixels``;
- **flicker** is the fraction of the frame whose predicted label flips where the truth's does not, averaged over
  the pairs: the prediction's changes that the polyp's own motion does not explain (0.01 = one pixel in a hundred
  flips for no reason). A prediction that follows the truth has none, and so has one that never changes (its
  errors are Dice's business, not stability's); a mask that blinks on and off has a lot;
- a **false alarm** is a frame whose prediction holds a polyp region (a connected component of at least
  ``min_area`` pixels) that touches no truth pixel; the sequence's false-alarm rate is such frames / frames.

A sequence with fewer than ``min_frames`` frames in the test set, or whose frames lie more than ``max_gap``
frames apart on average, is a **fragment**: it is listed with its figures, never aggregated. The aggregate over
the other sequences is the mean per sequence with a bootstrap interval over sequences
(:func:`polypflow.evaluate.stats.bootstrap_ci`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

from polypflow.data.images import by_image_key
from polypflow.evaluate.seg_metrics import dice_batch
from polypflow.evaluate.stats import bootstrap_ci
from polypflow.infer.predictor import to_resolution
from polypflow.infer.temporal import OFF, Smoothing
from polypflow.settings.config import Video
from polypflow.viz import mask_case

SEQUENCE_COLUMNS = ("sequence", "n_frames", "first_frame", "last_frame", "mean_gap", "n_pairs", "dice", "pred_change",
                    "true_change", "flicker", "false_alarm_rate", "fragment")
FILM = "{dataset}_film.png"  # in the evaluation's cases/: the least stable sequence of a test set
FIGURES = ("flicker", "pred_change", "false_alarm_rate", "dice")


@dataclass(frozen=True)
class Frame:
    """One frame of a sequence: its number in the video, its binary prediction and truth (same shape)."""

    number: int
    pred: np.ndarray
    truth: np.ndarray


def change(a: np.ndarray, b: np.ndarray) -> float:
    """The fraction of pixels whose label differs between two masks of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"masks of consecutive frames differ in shape: {a.shape} and {b.shape}")
    return float(np.count_nonzero(a != b)) / a.size


def spurious_change(pred: tuple[np.ndarray, np.ndarray], truth: tuple[np.ndarray, np.ndarray]) -> float:
    """The fraction of pixels whose predicted label flips between two frames while their true label does not."""
    flips = pred[0] != pred[1]
    return float(np.count_nonzero(flips & (truth[0] == truth[1]))) / flips.size


def false_alarm(pred: np.ndarray, truth: np.ndarray, min_area: int) -> bool:
    """Whether ``pred`` holds a region of at least ``min_area`` pixels that touches no pixel of ``truth``."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(pred.astype(np.uint8), connectivity=8)
    big = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    if not big:
        return False
    touched = np.unique(labels[truth.astype(bool)])
    return bool(set(big) - set(touched.tolist()))


def sequence_stability(frames: Sequence[Frame], min_area: int) -> dict:
    """The stability figures of one sequence's frames (sorted here by frame number)."""
    frames = sorted(frames, key=lambda f: f.number)
    pairs = list(zip(frames, frames[1:]))
    pred = np.array([change(a.pred, b.pred) for a, b in pairs])
    truth = np.array([change(a.truth, b.truth) for a, b in pairs])
    flicker = np.array([spurious_change((a.pred, b.pred), (a.truth, b.truth)) for a, b in pairs])
    numbers = [f.number for f in frames]
    return {"n_frames": len(frames), "first_frame": numbers[0], "last_frame": numbers[-1],
            "mean_gap": float(np.diff(numbers).mean()) if pairs else float("nan"), "n_pairs": len(pairs),
            "dice": float(np.mean([dice_batch(f.pred[None], f.truth[None], 0.5)[0] for f in frames])),
            "pred_change": float(pred.mean()) if pairs else float("nan"),
            "true_change": float(truth.mean()) if pairs else float("nan"),
            "flicker": float(flicker.mean()) if pairs else float("nan"),
            "false_alarm_rate": float(np.mean([false_alarm(f.pred, f.truth, min_area) for f in frames]))}


def stability_table(sequences: dict[str, Sequence[Frame]], min_area: int, min_frames: int, max_gap: float) -> pd.DataFrame:
    """One row per sequence (:data:`SEQUENCE_COLUMNS`), fragments marked."""
    rows = []
    for name, frames in sequences.items():
        row = {"sequence": name, **sequence_stability(frames, min_area)}
        row["fragment"] = is_fragment([f.number for f in frames], min_frames, max_gap)
        rows.append(row)
    return pd.DataFrame(rows, columns=list(SEQUENCE_COLUMNS))


def is_fragment(numbers: Sequence[int], min_frames: int, max_gap: float) -> bool:
    """Whether frames ``numbers`` of one sequence are too few, or too far apart on average, to judge it by."""
    return bool(len(numbers) < min_frames or np.diff(sorted(numbers)).mean() > max_gap)


def aggregate(table: pd.DataFrame, n_boot: int, seed: int, confidence: float) -> dict:
    """Mean per sequence of each of :data:`FIGURES` with its bootstrap interval over the sequences that are not
    fragments, and how many sequences and frames that is; ``n_sequences`` 0 (and no figures) when all are."""
    whole = table[~table["fragment"].astype(bool)]
    out: dict = {"n_sequences": len(whole), "n_fragments": int(len(table) - len(whole)),
                 "n_frames": int(whole["n_frames"].sum())}
    for name in FIGURES if len(whole) else ():
        interval = bootstrap_ci(whole[name].to_numpy(), n_boot, seed, confidence)
        out.update({name: interval.mean, f"{name}_low": interval.low, f"{name}_high": interval.high})
    return out


def frame_number(key: str) -> int:
    """The frame number of an image key ``<dataset>/<id>`` whose id is the frame's number in its video."""
    ident = key.split("/", 1)[1]
    try:
        return int(ident)
    except ValueError:
        raise ValueError(f"{key}: a sequence frame's id must be its frame number") from None


def sequences_of(facts: pd.DataFrame, keys: Sequence[str], video_datasets: Iterable[str]) -> dict[str, list[int]]:
    """Indices of the ``keys`` that are frames of a video dataset, by sequence (the manifest's ``group``), each
    in frame order; images of other datasets are in none."""
    rows, video = by_image_key(facts).loc[list(keys)], set(video_datasets)
    out: dict[str, list[int]] = {}
    for i, (dataset, group) in enumerate(zip(rows["dataset"], rows["group"], strict=True)):
        if dataset in video:
            out.setdefault(str(group), []).append(i)
    ordered = {g: sorted(idx, key=lambda i: frame_number(keys[i])) for g, idx in out.items()}
    return dict(sorted(ordered.items(), key=lambda item: frame_number(keys[item[1][0]])))  # in video order


def sequence_figures(probs: np.ndarray, masks: np.ndarray, sequences: Sequence[Sequence[int]], threshold: float,
                     smoothing: Smoothing) -> dict[str, float]:
    """Mean Dice at ``threshold`` over the frames of ``sequences`` (index lists in frame order, maps and masks at
    one resolution) and their mean flicker between consecutive frames, with ``smoothing``."""
    dice, flicker = [], []
    for seq in sequences:
        maps = np.stack(smoothing.apply(probs[i] for i in seq))
        dice.append(dice_batch(maps, masks[seq], threshold))
        keep, real = maps >= threshold, masks[seq].astype(bool)
        flicker += [spurious_change((a, b), (g, h)) for a, b, g, h in zip(keep, keep[1:], real, real[1:])]
    return {"dice": float(np.concatenate(dice).mean()), "flicker": float(np.mean(flicker))}


def tune_smoothing(probs: np.ndarray, masks: np.ndarray, sequences: Sequence[Sequence[int]], threshold: float,
                   candidates: Sequence[float], max_dice_drop: float, enabled: bool) -> dict:
    """The smoothing weight with the least flicker on validation ``sequences`` among ``candidates`` (and 1, none)
    costing at most ``max_dice_drop`` Dice, as a model's ``smoothing`` metadata with the figures it was chosen by.
    Without a sequence of two frames or more, the weight is 1 (none)."""
    sequences = [list(s) for s in sequences if len(s) >= 2]
    if not sequences:
        return {"ema": OFF, "enabled": False, "val_sequences": 0, "why": "no validation sequence of 2 frames or more"}
    figures = {w: sequence_figures(probs, masks, sequences, threshold, Smoothing(w)) for w in (OFF, *candidates)}
    raw = figures[OFF]
    allowed = [w for w, f in figures.items() if f["dice"] >= raw["dice"] - max_dice_drop]
    chosen = min(allowed, key=lambda w: (round(figures[w]["flicker"], 9), -w))
    return {"ema": chosen, "enabled": bool(enabled and chosen < OFF), "val_sequences": len(sequences),
            "val_frames": sum(map(len, sequences)), "val_dice_raw": raw["dice"], "val_dice": figures[chosen]["dice"],
            "val_flicker_raw": raw["flicker"], "val_flicker": figures[chosen]["flicker"]}


@dataclass(frozen=True)
class VideoScores:
    """A test set's stability: one row per sequence and variant (``raw``; ``smoothed`` when the model has a
    weight; ``filmed`` marks the film strip's sequence: the least stable one as the model ships), the summary's
    ``video_*`` figures (``video_smoothed_*``), and the film strip's sequence."""

    table: pd.DataFrame
    summary: dict
    filmed: str | None


def smooth_whole(probs: Sequence[np.ndarray], keys: list[str], sequences: dict[str, list[int]], video: Video,
                 smoothing: Smoothing) -> list[np.ndarray]:
    """``probs`` with each sequence that is not a fragment smoothed along its frames (frames of fragments, far
    apart in the video, as they are)."""
    out = list(probs)
    for seq in sequences.values():
        if not is_fragment([frame_number(keys[i]) for i in seq], video.min_frames, video.max_gap):
            for i, smooth in zip(seq, smoothing.apply(probs[i] for i in seq), strict=True):
                out[i] = smooth
    return out


def video_scores(keys: list[str], probs: Sequence[np.ndarray], smoothed: Sequence[np.ndarray] | None,
                 truth: Sequence[np.ndarray], sequences: dict[str, list[int]], threshold: float, video: Video,
                 min_area: int, smoothing: Smoothing, n_boot: int, seed: int, confidence: float) -> VideoScores:
    """Stability of the maps ``probs`` (any size, resized to their masks' ``truth``) over ``sequences`` (indices
    of ``keys`` in frame order), raw and, when the model has a weight, ``smoothed`` (:func:`smooth_whole`)."""
    numbers = {i: frame_number(keys[i]) for seq in sequences.values() for i in seq}
    variants = {"raw": probs, **({"smoothed": smoothed} if smoothed is not None else {})}
    tables, summary = [], {}
    for variant, maps in variants.items():
        frames = {name: [Frame(numbers[i], to_resolution(maps[i], truth[i].shape) >= threshold, truth[i].astype(bool))
                         for i in seq] for name, seq in sequences.items()}
        table = stability_table(frames, min_area, video.min_frames, video.max_gap).assign(variant=variant)
        prefix = "video_" if variant == "raw" else "video_smoothed_"
        summary.update({f"{prefix}{k}": v for k, v in aggregate(table, n_boot, seed, confidence).items()})
        tables.append(table)
    shipped = "smoothed" if smoothing.active else "raw"
    table = pd.concat(tables, ignore_index=True)
    whole = table[(table["variant"] == shipped) & ~table["fragment"].astype(bool)]
    filmed = str(whole.sort_values(["flicker", "sequence"], ascending=[False, True]).iloc[0]["sequence"]) if len(whole) else None
    table["filmed"] = (table["variant"] == shipped) & (table["sequence"] == filmed)
    summary.update({"video_smoothing_ema": smoothing.ema, "video_smoothing_on": smoothing.active})
    return VideoScores(table, summary, filmed)


def film_strip(images: Sequence[np.ndarray], truth: Sequence[np.ndarray], probs: Sequence[np.ndarray], threshold: float,
               count: int) -> np.ndarray:
    """``count`` frames spread evenly over a sequence, side by side: each frame above its overlay (prediction red,
    truth outline green), :data:`polypflow.viz.CASE_HEIGHT` pixels a row."""
    picks = np.unique(np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int))
    columns = []
    for i in picks:
        case = mask_case(images[i], truth[i], probs[i], threshold)
        half = case.shape[1] // 2
        columns.append(np.concatenate([case[:, :half], case[:, half:2 * half]], axis=0))
    return np.concatenate(columns, axis=1)
