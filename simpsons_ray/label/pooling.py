"""Who is on screen, pooled over a shot: one wrong frame does not cut an appearance in two or invent one.

Within each shot every character's score is replaced by its median over the
frames of a window of ``window_s`` seconds centred on the frame, the window never
crossing the shot's bounds (so a shot no longer than half the window pools all its
frames for every frame). A character is on screen where that pooled score reaches its
threshold: a majority vote of the window's frames, so a shot where one frame in
five is wrong answers the right character throughout, while a character who walks
in halfway through a long shot is still seen to walk in (the window is shorter
than the shot). A single-label model's pooled answer is its best pooled character,
when that reaches the threshold.

Frames without times (a dump labelled without ``--fps``) pool over ``window_frames``
frames instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simpsons_ray.label.shots import ShotSettings

POOL_CHOICES = ("shot", "none")
POOL_WINDOW_S = 3.0  # chosen on validation videos (bench/bench_shots.py)


@dataclass(frozen=True)
class PoolSettings:
    """How frame scores become the episode's answer; every marker keeps them, so a rerun with others is noticed."""

    method: str = "shot"  # "shot": pooled within shots; "none": every frame alone
    window_s: float = POOL_WINDOW_S
    window_frames: int = 5  # the window for frames without times
    shots: ShotSettings = field(default_factory=ShotSettings)

    def to_dict(self) -> dict[str, Any]:
        if self.method == "none":  # what labels written before pooling hold (settings.py): the answer is the frame's own
            return {"method": "none"}
        return {"method": self.method, "window_s": self.window_s, "window_frames": self.window_frames, "shots": self.shots.to_dict()}


def windows(times: np.ndarray | None, shots: np.ndarray, settings: PoolSettings) -> tuple[np.ndarray, np.ndarray]:
    """For each frame, the [lo, hi) rows it pools over: those of its shot within ``window_s / 2`` of it."""
    n = len(shots)
    first = np.searchsorted(shots, shots, side="left")
    end = np.searchsorted(shots, shots, side="right")
    if times is None:
        half = settings.window_frames // 2
        idx = np.arange(n)
        lo, hi = idx - half, idx + half + 1
    else:
        half_s = settings.window_s / 2
        lo = np.searchsorted(times, times - half_s - 1e-9, side="left")
        hi = np.searchsorted(times, times + half_s + 1e-9, side="right")
    return np.maximum(lo, first), np.minimum(hi, end)


def pool(scores: np.ndarray, times: np.ndarray | None, shots: np.ndarray, settings: PoolSettings) -> np.ndarray:
    """Frame scores N x C (frames in time order) -> pooled scores N x C, float32."""
    if settings.method == "none" or len(scores) == 0:
        return scores.astype(np.float32)
    lo, hi = windows(times, shots, settings)
    out = np.empty_like(scores, dtype=np.float32)
    # Frames that share a window share a median: a short shot is one computation.
    spans, first_of = np.unique(np.stack([lo, hi], axis=1), axis=0, return_inverse=True)
    medians = np.stack([np.median(scores[a:b], axis=0) for a, b in spans]).astype(np.float32)
    out[:] = medians[first_of.reshape(-1)]
    return out


def decide(scores: np.ndarray, thresholds: np.ndarray, multilabel: bool) -> np.ndarray:
    """Pooled scores N x C -> bool N x C: who is on screen (a single-label model: its best, at most one)."""
    if multilabel:
        return scores >= thresholds
    on = np.zeros(scores.shape, dtype=bool)
    if scores.size:
        best = scores.argmax(axis=1)
        rows = np.arange(len(scores))
        on[rows, best] = scores[rows, best] >= thresholds[best]
    return on
