"""Typed view of ``params.yaml``, the single source of truth for every setting.

Every section is a frozen pydantic model with ``extra="forbid"``: an unknown or misspelt key is an
error that names the file and the key, never a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class Paths(Strict):
    raw: Path
    downloads: Path
    manifest: Path
    facts: Path
    validation_report: Path
    splits: Path
    cache: Path
    artifacts: Path
    reports: Path


class Promotion(Strict):
    """Alias ``champion`` moves only on a significant validation Dice gain (paired bootstrap)."""

    n_boot: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1)


class Tracking(Strict):
    uri: str
    artifact_location: Path
    experiment: str
    register_models: bool = True
    global_models: dict[str, str]  # task -> the model every method of that task is also registered as
    promotion: Promotion = Promotion()


class LocalSource(Strict):
    """A folder or archive under ``ingest.root`` (relative to it, so DVC tracks its content)."""

    kind: Literal["local"]
    path: Path

    @field_validator("path")
    @classmethod
    def _under_root(cls, path: Path) -> Path:
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"{path}: a local source is a path relative to ingest.root (the folder DVC tracks for "
                             "ingest), inside it; move ingest.root instead")
        return path


class UrlSource(Strict):
    kind: Literal["url"]
    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    subdir: str = ""


class DatasetSpec(Strict):
    name: str
    source: LocalSource | UrlSource = Field(discriminator="kind")
    images: str = "images"
    masks: str = "masks"
    # inclusive frame-number ranges [first, last], one per video sequence (leakage-safe splits)
    sequences: list[tuple[int, int]] = []


class Ingest(Strict):
    root: Path = Path(".")   # local sources lie under it: a DVC dependency of ingest, so any change re-runs it
    datasets: dict[str, DatasetSpec]
    image_extensions: list[str] = [".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"]


class Validate(Strict):
    mask_threshold: int = Field(ge=0, le=254)
    ambiguous_band: tuple[int, int]
    max_ambiguous_fraction: float = Field(ge=0, le=1)
    min_mask_fraction: float = Field(ge=0, le=1)
    max_mask_fraction: float = Field(ge=0, le=1)
    inverted_side_fraction: float = Field(ge=0, le=1)
    min_side: int = Field(ge=1)
    max_side: int = Field(ge=1)
    max_duplicate_fraction_within: float = Field(ge=0, le=1)
    max_duplicates_across: int = Field(ge=0)


SPLIT_SCHEMES = ("pranet", "pranet_grouped", "70_15_15", "80_10_10")


class Split(Strict):
    """``pranet``: the PraNet protocol's exact test lists (``test_lists``); ``pranet_grouped``: its sizes
    (``pranet_train``) with whole video sequences per set; ``70_15_15`` / ``80_10_10``: seeded, sequence-safe."""

    scheme: Literal["pranet", "pranet_grouped", "70_15_15", "80_10_10"]
    datasets: list[str]
    unseen: list[str] = []
    pranet_train: dict[str, int] = {}
    test_lists: Path | None = None   # scheme pranet: <test_lists>/<dataset>_test.txt, the test ids one per line
    val_fraction_of_train: float = Field(0.1, gt=0, lt=1)
    folds: int = Field(ge=2)
    max_items_per_dataset: int | None = None

    @field_validator("scheme", mode="before")
    @classmethod
    def _scheme_read_as_number(cls, value: Any) -> Any:
        """YAML (and ``dvc exp run -S split.scheme=70_15_15``) reads ``70_15_15`` as the integer 701515."""
        by_digits = {s.replace("_", ""): s for s in SPLIT_SCHEMES if s[0].isdigit()}
        return by_digits.get(str(value), value) if isinstance(value, int) else value


class Recipe(Strict):
    """One training recipe; ``train.defaults`` merged with ``methods.<name>.recipe``."""

    image_size: int = Field(ge=32)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    optimizer: Literal["adam", "adamw", "sgd"]
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["none", "cosine", "poly"]
    loss: str
    deep_supervision_weights: list[float] = []
    augment: Literal["none", "basic", "strong"]
    multiscale: list[float] = [1.0]
    normalize: Literal["imagenet", "half"]
    early_stop_patience: int = Field(ge=1)
    max_train_items: int | None = None
    threshold_search: bool = False
    amp: bool = True
    channels_last: bool = True
    num_workers: int = Field(0, ge=0)
    # an exponential moving average of the weights (this decay per step) is what is validated, selected and shipped
    ema_decay: float | None = Field(None, gt=0, lt=1)
    # with ema_decay, the raw weights are validated too each epoch (val_*_raw: what the average buys); a diagnostic
    # that costs one more validation pass per epoch and changes nothing trained or selected
    validate_raw: bool = True
    # the first epoch (1-based) validated; the epochs before it train without a validation pass, so they can be
    # neither selected nor counted by early stopping (their history rows carry train_loss and lr only)
    validate_from: int = Field(1, ge=1)
    # progressive resizing: [first epoch (1-based), training size in px] pairs; images are loaded (and validated,
    # shipped) at image_size, and each batch is resized to its epoch's size before multiscale
    resize_schedule: list[tuple[int, int]] = []
    # self-distillation: from epoch distill_from (1-based), this weight times the task's distillation loss towards
    # the EMA's prediction on one of its test-time views (drawn per step: in expectation, the shipped TTA's map)
    distill_weight: float = Field(0.0, ge=0)
    distill_from: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _distill_teacher(self) -> "Recipe":
        if self.distill_weight and not self.ema_decay:
            raise ValueError(f"distill_weight: {self.distill_weight} needs ema_decay: the moving average is the teacher")
        if self.distill_weight and self.distill_from > self.epochs:
            raise ValueError(f"distill_from: epoch {self.distill_from} is after the last epoch ({self.epochs})")
        return self

    @model_validator(mode="after")
    def _schedule_sizes(self) -> "Recipe":
        epochs = [epoch for epoch, _ in self.resize_schedule]
        for epoch, size in self.resize_schedule:
            if epoch < 1 or size % 32 or not 32 <= size <= self.image_size:
                raise ValueError(f"resize_schedule: epoch {epoch} -> {size} px: epochs count from 1 and sizes are "
                                 f"multiples of 32 up to image_size ({self.image_size})")
        if epochs != sorted(set(epochs)):
            raise ValueError(f"resize_schedule: first epochs {epochs} must increase")
        return self

    @model_validator(mode="after")
    def _validated_epoch(self) -> "Recipe":
        if self.validate_from > self.epochs:
            raise ValueError(f"validate_from: epoch {self.validate_from} is after the last epoch ({self.epochs}): "
                             "no epoch would be validated, so none could be selected")
        return self

    def train_size(self, epoch: int) -> int:
        """The training size of 0-based ``epoch``: the schedule's last entry at or before it, else image_size."""
        started = [size for first, size in self.resize_schedule if first <= epoch + 1]
        return started[-1] if started else self.image_size


class MethodSpec(Strict):
    """A configured method: ``arch`` names the registered builder (default: the entry's own key);
    ``int8_float_modules``: module paths in its network (``encoder.blocks.0``) its int8 graphs keep in float32."""

    arch: str | None = None
    model: dict[str, Any] = {}
    recipe: dict[str, Any] = {}
    int8_float_modules: list[str] = []


class Train(Strict):
    methods: list[str]
    defaults: Recipe
    # candidate temperatures T of a segmenter's shipped map sigmoid(T * logit), chosen by train@ on validation
    temperatures: list[float] = Field([1.0], min_length=1)

    @field_validator("temperatures")
    @classmethod
    def _temperatures(cls, value: list[float]) -> list[float]:
        if not all(t > 0 for t in value):
            raise ValueError(f"each temperature must be > 0, got {value}")
        return value


class Crossval(Strict):
    """k comes from ``split.folds`` (the fold assignment is part of splits.json)."""

    method: str
    recipe: dict[str, Any] = {}


class LrSearch(Strict):
    """Optuna learning-rate search (CRIS recipe: 20 trials over 1e-6..1e-2, median pruner)."""

    methods: list[str] = []
    trials: int = Field(20, ge=1)
    lr_low: float = Field(1e-6, gt=0)
    lr_high: float = Field(1e-2, gt=0)
    startup_trials: int = Field(5, ge=0)
    recipe: dict[str, Any] = {}


class Evaluate(Strict):
    threshold: float = Field(gt=0, lt=1)
    pr_points: int = Field(ge=2)
    batch_size: int = Field(ge=1)
    sweep: tuple[float, float] = (0.3, 0.7)  # Dice/IoU/sensitivity/precision swept over [low, high]
    sweep_step: float = Field(0.05, gt=0)
    cases: int = Field(3, ge=0)  # best and worst images per test set drawn as overlays


class Smoothing(Strict):
    """``video.smoothing``: the moving average of probabilities over past frames (:mod:`polypflow.infer.temporal`)."""

    enabled: bool                                   # shipped on with the model: predict, serving, evaluate apply it
    ema: list[float] = Field(min_length=1)          # candidate weights of the current frame, tuned by train@
    max_dice_drop: float = Field(ge=0)              # the weight chosen costs at most this much validation Dice

    @field_validator("ema")
    @classmethod
    def _weights(cls, value: list[float]) -> list[float]:
        if not all(0 < w <= 1 for w in value):
            raise ValueError(f"each weight must be in (0, 1], got {value}")
        return value


class Video(Strict):
    """``video``: video input (predict --video) and temporal stability (evaluate@, :mod:`polypflow.evaluate.stability`)."""

    batch_size: int = Field(ge=1)                   # frames per inference batch while decoding runs ahead
    min_frames: int = Field(ge=2)                   # a test sequence with fewer frames is a fragment, not aggregated
    max_gap: float = Field(ge=1)                    # ... as is one whose frames lie further apart on average
    film_frames: int = Field(ge=1)                  # frames in the report's film strip of the least stable sequence
    smoothing: Smoothing


class ExternalMethod(Strict):
    """Another method's own prediction maps, scored by ``evaluate`` exactly like our models' (``evaluate@<name>``).

    The maps lie as the community's evaluation toolbox reads them: ``<root>/<folder>/<image id>.png``, one grey
    8-bit probability map per test image (any resolution; resized to the mask's). A test image without a map is
    left out of that method's figures (and counted as missing)."""

    title: str                                  # e.g. "PraNet (published maps)"
    arch: str | None = None                     # the registry architecture whose paper figures it sits beside
    root: Path
    folders: dict[str, str]                     # dataset key -> folder under root
    threshold: float = Field(0.5, gt=0, lt=1)


class Report(Strict):
    """The comparison report: bootstrap settings, leakage check, the papers' figures."""

    n_boot: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    leakage_max_distance: int = Field(4, ge=0, le=64)  # dHash and pHash Hamming distance (of 64 bits)
    paper_figures: Path = Path("references/paper_figures.yaml")
    # (A, B) pairs of the significance table, e.g. each paper's method against its baseline; empty: every pair
    pairs: list[tuple[str, str]] = []


class Profile(Strict):
    """profile@: MACs at ``macs_image_size``; latency at the method's size; ONNX Runtime fp32 and int8 at batch 1
    for every size of ``ort_sizes`` × thread count of ``ort_threads`` (graphs rebuilt at each size)."""

    macs_image_size: int = Field(ge=32)
    batch_size: int = Field(1, ge=1)
    warmup: int = Field(ge=0)
    iterations: int = Field(ge=1)
    threads: int | None = None
    ort_sizes: list[Annotated[int, Field(ge=32)]]
    ort_threads: list[Annotated[int, Field(ge=1)]]


class Detection(Strict):
    """Detection methods (``task: detection``) and the boxes they are scored on: one box per connected component of a
    mask of at least ``min_box_area`` pixels (at the mask's own resolution; smaller ones are specks). Every value
    lives in params.yaml."""

    min_box_area: int = Field(ge=0)
    atss_topk: int = Field(ge=1)             # ATSS candidates per pyramid level
    score_threshold: float = Field(ge=0, lt=1)  # detections kept for COCO AP (and exported)
    nms_iou: float = Field(gt=0, le=1)
    max_detections: int = Field(ge=1)
    match_score: float = Field(gt=0, lt=1)   # a box counts as found at this score: per-image F1, cases, predict
    mask_boxes: bool                         # evaluate@<segmenter> also scores the boxes of its mask's components


class Export(Strict):
    """export@: the fp32 graph (``atol``: its largest difference to PyTorch) and its int8 quantisation, calibrated on
    ``int8_calibration_images`` of the method's training images and checked on every test set: a segmenter's mDice
    at most ``int8_max_dice_drop`` below the fp32 graph's, a detector's mean box F1 at most ``int8_max_f1_drop``
    below (else recorded as outside the budget, not failed). With more than one of ``int8_weight_bits``, each is
    quantised and the one whose score drops least on the validation images ships (the first listed on a tie)."""

    opset: int = Field(ge=17)
    atol: float = Field(gt=0)
    int8_calibration_images: int = Field(ge=1)
    int8_max_dice_drop: float = Field(ge=0)
    int8_max_f1_drop: float = Field(ge=0)
    # candidate weight ranges: 7 (no saturating u8 x s8 products on x86 CPUs without VNNI) and/or 8 (full range)
    int8_weight_bits: list[Literal[7, 8]] = Field(min_length=1)

    @field_validator("int8_weight_bits")
    @classmethod
    def _weight_bits(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"each weight range at most once, got {value}")
        return value


class Schedule(Strict):
    """Prefect: cron deployment on a ``process`` work pool (``flows/deploy.py``), task retries."""

    cron: str
    timezone: str = "UTC"
    deployment: str
    work_pool: str
    pool_concurrency: int | None = Field(None, ge=1)   # flow runs at once on the pool (1: one GPU)
    job_env: dict[str, str] = {}                        # env of each flow run on the worker host
    retries: int = Field(ge=0)
    retry_delay_s: int = Field(ge=0)


class Fanout(Strict):
    """Prefect flows: training and CV folds as parallel tasks on Dask (``flows/fanout.py``), each holding one
    unit of the Dask worker resource ``GPU``: at most one fit per GPU at a time."""

    enabled: bool = True
    address: str | None = None          # an existing Dask scheduler (tcp://host:8786); None: a local cluster
    devices: list[str] = Field(["0"], min_length=1)   # local cluster: one worker per entry, CUDA_VISIBLE_DEVICES
    threads_per_worker: int | None = Field(None, ge=1)  # torch/OpenMP threads per local worker; None: cores / workers


class Team(Strict):
    """Machines that share only a DVC remote, a git remote and the MLflow tracking server (README, Team setup)."""

    dvc_sync: bool = False              # flows pull from DVC's default remote and push to it; False: one machine
    git_remote: str = "origin"          # the git remote a worker clones the flow's commit from (remote fan-out)
    worker_cache: str | None = None     # one DVC cache for every clone the flows make on a host (~ expanded)


class Params(Strict):
    profile_name: str = "default"       # which profiles/<name>.yaml overlay the workspace holds (polypflow.settings.profiles)
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    paths: Paths
    tracking: Tracking
    ingest: Ingest
    validate_: Validate = Field(alias="validate")
    split: Split
    train: Train
    methods: dict[str, MethodSpec]
    external: dict[str, ExternalMethod] = {}
    crossval: Crossval
    lr_search: LrSearch = LrSearch()
    evaluate: Evaluate
    profile: Profile
    export: Export
    detection: Detection
    schedule: Schedule
    fanout: Fanout = Fanout()
    team: Team = Team()
    report: Report = Report()
    video: Video

    @model_validator(mode="after")
    def _methods_known(self) -> Params:
        named = [*self.train.methods, self.crossval.method, *self.lr_search.methods]
        missing = [m for m in named if m not in self.methods]
        if missing:
            raise ValueError(f"train.methods/crossval.method/lr_search.methods name {missing}, absent from methods: "
                             f"(configured: {', '.join(sorted(self.methods))})")
        clash = sorted(set(self.external) & set(self.methods))
        if clash:
            raise ValueError(f"external names {clash} are also keys of methods: (one name, one evaluation folder)")
        unpaired = sorted({m for pair in self.report.pairs for m in pair} - set(self.methods) - set(self.external))
        if unpaired:
            raise ValueError(f"report.pairs names {unpaired}, absent from methods:")
        unknown = [d for d in [*self.split.datasets, *self.split.unseen] if d not in self.ingest.datasets]
        if unknown:
            raise ValueError(f"split names datasets {unknown} that ingest.datasets does not define")
        overrides = [(f"methods.{m}.recipe", m, None) for m in self.methods]
        overrides += [("lr_search.recipe", m, self.lr_search.recipe) for m in self.lr_search.methods]
        for where, method, extra in [*overrides, ("crossval.recipe", self.crossval.method, self.crossval.recipe)]:
            try:  # the overrides are free-form dicts: check them now, not when a stage first merges them
                self.recipe(method, extra)
            except ValidationError as exc:
                raise ValueError("; ".join(f"{where}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                                           for err in exc.errors())) from None
        return self

    def video_datasets(self) -> list[str]:
        """The datasets whose images are frames of video sequences (``sequences`` in datasets.yaml)."""
        return [key for key, spec in self.ingest.datasets.items() if spec.sequences]

    def method_arch(self, method: str) -> tuple[str, dict[str, Any]]:
        """Registered architecture name and builder kwargs of configured method ``method``."""
        if method not in self.methods:
            raise KeyError(f"unknown method {method!r}; configured methods: {sorted(self.methods)}")
        spec = self.methods[method]
        return spec.arch or method, dict(spec.model)

    def recipe(self, method: str, extra: dict[str, Any] | None = None) -> Recipe:
        """The training recipe of ``method``: defaults, then the method's overrides, then ``extra``."""
        if method not in self.methods:
            raise KeyError(f"unknown method {method!r}; params.yaml defines {sorted(self.methods)}")
        merged = {**self.train.defaults.model_dump(), **self.methods[method].recipe, **(extra or {})}
        return Recipe.model_validate(merged)


class ParamsError(ValueError):
    """params.yaml (or a settings file beside it) is missing, unreadable or invalid; the message names the file
    and the key."""


# The settings beside params.yaml, split by who edits them (dvc.yaml's `vars` lists the same files): the method
# catalogue, the datasets' references and facts, and the infrastructure. params.yaml keeps the everyday knobs.
SETTINGS_FILES: dict[str, tuple[str, ...]] = {
    "methods.yaml": ("methods", "external"),
    "datasets.yaml": ("ingest",),
    "infra.yaml": ("tracking", "schedule", "fanout", "team"),
}


def read_settings(path: Path | str = DEFAULT_PARAMS) -> tuple[dict[str, Any], dict[str, Path]]:
    """params.yaml ``path`` and the settings files beside it, merged; and which file each top-level key came from.
    A file may be absent (its keys may then live in params.yaml); a key in two files is an error."""
    path = Path(path)
    data: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    for file in [path, *(path.parent / name for name in SETTINGS_FILES)]:
        if file != path and not file.exists():
            continue
        try:
            part = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ParamsError(f"{file}: cannot read parameters: {exc}") from exc
        if not isinstance(part, dict):
            raise ParamsError(f"{file}: expected a mapping of settings, found {type(part).__name__}")
        for key, value in part.items():
            if key in origin:
                raise ParamsError(f"{file}: key {key!r} is also set in {origin[key]}; set it in one file")
            data[key], origin[key] = value, file
    return data, origin


def split_settings(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One merged settings dict as the files that hold it: ``{"params.yaml": ..., "methods.yaml": ..., ...}``."""
    home = {key: name for name, keys in SETTINGS_FILES.items() for key in keys}
    files: dict[str, dict[str, Any]] = {DEFAULT_PARAMS.name: {}, **{name: {} for name in SETTINGS_FILES}}
    for key, value in data.items():
        files[home.get(key, DEFAULT_PARAMS.name)][key] = value
    return files


def describe(exc: ValidationError, origin: dict[str, Path] | None = None) -> str:
    """One line per problem: ``[file: ]dotted.key: message`` (a model-level check's message names its keys)."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        file = (origin or {}).get(str(err["loc"][0])) if err["loc"] else None
        problems.append(f"{file}: {where}: {err['msg']}" if file else f"{where}: {err['msg']}" if where else err["msg"])
    return "; ".join(problems)


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate ``path`` with the settings files beside it; raise :class:`ParamsError` naming the file
    and offending keys."""
    data, origin = read_settings(path)
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(f"{path}: invalid parameters: {describe(exc, origin)}") from exc


def find_project(start: Path) -> tuple[Path, Params] | None:
    """The nearest folder at or above ``start`` holding a params.yaml, with its settings (None without one)."""
    root = next((folder for folder in (start, *start.parents) if (folder / DEFAULT_PARAMS.name).is_file()), None)
    return (root, load_params(root / DEFAULT_PARAMS.name)) if root is not None else None
