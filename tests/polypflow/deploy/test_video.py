"""Video: predict on a video file or a folder of frames, the stability metric, and the moving average over frames."""

from __future__ import annotations

import base64
import io
import json
import logging

import av
import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, unless_present
from PIL import Image

from polypflow.data.images import resize_image
from polypflow.deploy import predict, serving
from polypflow.deploy.video import MASK, OVERLAY, SUMMARY, TABLE
from polypflow.evaluate.stability import Frame, aggregate, change, false_alarm, stability_table, tune_smoothing
from polypflow.infer.predictor import to_resolution
from polypflow.infer.temporal import Smoothing
from polypflow.tasks.segmentation import SegmentationTask
from polypflow.train.checkpoint import save_trained
from tests.polypflow.deploy.test_predict import LIMITS, META, store, tiny_unet, write_onnx  # noqa: F401 (store: a fixture)

CLINICDB = REPO.parent / "shared" / "data" / "CVC-ClinicDB" / "images"


def encode(path, frames, rate=25, lossless=True, **options) -> None:
    """``frames`` (RGB uint8) as an H.264 video; ``lossless``: RGB, so decoding gives them back to the pixel."""
    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream("libx264rgb" if lossless else "libx264", rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt, stream.options = ("rgb24", {"qp": "0"}) if lossless else ("yuv420p", {})
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())


def decode_masks(path) -> list[np.ndarray]:
    with av.open(str(path)) as video:
        return [f.to_ndarray(format="gray") >= 128 for f in video.decode(video=0)]


def disc_frames(n=12, h=96, w=128, step=4, radius=18):
    """A red disc moving right over grey, and its masks."""
    frames, masks = [], []
    for i in range(n):
        image = np.full((h, w, 3), 128, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        centre = (30 + step * i, h // 2)
        cv2.circle(image, centre, radius, (220, 40, 40), -1)
        cv2.circle(mask, centre, radius, 1, -1)
        frames.append(image)
        masks.append(mask.astype(bool))
    return frames, masks


def run_predict(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        predict.main([*map(str, args)])
        raise SystemExit(0)
    return exit_info.value.code


# --- the metric, against hand-computed values ------------------------------------------------------------------


@pytest.mark.quick
def test_flicker_and_false_alarms_match_hand_computed_values() -> None:
    """A 10×10 square moving 2 px a frame in a 40×40 frame changes 2 × (2 × 10) = 40 px = 0.025 of the frame per
    pair. A prediction that shows it on even frames only flips its 100 px each pair, 20 of them where the truth
    flips too; with a 1-px speck on frame 0 and a 3×3 one on frame 2, the spurious flips are 81, 89 and 89 px. The
    3×3 speck, away from the polyp, is a false alarm (1 of 4 frames); the 1-pixel one is below min_area."""
    truth, pred = [], []
    for t in range(4):
        square = np.zeros((40, 40), bool)
        square[10:20, 5 + 2 * t:15 + 2 * t] = True
        truth.append(square)
        pred.append(square.copy() if t % 2 == 0 else np.zeros_like(square))
    pred[2][30:33, 30:33] = True
    pred[0][35, 35] = True
    assert change(truth[0], truth[1]) == pytest.approx(40 / 1600)
    assert [false_alarm(p, g, min_area=4) for p, g in zip(pred, truth)] == [False, False, True, False]
    # pred changes: frame 0 -> 1: 100 + 1 (the speck), 1 -> 2: 100 + 9, 2 -> 3: 109
    frames = [Frame(t + 1, p, g) for t, (p, g) in enumerate(zip(pred, truth))]
    table = stability_table({"seq": frames[::-1]}, min_area=4, min_frames=3, max_gap=1)
    row = table.iloc[0]
    assert row["n_frames"] == 4 and row["n_pairs"] == 3 and not row["fragment"]
    assert row["true_change"] == pytest.approx(0.025)
    assert row["pred_change"] == pytest.approx((101 + 109 + 109) / 3 / 1600)
    assert row["flicker"] == pytest.approx((81 + 89 + 89) / 3 / 1600)
    follows = [Frame(t, g, g) for t, g in enumerate(truth)]
    assert stability_table({"s": follows}, 4, 3, 1).iloc[0]["flicker"] == 0
    assert row["false_alarm_rate"] == pytest.approx(0.25)


@pytest.mark.quick
def test_fragments_are_listed_but_not_aggregated() -> None:
    still = np.zeros((8, 8), bool)
    whole = [Frame(n, still, still) for n in (1, 2, 3)]
    sparse = [Frame(n, still, still) for n in (1, 9, 17)]
    short = [Frame(n, still, still) for n in (1, 2)]
    table = stability_table({"a": whole, "b": sparse, "c": short}, min_area=1, min_frames=3, max_gap=2)
    assert table["fragment"].tolist() == [False, True, True]
    summary = aggregate(table, n_boot=200, seed=0, confidence=0.95)
    assert summary["n_sequences"] == 1 and summary["n_fragments"] == 2 and summary["n_frames"] == 3
    assert summary["flicker"] == 0 and summary["false_alarm_rate"] == 0
    assert aggregate(table[table["fragment"]], 200, 0, 0.95) == {"n_sequences": 0, "n_fragments": 2, "n_frames": 0}


@pytest.mark.quick
def test_smoothing_is_chosen_on_flicker_within_the_dice_budget() -> None:
    """A steady polyp whose probability hovers around the threshold flickers raw; a moving average steadies it at
    no Dice cost, so a weight below 1 is chosen. With no budget for Dice and a blurring weight only, none is."""
    rng = np.random.default_rng(0)
    masks = np.zeros((20, 16, 16), np.uint8)
    masks[:, 4:12, 4:12] = 1
    probs = np.where(masks, 0.55, 0.05) + rng.normal(0, 0.1, masks.shape)
    probs = np.clip(probs, 0, 1).astype(np.float32)
    chosen = tune_smoothing(probs, masks, [list(range(10)), list(range(10, 20))], 0.5, [0.8, 0.5, 0.3], 0.005, True)
    assert chosen["ema"] < 1 and chosen["enabled"] and chosen["val_sequences"] == 2
    assert chosen["val_flicker"] < chosen["val_flicker_raw"]
    assert chosen["val_dice"] >= chosen["val_dice_raw"] - 0.005
    off = tune_smoothing(probs, masks, [list(range(10))], 0.5, [0.5], 0.005, False)
    assert off["enabled"] is False
    assert tune_smoothing(probs, masks, [[0], [1]], 0.5, [0.5], 0.005, True)["ema"] == 1.0


@pytest.mark.quick
def test_moving_average_weights_the_current_frame() -> None:
    stream = Smoothing(0.25, True).stream()
    first, second = np.ones((2, 2), np.float32), np.zeros((2, 2), np.float32)
    assert np.all(stream(first) == 1)
    assert np.allclose(stream(second), 0.75)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Smoothing(0.0)


# --- predict on video --------------------------------------------------------------------------------------------


def test_a_moving_disc_video_is_segmented_frame_by_frame(tmp_path) -> None:
    """The synthetic video through the CLI: one mask per frame (lossless), each close to the disc drawn, so the
    stability of the predicted masks is the truth's own (flicker ~0, no false alarm)."""
    frames, truth = disc_frames()
    encode(tmp_path / "disc.mp4", frames)
    write_onnx(tmp_path / "red.onnx")
    out = tmp_path / "out"
    assert run_predict("--model", tmp_path / "red.onnx", "--input", tmp_path / "disc.mp4", "--output", out) == 0
    masks = decode_masks(out / MASK)
    assert len(masks) == len(frames)
    dice = [2 * (m & g).sum() / (m.sum() + g.sum()) for m, g in zip(masks, truth)]
    assert min(dice) > 0.9
    table = pd.read_csv(out / TABLE)
    assert table["frame"].tolist() == list(range(1, len(frames) + 1))
    assert np.allclose(table["polyp_fraction"], [m.mean() for m in masks])
    row = stability_table({"disc": [Frame(i, m, g) for i, (m, g) in enumerate(zip(masks, truth))]}, 16, 5, 1).iloc[0]
    assert row["flicker"] < 0.01 and row["false_alarm_rate"] == 0
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["frames"] == len(frames) and summary["fps"] > 0 and summary["stopped"] is None
    with av.open(str(out / OVERLAY)) as overlay:
        assert overlay.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in overlay.decode(video=0)) == len(frames)


@unless_present(CLINICDB.is_dir(), "CVC-ClinicDB (../shared/data) is not on this machine")
def test_a_clinicdb_sequence_as_mp4_gives_the_masks_of_its_frames_one_by_one(tmp_path) -> None:
    """CVC-ClinicDB's first sequence (frames 1-10), encoded losslessly to mp4: predict --input x.mp4 writes the
    masks that predicting its PNG frames one by one writes (a trained-model checkpoint, no smoothing)."""
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = []
    for n in range(1, 11):
        image = np.asarray(Image.open(CLINICDB / f"{n}.png").convert("RGB"))
        Image.fromarray(image).save(folder / f"{n}.png")
        frames.append(image)
    encode(tmp_path / "seq.mp4", frames)
    save_trained(tmp_path / "model.pt", tiny_unet(), **META)
    model = tmp_path / "model.pt"
    assert run_predict("--model", model, "--input", tmp_path / "seq.mp4", "--output", tmp_path / "video") == 0
    assert run_predict("--model", model, "--input", folder, "--output", tmp_path / "stills") == 0
    assert run_predict("--model", model, "--input", folder, "--video", "--output", tmp_path / "folder") == 0
    one_by_one = [np.asarray(Image.open(tmp_path / "stills" / "masks" / f"{n}.png")) > 0 for n in range(1, 11)]
    for name in ("video", "folder"):
        masks = decode_masks(tmp_path / name / MASK)
        assert len(masks) == 10
        for n, (got, want) in enumerate(zip(masks, one_by_one), 1):
            assert np.array_equal(got, want), f"{name}: frame {n} differs in {(got != want).sum()} pixels"


def test_bad_videos_get_one_line_and_no_output_that_looks_complete(tmp_path, caplog) -> None:
    write_onnx(tmp_path / "red.onnx")
    frames, _ = disc_frames(n=30)
    rng = np.random.default_rng(0)  # noise: every frame costs about as many bytes, so half the file is half the frames
    frames = [np.clip(f + rng.integers(-20, 20, f.shape), 0, 255).astype(np.uint8) for f in frames]
    encode(tmp_path / "whole.mp4", frames, lossless=False, movflags="faststart")  # the index first: a cut file opens
    data = (tmp_path / "whole.mp4").read_bytes()
    (tmp_path / "broken.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video at all\n")
    with av.open(str(tmp_path / "ffv1.mkv"), "w") as out:  # then its codec id renamed to one FFmpeg does not know
        stream = out.add_stream("ffv1", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        out.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")))
        out.mux(stream.encode())
    (tmp_path / "codec.mkv").write_bytes((tmp_path / "ffv1.mkv").read_bytes().replace(b"V_FFV1", b"V_QQQQ"))
    expected = {"empty.mp4": "empty file", "text.mp4": "not a video", "codec.mkv": "cannot be decoded"}
    for name, words in expected.items():
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            code = run_predict("--model", tmp_path / "red.onnx", "--input", tmp_path / name, "--output", tmp_path / name[:-4])
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert code == 1 and len(errors) == 1 and name in errors[0] and words in errors[0], (name, errors)
        assert not (tmp_path / name[:-4]).exists() or not any((tmp_path / name[:-4]).iterdir())
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = run_predict("--model", tmp_path / "red.onnx", "--input", tmp_path / "broken.mp4", "--output", tmp_path / "broken")
    assert code == 3 and "broken.mp4" in caplog.records[-1].getMessage()
    summary = json.loads((tmp_path / "broken" / SUMMARY).read_text())
    assert 0 < summary["frames"] < 30 and "frame" in summary["stopped"]
    assert len(decode_masks(tmp_path / "broken" / MASK)) == summary["frames"]
    assert len(pd.read_csv(tmp_path / "broken" / TABLE)) == summary["frames"]
    assert not [p.name for p in (tmp_path / "broken").iterdir() if p.name.startswith(".")]


def test_a_model_shipping_smoothing_answers_alike_in_predict_serving_and_by_hand(tmp_path, store) -> None:
    """A checkpoint whose metadata turns its moving average on (w = 0.5): predict --input video.mp4, the pyfunc
    with params sequence=true and the average computed by hand at the model's size give the same masks; without
    sequence the server answers frame by frame, and --no-smoothing gives the raw masks."""
    import mlflow

    frames, _ = disc_frames(n=6, h=64, w=80, step=6, radius=12)
    encode(tmp_path / "disc.mp4", frames)
    meta = {**META, "smoothing": {"ema": 0.5, "enabled": True}}
    save_trained(tmp_path / "model.pt", tiny_unet(), **meta)
    with mlflow.start_run(experiment_id=store):
        info = serving.log_model(tiny_unet(), meta, LIMITS)
    served = mlflow.pyfunc.load_model(info.model_uri)
    reference = SegmentationTask.predictor(tiny_unet(), meta)
    small = np.stack([resize_image(f, reference.image_size) for f in frames])
    raw = reference.predict_resized(small)
    by_hand, state = [], None
    for prob in raw:
        state = prob if state is None else 0.5 * prob + 0.5 * state
        by_hand.append(to_resolution(state, frames[0].shape) >= meta["threshold"])
    unsmoothed = [to_resolution(p, frames[0].shape) >= meta["threshold"] for p in raw]
    assert any((a != b).any() for a, b in zip(by_hand, unsmoothed))  # the average changes something

    assert run_predict("--model", tmp_path / "model.pt", "--input", tmp_path / "disc.mp4", "--output", tmp_path / "on") == 0
    assert run_predict("--model", tmp_path / "model.pt", "--input", tmp_path / "disc.mp4", "--output", tmp_path / "off",
                       "--no-smoothing") == 0
    request = pd.DataFrame({"image": [base64.b64encode(png_bytes(f)).decode() for f in frames]})
    in_order = served.predict(request, params={"sequence": True})
    one_by_one = served.predict(request)
    decoded = lambda answers: [np.asarray(Image.open(io.BytesIO(base64.b64decode(m)))) > 0 for m in answers["mask"]]  # noqa: E731
    for got in (decode_masks(tmp_path / "on" / MASK), decoded(in_order)):
        assert all(np.array_equal(g, w) for g, w in zip(got, by_hand, strict=True))
    for got in (decode_masks(tmp_path / "off" / MASK), decoded(one_by_one)):
        assert all(np.array_equal(g, w) for g, w in zip(got, unsmoothed, strict=True))
    assert json.loads((tmp_path / "on" / SUMMARY).read_text())["smoothing"] == 0.5


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
