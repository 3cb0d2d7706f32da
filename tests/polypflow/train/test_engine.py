"""The trainer: checkpoints every epoch, exact resume after a crash, foreign checkpoints, early stopping,
threshold search and epoch selection, multi-scale and channels-last training, on tiny in-memory sets and the tiny
UNet (checkpoint files: test_checkpoint; the threshold search itself: tasks/test_segmentation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import build_model, method_entry
from models.tta import FlipTTA
from polypflow.data.images import ImageSet
from polypflow.infer.predictor import Predictor, TorchBackend
from polypflow.settings.config import Recipe, load_params
from polypflow.tasks import segmentation
from polypflow.tasks.segmentation import SegmentationTask, predict_probs
from polypflow.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from polypflow.train.engine import FitResult, fit, rescale
from tests.conftest import REPO, make_pair

CPU = torch.device("cpu")
SEED = 7
EPOCHS = 3


def image_set(seeds: range) -> ImageSet:
    pairs = [make_pair(s) for s in seeds]
    images = np.stack([np.asarray(image) for image, _ in pairs])
    masks = np.stack([(np.asarray(mask) > 127).astype(np.uint8) for _, mask in pairs])
    return ImageSet([f"synthetic/{s}" for s in seeds], images, masks)


TRAIN, VAL = image_set(range(100, 108)), image_set(range(200, 204))


def recipe(**overrides) -> Recipe:
    """The repository's default recipe, shrunk to 64 px, with augmentation on (resume must replay it)."""
    defaults = load_params(REPO / "params.yaml").train.defaults.model_dump()
    return Recipe.model_validate({**defaults, "image_size": 64, "epochs": EPOCHS, "batch_size": 4, "lr": 3e-3,
                                  "augment": "basic", "early_stop_patience": 10, "max_train_items": None,
                                  **overrides})


def task(r: Recipe) -> SegmentationTask:
    """The segmentation task of recipe ``r``, for training only (no settings needed)."""
    return SegmentationTask(None, r)


def tiny_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("unet", **{**method_entry("unet").test_kwargs, "pretrained": "none"})


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


class Crash(RuntimeError):
    """Stands in for a kill: raised from ``on_epoch`` after the checkpoint of that epoch is written."""


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[nn.Module, FitResult, dict, list[dict]]:
    """Run A: three epochs uninterrupted; what each epoch's checkpoint held when it was written."""
    ckpt = tmp_path_factory.mktemp("straight") / "checkpoint.pt"
    seen: list[dict] = []

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        state = load_checkpoint(ckpt)
        seen.append({"epoch": epoch, "saved_epoch": state["epoch"], "history": len(state["history"]),
                     "leftovers": leftovers(ckpt.parent), "metrics": metrics})

    model = tiny_unet()
    result = fit(model, recipe(), TRAIN, VAL, CPU, ckpt, SEED, task(recipe()), on_epoch=on_epoch,
                 checkpoint_extra={"fingerprint": "abc"})
    return model, result, load_checkpoint(ckpt), seen


def test_fit_lowers_train_loss_and_checkpoints_every_epoch(straight):
    model, result, final, seen = straight
    losses = [h["train_loss"] for h in result.history]
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert losses[-1] < losses[0]
    assert result.epochs_run == EPOCHS and not result.stopped_early
    assert [s["saved_epoch"] for s in seen] == [0, 1, 2]  # 0-based epoch in the file, written before on_epoch
    assert [s["history"] for s in seen] == [1, 2, 3]
    assert all(s["leftovers"] == [] for s in seen)  # no temporary file survives a save
    assert final["format"] == CHECKPOINT_FORMAT and final["fingerprint"] == "abc"
    best = result.history[result.best_epoch - 1]["val_dice"]
    assert result.best_score == best == max(h["val_dice"] for h in result.history)
    for key, value in model.state_dict().items():  # the model ends holding the best epoch's weights
        assert torch.equal(value, final["best_model"][key]), key


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous epoch's checkpoint intact and no temporary file."""
    ckpt = tmp_path / "checkpoint.pt"
    real_save, calls = torch.save, []

    def flaky_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        fit(tiny_unet(), recipe(augment="none"), image_set(range(100, 104)), VAL, CPU, ckpt, SEED,
            task(recipe(augment="none")))
    assert Path(calls[1]) != ckpt and Path(calls[1]).parent == tmp_path  # written beside, then renamed
    assert load_checkpoint(ckpt)["epoch"] == 0
    assert leftovers(tmp_path) == []


def test_resume_after_crash_equals_uninterrupted_run(straight, tmp_path):
    """Run B crashes after epoch 2, is resumed from its checkpoint, and ends exactly where run A ended."""
    model_a, result_a, final_a, _ = straight
    ckpt = tmp_path / "checkpoint.pt"

    def crash_after_two(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        fit(tiny_unet(), recipe(), TRAIN, VAL, CPU, ckpt, SEED, task(recipe()), on_epoch=crash_after_two)
    assert load_checkpoint(ckpt)["epoch"] == 1

    resumed_epochs: list[int] = []
    model_b = tiny_unet(seed=123)  # different initial weights: everything must come from the checkpoint
    result_b = fit(model_b, recipe(), TRAIN, VAL, CPU, ckpt, SEED, task(recipe()), resume=True,
                   on_epoch=lambda epoch, m: resumed_epochs.append(epoch))
    assert resumed_epochs == [3]
    final_b = load_checkpoint(ckpt)
    for key, value in final_a["model"].items():  # last-epoch weights, optimizer included in the path
        assert torch.allclose(value.float(), final_b["model"][key].float(), rtol=0, atol=1e-6), key
    for key, value in model_a.state_dict().items():  # best weights, which fit leaves in the model
        assert torch.allclose(value.float(), model_b.state_dict()[key].float(), rtol=0, atol=1e-6), key
    assert (result_b.best_epoch, result_b.epochs_run) == (result_a.best_epoch, result_a.epochs_run)
    assert result_b.best_score == pytest.approx(result_a.best_score, abs=1e-9)
    assert len(result_b.history) == len(result_a.history) == EPOCHS
    for a, b in zip(result_a.history, result_b.history, strict=True):
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9) for k in a), (a, b)


def test_resume_without_checkpoint_starts_fresh_and_no_resume_ignores_one(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    one = recipe(epochs=1, augment="none")
    small = image_set(range(100, 104))
    trained: list[int] = []
    first = fit(tiny_unet(), one, small, VAL, CPU, ckpt, SEED, task(one), resume=True,
                on_epoch=lambda e, m: trained.append(e))
    assert first.epochs_run == 1 and trained == [1]
    again = fit(tiny_unet(), one, small, VAL, CPU, ckpt, SEED, task(one), resume=True,
                on_epoch=lambda e, m: trained.append(e))
    assert trained == [1] and again.history == first.history  # already finished: nothing more is trained
    fresh = fit(tiny_unet(), one, small, VAL, CPU, ckpt, SEED, task(one), resume=False,
                on_epoch=lambda e, m: trained.append(e))
    assert trained == [1, 1] and len(fresh.history) == 1


def test_resume_from_foreign_checkpoint_raises(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    torch.save(tiny_unet().state_dict(), ckpt)
    with pytest.raises(ValueError, match="not a polypflow checkpoint"):
        fit(tiny_unet(), recipe(epochs=1), TRAIN, VAL, CPU, ckpt, SEED, task(recipe(epochs=1)), resume=True)


def frozen_unet() -> nn.Module:
    """With lr=0 and BatchNorm statistics frozen the network never changes, so val Dice never improves."""
    model = tiny_unet()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0
    return model


@pytest.mark.parametrize(("epochs", "patience", "expected_run", "stopped"), [(10, 2, 3, True), (3, 5, 3, False)])
def test_early_stopping_after_patience_epochs_without_improvement(tmp_path, epochs, patience, expected_run,
                                                                  stopped):
    model = frozen_unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = recipe(augment="none", epochs=epochs, early_stop_patience=patience).model_copy(update={"lr": 0.0})
    result = fit(model, frozen, image_set(range(100, 104)), VAL, CPU, tmp_path / "c.pt", SEED, task(frozen))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "num_batches" not in k)
    assert len({h["val_dice"] for h in result.history}) == 1
    assert result.epochs_run == len(result.history) == expected_run
    assert result.best_epoch == 1 and result.stopped_early is stopped
    if stopped:  # resuming a run that has stopped early trains nothing more
        again = fit(frozen_unet(), frozen, image_set(range(100, 104)), VAL, CPU, tmp_path / "c.pt", SEED,
                    task(frozen), resume=True)
        assert again.epochs_run == expected_run and again.stopped_early


def test_threshold_search_in_fit_is_reported(tmp_path):
    one = recipe(epochs=1, augment="none", threshold_search=True)
    result = fit(tiny_unet(), one, image_set(range(100, 104)), VAL, CPU, tmp_path / "c.pt", SEED, task(one))
    assert 0.05 <= result.threshold <= 0.95
    assert result.threshold == round(result.threshold, 2)


def test_searched_threshold_recipes_select_epochs_on_the_tuned_dice(tmp_path, monkeypatch):
    """Epoch 1 is right at 0.5 on half the pixels, epoch 2 under-confident (all polyp pixels at 0.3, Dice@0.5 = 0,
    Dice@0.3 = 1): with a searched threshold the model is used at its threshold, so epoch 2 must win."""
    masks = VAL.masks.astype(np.float32)
    half = masks.copy()
    half[:, :, : masks.shape[2] // 2] = 0
    scripted = iter([half * 0.9, masks * 0.3, TRAIN.masks * 0.3])  # epoch 1, epoch 2, the threshold search on train
    monkeypatch.setattr(segmentation, "predict_probs", lambda *args, **kwargs: next(scripted))
    searched = recipe(epochs=2, threshold_search=True)
    result = fit(tiny_unet(), searched, TRAIN, VAL, CPU, tmp_path / "c.pt", SEED, task(searched))
    first, second = result.history
    assert second["val_dice"] == 0.0 and second["val_dice_tuned"] == pytest.approx(1.0)
    assert 0 < first["val_dice"] < 1 and first["val_dice_tuned"] == pytest.approx(first["val_dice"])
    assert result.best_epoch == 2 and result.best_score == 0.0  # selected on the tuned Dice, reported at 0.5
    assert result.threshold <= 0.3  # the train search: only thresholds up to 0.3 see the polyp


def test_fixed_threshold_recipes_select_epochs_on_the_dice_at_05(tmp_path):
    result = fit(tiny_unet(), recipe(epochs=2), TRAIN, VAL, CPU, tmp_path / "c.pt", SEED, task(recipe(epochs=2)))
    assert "val_dice_tuned" not in result.history[0]
    assert result.best_score == max(h["val_dice"] for h in result.history)


@pytest.mark.quick
def test_predict_probs_shape_range_and_batching():
    model = tiny_unet()
    probs = predict_probs(model, VAL.images, "imagenet", CPU)
    assert probs.shape == (4, 64, 64) and probs.dtype == np.float32
    assert probs.min() >= 0 and probs.max() <= 1
    in_threes = Predictor(TorchBackend(model, "imagenet", CPU), 64, 0.5, batch_size=3).predict_resized(VAL.images)
    np.testing.assert_allclose(in_threes, probs, rtol=0, atol=1e-5)
    assert predict_probs(model, VAL.images[:0], "imagenet", CPU).shape == (0, 64, 64)


@pytest.mark.parametrize(("scale", "size"), [(1.0, 64), (0.5, 32), (0.75, 64), (1.5, 96), (2.0, 128)])
@pytest.mark.quick
def test_multiscale_rescale_keeps_masks_binary(scale, size):
    x = torch.rand(2, 3, 64, 64)
    y = torch.from_numpy(TRAIN.masks[:2]).float()[:, None]
    xs, ys = rescale(x, y, scale, task(recipe()))
    assert xs.shape == (2, 3, size, size) and ys.shape == (2, 1, size, size)
    assert set(torch.unique(ys).tolist()) <= {0.0, 1.0}
    for before, after in zip(y, ys, strict=True):  # the polyp keeps its share of the frame (no halo)
        assert after.mean().item() == pytest.approx(before.mean().item(), abs=0.006)
    if scale == 1.0:
        assert xs is x and ys is y


def test_fit_with_multiscale_training(tmp_path):
    ms = recipe(epochs=1, augment="none", multiscale=[0.5, 1.5])
    result = fit(tiny_unet(), ms, image_set(range(100, 104)), VAL, CPU, tmp_path / "c.pt", SEED, task(ms))
    assert np.isfinite(result.history[0]["train_loss"])


def test_channels_last_training_keeps_the_model_channels_last(tmp_path):
    model = tiny_unet()
    one = recipe(epochs=1, channels_last=True)
    fit(model, one, TRAIN, VAL, CPU, tmp_path / "c.pt", SEED, task(one))
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_ema_weights_are_validated_selected_and_shipped_and_resume_exactly(tmp_path):
    """With ``ema_decay`` the model ends holding the average (not the last raw weights), the raw weights' val Dice
    is recorded beside it, and a run crashed after epoch 1 and resumed ends where the uninterrupted run ends."""
    ema = recipe(epochs=2, ema_decay=0.5)
    straight_ckpt = tmp_path / "a.pt"
    model_a = tiny_unet()
    result_a = fit(model_a, ema, TRAIN, VAL, CPU, straight_ckpt, SEED, task(ema))
    saved = load_checkpoint(straight_ckpt)
    assert all({"val_dice", "val_dice_raw"} <= h.keys() for h in result_a.history)
    averaged = {k.removeprefix("module."): v for k, v in saved["ema"].items() if k.startswith("module.")}
    best = saved["best_model"]
    assert averaged.keys() == best.keys() == model_a.state_dict().keys()
    if result_a.best_epoch == 2:  # the last epoch's average is the checkpoint's
        assert all(torch.equal(averaged[k], best[k]) for k in best)
    assert any(not torch.equal(saved["model"][k], best[k]) for k in best if best[k].is_floating_point())
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, best[key]), key

    def crash_after_one(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 1:
            raise Crash

    ckpt = tmp_path / "b.pt"
    with pytest.raises(Crash):
        fit(tiny_unet(), ema, TRAIN, VAL, CPU, ckpt, SEED, task(ema), on_epoch=crash_after_one)
    model_b = tiny_unet(seed=5)
    result_b = fit(model_b, ema, TRAIN, VAL, CPU, ckpt, SEED, task(ema), resume=True)
    for key, value in model_a.state_dict().items():
        assert torch.allclose(value.float(), model_b.state_dict()[key].float(), rtol=0, atol=1e-6), key
    assert result_b.history[-1]["val_dice_raw"] == pytest.approx(result_a.history[-1]["val_dice_raw"], abs=1e-9)


def test_without_validate_raw_the_raw_weights_are_not_validated_and_training_is_unchanged(tmp_path):
    """``validate_raw: false`` drops the raw weights' diagnostic validation (``val_*_raw``, one pass an epoch): the
    run trains, selects and ships exactly what the run with it does."""
    with_raw, without = recipe(epochs=2, ema_decay=0.5), recipe(epochs=2, ema_decay=0.5, validate_raw=False)
    model_a, model_b = tiny_unet(), tiny_unet()
    result_a = fit(model_a, with_raw, TRAIN, VAL, CPU, tmp_path / "a.pt", SEED, task(with_raw))
    result_b = fit(model_b, without, TRAIN, VAL, CPU, tmp_path / "b.pt", SEED, task(without))
    assert all("val_dice_raw" in h for h in result_a.history)
    assert not any(k.endswith("_raw") for h in result_b.history for k in h)
    assert result_b.best_epoch == result_a.best_epoch
    assert [h["val_dice"] for h in result_b.history] == pytest.approx([h["val_dice"] for h in result_a.history],
                                                                       abs=1e-9)
    for key, value in model_a.state_dict().items():
        assert torch.allclose(value.float(), model_b.state_dict()[key].float(), rtol=0, atol=1e-6), key


def test_epochs_before_validate_from_are_trained_unvalidated_and_never_selected(tmp_path):
    """``validate_from: 2`` trains epoch 1 without a validation pass: its history row has no val_* and it cannot be
    selected; every epoch trains exactly as in the run that validates all of them."""
    every, late = recipe(epochs=2, ema_decay=0.5), recipe(epochs=2, ema_decay=0.5, validate_from=2)
    model_a, model_b = tiny_unet(), tiny_unet()
    result_a = fit(model_a, every, TRAIN, VAL, CPU, tmp_path / "a.pt", SEED, task(every))
    result_b = fit(model_b, late, TRAIN, VAL, CPU, tmp_path / "b.pt", SEED, task(late))
    assert set(result_b.history[0]) == {"epoch", "train_loss", "lr"}
    assert result_b.best_epoch == 2 and result_b.best_score == pytest.approx(result_a.history[1]["val_dice"], abs=1e-9)
    assert [h["train_loss"] for h in result_b.history] == pytest.approx([h["train_loss"] for h in result_a.history],
                                                                         abs=1e-9)
    saved_a, saved_b = load_checkpoint(tmp_path / "a.pt"), load_checkpoint(tmp_path / "b.pt")
    for weights in ("model", "ema"):
        for key, value in saved_a[weights].items():
            assert torch.allclose(value.float(), saved_b[weights][key].float(), rtol=0, atol=1e-6), (weights, key)


@pytest.mark.quick
def test_validate_from_after_the_last_epoch_is_refused():
    assert recipe(epochs=3, validate_from=3).validate_from == 3
    with pytest.raises(ValueError, match="validate_from: epoch 4 is after the last epoch"):
        recipe(epochs=3, validate_from=4)


@pytest.mark.quick
def test_resize_schedule_sizes_and_their_checks():
    r = recipe(epochs=5, resize_schedule=[[1, 32], [3, 64]])
    assert [r.train_size(e) for e in range(5)] == [32, 32, 64, 64, 64]
    assert recipe(resize_schedule=[[2, 32]]).train_size(0) == 64  # before the first entry: image_size
    for bad in ([[1, 48]], [[1, 96]], [[0, 32]], [[3, 32], [2, 64]], [[1, 32], [1, 64]]):
        with pytest.raises(ValueError, match="resize_schedule"):
            recipe(resize_schedule=bad)


def test_progressive_resizing_trains_each_epoch_at_its_size_and_validates_at_image_size(tmp_path):
    schedule = recipe(epochs=2, augment="none", multiscale=[1.0], resize_schedule=[[1, 32], [2, 64]])
    model, seen = tiny_unet(), []
    model.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape[-1])))
    epochs: list[int] = []
    fit(model, schedule, TRAIN, VAL, CPU, tmp_path / "c.pt", SEED, task(schedule),
        on_epoch=lambda epoch, m: epochs.append(len(seen)))
    first, second = seen[:epochs[0]], seen[epochs[0]:epochs[1]]
    assert {size for training, size in first if training} == {32}
    assert {size for training, size in second if training} == {64}
    assert {size for training, size in seen if not training} == {64}


@pytest.mark.quick
def test_distillation_needs_the_moving_average_and_a_distilled_epoch():
    assert recipe(ema_decay=0.5, distill_weight=1.0, distill_from=3).distill_from == 3
    with pytest.raises(ValueError, match="distill_weight: 1.0 needs ema_decay"):
        recipe(distill_weight=1.0)
    with pytest.raises(ValueError, match="distill_from: epoch 4 is after the last epoch"):
        recipe(ema_decay=0.5, distill_weight=1.0, distill_from=4)


@pytest.mark.quick
def test_the_soft_target_is_the_teachers_map_on_one_drawn_view_flipped_back():
    """Each draw is one view of the TTA (identity, h- or v-flip), flipped back; the draws cover every view, and a
    teacher without TTA gives its own map."""
    net = tiny_unet().eval()
    teacher = FlipTTA(net, "hvflip").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        views = {dims: torch.sigmoid(net(x.flip(dims) if dims else x)[0].flip(dims) if dims else net(x)[0])
                 for dims in ((), (3,), (2,))}
        rng = np.random.default_rng(0)
        seen = set()
        for _ in range(12):
            soft = task(recipe()).soft_target(teacher, x, rng)
            match = [dims for dims, view in views.items() if torch.allclose(soft, view, atol=1e-6)]
            assert len(match) == 1
            seen.add(match[0])
        assert seen == set(views)
        assert torch.allclose(task(recipe()).soft_target(net, x, rng), views[()], atol=1e-6)
    outputs = net(x)
    assert task(recipe()).distill_loss(outputs, views[()]) > 0


def test_distilled_epochs_train_differently_and_resume_exactly_and_earlier_ones_are_unchanged(tmp_path):
    """``distill_from: 2``: epoch 1 trains exactly as without distillation (the teacher's draws have their own
    generator); epoch 2 adds the loss towards the EMA's map, so it trains differently; a run crashed after epoch 2
    and resumed ends where the uninterrupted one ends."""
    plain_recipe = recipe(epochs=3, ema_decay=0.5, validate_raw=False)
    distilled = recipe(epochs=3, ema_decay=0.5, validate_raw=False, distill_weight=1.0, distill_from=2)
    model_a, model_b = tiny_unet(), tiny_unet()
    result_a = fit(model_a, plain_recipe, TRAIN, VAL, CPU, tmp_path / "a.pt", SEED, task(plain_recipe))
    result_b = fit(model_b, distilled, TRAIN, VAL, CPU, tmp_path / "b.pt", SEED, task(distilled))
    assert result_b.history[0]["train_loss"] == pytest.approx(result_a.history[0]["train_loss"], abs=1e-9)
    assert result_b.history[1]["train_loss"] != pytest.approx(result_a.history[1]["train_loss"], abs=1e-4)

    def crash_after_two(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        fit(tiny_unet(), distilled, TRAIN, VAL, CPU, tmp_path / "c.pt", SEED, task(distilled), on_epoch=crash_after_two)
    model_c = tiny_unet(seed=5)
    result_c = fit(model_c, distilled, TRAIN, VAL, CPU, tmp_path / "c.pt", SEED, task(distilled), resume=True)
    assert [h["train_loss"] for h in result_c.history] == pytest.approx([h["train_loss"] for h in result_b.history],
                                                                         abs=1e-9)
    for key, value in model_b.state_dict().items():
        assert torch.allclose(value.float(), model_c.state_dict()[key].float(), rtol=0, atol=1e-6), key
