"""End-to-end FPS of ``predict`` on a video (decode + inference + encode), at a model input size, on this machine.

    python -m benchmarks.video_fps --method ic_polypseg_lite0 --size 352 [--frames ../shared/data/CVC-ClinicDB/images]

Encodes the frames of ``--frames`` (numbered images, in order; default CVC-ClinicDB's 612) to an H.264 mp4, then runs
:func:`polypflow.deploy.video.predict_video` on it with ``--method``'s architecture (``methods.yaml`` kwargs,
untrained: speed does not depend on the weights) at ``--size``, once as the PyTorch checkpoint and once as its ONNX
export, and prints frames, seconds and FPS per backend. Torch threads: the machine's cores (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from models import build_model
from polypflow.data.images import NORMALIZATION
from polypflow.deploy.load import load_predictor
from polypflow.deploy.video import predict_video
from polypflow.infer.predictor import SizeLimits
from polypflow.settings.config import load_params
from polypflow.tasks import task_of
from polypflow.train.checkpoint import save_trained

DEFAULT_FRAMES = Path("../shared/data/CVC-ClinicDB/images")


def numbered(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if re.search(r"\d+", p.stem)]
    return sorted(files, key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))


def encode(frames: list[Path], path: Path, rate: int = 25) -> None:
    with av.open(str(path), "w") as out:
        stream = None
        for file in frames:
            image = np.asarray(Image.open(file).convert("RGB"))
            if stream is None:
                stream = out.add_stream("libx264", rate=rate)
                stream.height, stream.width, stream.pix_fmt = image.shape[0], image.shape[1], "yuv420p"
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="ic_polypseg_lite0")
    p.add_argument("--size", type=int, default=352)
    p.add_argument("--frames", type=Path, default=DEFAULT_FRAMES)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params()
    arch, kwargs = params.method_arch(args.method)
    mean, std = NORMALIZATION["imagenet"]
    meta = {"arch": arch, "model_kwargs": kwargs, "image_size": args.size, "mean": list(mean), "std": list(std),
            "normalize": "imagenet", "threshold": 0.5}
    limits = SizeLimits(params.validate_.min_side, params.validate_.max_side)
    figures = {"method": args.method, "size": args.size, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_model(arch, **{**kwargs, "pretrained": "none"}).eval()
        save_trained(tmp / "model.pt", model, **meta)
        task = task_of(arch)
        task.export(model, meta, tmp / "model.onnx", params.export.opset)
        encode(numbered(args.frames), tmp / "video.mp4")
        for name in ("model.pt", "model.onnx"):
            _, predictor = load_predictor(str(tmp / name))
            result = predict_video(task, predictor, tmp / "video.mp4", tmp / f"out-{name}", limits, False,
                                   params.video.batch_size)
            figures[name] = {"frames": result.frames, "seconds": result.seconds, "fps": result.fps}
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
