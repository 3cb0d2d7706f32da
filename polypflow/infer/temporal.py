"""Temporal smoothing of probability maps along a video: an exponential moving average over past frames,
``p̃_t = w·p_t + (1 − w)·p̃_{t−1}``, ``w`` the weight of the current frame (1: off).

A segmenter is trained with one chosen on validation sequences (``train@``, ``video.smoothing``) and carries it in
its metadata (``smoothing``: the weight, whether it is on, and the validation figures it was chosen by), so the
predict CLI, the server and ``evaluate@`` apply the same one to consecutive frames.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

OFF = 1.0


@dataclass(frozen=True)
class Smoothing:
    """The moving average a model ships with: weight ``ema`` of the current frame, applied when ``enabled``."""

    ema: float = OFF
    enabled: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.ema <= 1:
            raise ValueError(f"smoothing weight of the current frame must be in (0, 1], got {self.ema}")

    @property
    def active(self) -> bool:
        return self.enabled and self.ema < OFF

    @classmethod
    def of(cls, meta: dict) -> Smoothing:
        """A model's smoothing from its metadata (none for models trained without one)."""
        stored = meta.get("smoothing") or {}
        return cls(float(stored.get("ema", OFF)), bool(stored.get("enabled", False)))

    def stream(self) -> Stream:
        """A stateful smoother for one video's frames, in order."""
        return Stream(self.ema)

    def apply(self, probs: Iterable[np.ndarray]) -> list[np.ndarray]:
        """The smoothed maps of one sequence's consecutive frames (the weight is applied whether enabled or not:
        callers decide that)."""
        stream = self.stream()
        return [stream(p) for p in probs]


class Stream:
    """The running average of one video: call it with each frame's probability map, in order."""

    def __init__(self, ema: float) -> None:
        self.ema, self.state = ema, None

    def __call__(self, prob: np.ndarray) -> np.ndarray:
        if self.state is None or self.state.shape != prob.shape:
            self.state = prob.astype(np.float32, copy=True)
        else:
            self.state = self.ema * prob + (1 - self.ema) * self.state
        return self.state


def smoothed(probs: Iterator[np.ndarray], smoothing: Smoothing) -> Iterator[np.ndarray]:
    """``probs`` of consecutive frames, smoothed when ``smoothing`` is active, else as they are."""
    if not smoothing.active:
        yield from probs
        return
    stream = smoothing.stream()
    for prob in probs:
        yield stream(prob)
