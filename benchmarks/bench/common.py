"""What every section shares: the run's :class:`Setup` and how a failed measurement is recorded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from polypflow.data.images import NORMALIZATION
from polypflow.evaluate.profiling import latency

MEAN, STD = NORMALIZATION["imagenet"]


@dataclass
class Setup:
    """Everything a measurement needs to know about the run."""

    device: torch.device
    amp_dtype: torch.dtype
    warmup: int
    iterations: int
    compile_mode: str
    workdir: Path
    quick: bool = False
    backends: Sequence[str] = ()
    notes: list[str] = field(default_factory=list)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], object], batch: int) -> dict:
        stats = latency(fn, self.warmup, self.iterations, self.sync)
        return {**stats, "fps": 1e3 * batch / stats["p50_ms"]}


def failure(exc: BaseException) -> str:
    """``"failed: <type>: <message>"`` on one line, at most 300 characters of it: failures are data."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return f"failed: {text[:300]}"
