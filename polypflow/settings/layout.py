"""Where every output lives: the one place that names artifact folders and files (``dvc.yaml`` templates the
same layout, and ``tests/test_layout.py`` checks that the two agree).

``artifacts/<stage>/<method>/...`` per method; each stage that logs to MLflow writes its run id beside its
outputs (``run.json``), so later stages and the register stage find the runs without MLflow's thread-local
active run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from polypflow.settings.config import Params

RUN = "run.json"


@dataclass(frozen=True)
class MethodLayout:
    """The files of one method (or external method) under ``paths.artifacts``."""

    artifacts: Path
    method: str

    def _dir(self, stage: str) -> Path:
        return self.artifacts / stage / self.method

    # train@<method>
    @property
    def model_dir(self) -> Path:
        return self._dir("models")

    @property
    def model(self) -> Path:
        return self.model_dir / "model.pt"

    @property
    def metrics(self) -> Path:
        return self.model_dir / "metrics.json"

    @property
    def history(self) -> Path:
        return self.model_dir / "history.csv"

    @property
    def val_scores(self) -> Path:
        return self.model_dir / "val_per_image.csv"

    @property
    def checkpoint(self) -> Path:
        return self._dir("checkpoints") / "checkpoint.pt"

    # evaluate@<method>
    @property
    def eval_dir(self) -> Path:
        return self._dir("eval")

    @property
    def eval_summary(self) -> Path:
        return self.eval_dir / "summary.json"

    def eval_table(self, name: str) -> Path:
        """``per_image``, ``pr``, ``sweep``, ``curves`` or ``stability`` (CSV)."""
        return self.eval_dir / f"{name}.csv"

    @property
    def cases_dir(self) -> Path:
        return self.eval_dir / "cases"

    @property
    def cases(self) -> Path:
        return self.cases_dir / "cases.csv"

    @property
    def gradcam_dir(self) -> Path:
        return self.eval_dir / "gradcam"

    # export@ / profile@ / register@ / crossval / lr_search@
    @property
    def onnx(self) -> Path:
        return self._dir("export") / "model.onnx"

    @property
    def parity(self) -> Path:
        return self._dir("export") / "parity.json"

    @property
    def int8_dir(self) -> Path:
        """The int8 graph (``model.onnx``), its ``check.json`` and each test image's score by the fp32 and int8
        graphs (``per_image.csv``)."""
        return self._dir("export") / "int8"

    @property
    def int8_onnx(self) -> Path:
        return self.int8_dir / "model.onnx"

    @property
    def int8_check(self) -> Path:
        return self.int8_dir / "check.json"

    @property
    def int8_scores(self) -> Path:
        return self.int8_dir / "per_image.csv"

    @property
    def plain_dir(self) -> Path:
        """A model shipped with test-time augmentation as its plain network: ``model.onnx``, ``int8/model.onnx``,
        ``check.json`` and ``per_image.csv`` (only ``check.json``, saying so, for a model without one)."""
        return self._dir("export") / "plain"

    @property
    def plain_onnx(self) -> Path:
        return self.plain_dir / "model.onnx"

    @property
    def plain_int8_onnx(self) -> Path:
        return self.plain_dir / "int8" / "model.onnx"

    @property
    def plain_check(self) -> Path:
        return self.plain_dir / "check.json"

    @property
    def plain_scores(self) -> Path:
        return self.plain_dir / "per_image.csv"

    @property
    def profile(self) -> Path:
        return self._dir("profile") / "profile.json"

    @property
    def registered(self) -> Path:
        return self._dir("registry") / "registered.json"

    @property
    def crossval_dir(self) -> Path:
        return self._dir("crossval")

    @property
    def crossval_folds(self) -> Path:
        return self.crossval_dir / "folds.csv"

    @property
    def crossval_summary(self) -> Path:
        return self.crossval_dir / "summary.json"

    @property
    def crossval_checkpoints(self) -> Path:
        return self.artifacts / "checkpoints" / f"crossval-{self.method}"

    @property
    def lr_search_dir(self) -> Path:
        return self._dir("lr_search")

    @property
    def lr_trials(self) -> Path:
        return self.lr_search_dir / "trials.csv"

    @property
    def lr_best(self) -> Path:
        return self.lr_search_dir / "best.json"

    def run_record(self, stage: str) -> Path:
        """``run.json`` of ``stage``'s MLflow run for this method (train: beside the model)."""
        return (self.model_dir if stage == "train" else self._dir({"evaluate": "eval"}.get(stage, stage))) / RUN


def method_layout(params: Params, method: str) -> MethodLayout:
    return MethodLayout(Path(params.paths.artifacts), method)


def settings_record(params: Params) -> Path:
    """What stage ``settings`` writes once every settings file checked out, and every other stage depends on."""
    return Path(params.paths.artifacts) / "settings" / "checked.json"
