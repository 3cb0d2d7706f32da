"""What a task is: the one contract segmentation and detection (and any later task) implement.

Nothing outside ``polypflow/tasks/`` asks which task a model has: the stages, the trainer, the predictor, the
served model and the predict CLI ask the task (``task_of(arch)``), as a LightningModule hides its task from the
Trainer and an MMDetection head owns its assigner and losses. A task is built from the settings (and, to train,
a recipe); what only needs a trained model's metadata (its predictor, its served answer) is a class method, so
a served model needs no settings file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from polypflow.data.images import ImageSet
from polypflow.evaluate.runner import Scorer, Source
from polypflow.infer.predictor import Predictor
from polypflow.infer.temporal import Smoothing
from polypflow.settings.config import Params, Recipe
from polypflow.train.engine import TrainingTask


class Task(TrainingTask, Protocol):
    """A task: how its models train (the :class:`~polypflow.train.engine.TrainingTask` part), are selected, ship
    (metadata, threshold), predict, are scored on a test set and drawn, are exported, served and registered."""

    name: ClassVar[str]                      # what models.method_task says: "segmentation", "detection"
    metric: ClassVar[str]                    # the validation metric epochs are reported by (metrics.json)
    metric_label: ClassVar[str]              # how tables name it ("val Dice", "val AP50")
    predicts_masks: ClassVar[bool]           # whether its models draw masks (scored by Dice) or not (boxes)
    val_score: ClassVar[str]                 # per-image score, for promotion (val_per_image.csv) and the int8 check
    int8_budget: ClassVar[str]               # the export setting bounding the int8 graph's drop in that score
    case_columns: ClassVar[tuple[str, ...]]  # cases.csv
    onnx_outputs: ClassVar[tuple[str, ...]]  # the exported graph's outputs
    answer_columns: ClassVar[dict[str, str]]  # a served/predicted image's answer: column -> MLflow type

    def __init__(self, params: Params, recipe: Recipe | None = None) -> None: ...

    # training and selection
    def check(self) -> None:
        """Refuse a recipe this task cannot train (before anything is built or changed on disk)."""
    def meta(self) -> dict[str, Any]:
        """What a trained model's metadata carries beyond the common keys (e.g. a detector's decoding)."""
    def val_scores(self, model: nn.Module, val: ImageSet, threshold: float, device: torch.device) -> np.ndarray:
        """Each validation image's score at ``threshold`` (promotion compares these image by image)."""
    def calibrate(self, model: nn.Module, val: ImageSet, threshold: float, device: torch.device) -> dict[str, Any]:
        """What the trained ``model`` ships with beyond its weights, chosen on ``val`` and set on it (a segmenter's
        map temperature, its ``threshold`` moved with it); metadata keys, plus the candidates' scores."""
    def video_meta(self, model: nn.Module, val: ImageSet, sequences: list[list[int]], threshold: float,
                   device: torch.device) -> dict[str, Any]:
        """What a trained model's metadata carries for video, chosen on the validation ``sequences`` (indices of
        ``val`` in frame order): a segmenter's smoothing."""

    # inference
    @classmethod
    def predictor(cls, model: nn.Module, meta: dict, threshold: float | None = None, device: torch.device | None = None,
                  batch_size: int = 16, source: str = "") -> Predictor:
        """The :class:`Predictor` of a trained model and its metadata; ``threshold`` overrides the stored one."""
    @classmethod
    def check_threshold(cls, threshold: float) -> None:
        """A :class:`ValueError` for a threshold that means nothing (the same rule for the CLI and the server)."""
    @classmethod
    def answer(cls, predictor: Predictor, image: np.ndarray, threshold: float,
               output: Any = None) -> tuple[dict[str, Any], np.ndarray, np.ndarray | None]:
        """One image's answer (the ``answer_columns``), its overlay drawing, and its mask (None without one);
        ``output`` is the image's prediction when the caller has it (a video's frames, predicted in batches)."""

    # evaluation
    def test_source(self, predictor: Predictor, meta: dict, facts: pd.DataFrame) -> Source:
        """A test set's outputs, as the scorer takes them."""
    def scorer(self, threshold: float, facts: pd.DataFrame, cases_dir: Path, smoothing: Smoothing = Smoothing()) -> Scorer:
        """How one test set is scored, summarised and drawn (outputs from :meth:`test_source`), its video sequences
        with the model's ``smoothing`` as it ships (a segmenter's)."""
    def explain(self, model: nn.Module, meta: dict, facts: pd.DataFrame, keys: Sequence[str], out: Path) -> list[Path]:
        """Explanations of the first test images (a segmenter's Grad-CAM panels) in ``out``; returns their files."""

    # export
    @classmethod
    def export(cls, model: nn.Module, meta: dict, path: Path, opset: int) -> tuple[float, dict[str, Any]]:
        """Write the ONNX graph to ``path``; its largest difference from PyTorch and what the parity report says."""
    def quantize(self, fp32: Path, dst: Path, calibration: Iterable[np.ndarray], weight_bits: int,
                 float_modules: Sequence[str] = ()) -> None:
        """Write the int8 graph of the exported ``fp32`` graph to ``dst``, calibrated on ``calibration`` (the
        graph's input batches: training images), its weights in ``weight_bits`` (7 or 8), the network's
        ``float_modules`` left in float32."""
    def graph_scores(self, graphs: Sequence[Path], meta: dict, keys: list[str]) -> tuple[str, np.ndarray]:
        """What is scored (e.g. ``mDice@0.5 at the masks' resolution``: the mean of a row is the graph's score) and
        each exported graph's ``val_score`` of each image of ``keys`` (rows: ``graphs``, columns: ``keys``), at the
        model's threshold as it ships; an int8 graph whose mean drops more than ``export.<int8_budget>`` below
        fp32's on a test set is outside the budget."""
