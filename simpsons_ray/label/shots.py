"""Shot boundaries from a cheap signature of each frame the predictor already holds: no second decode of the video.

The signature (:func:`signature`, computed in the predictor on the model's input
picture) is a 64-bin joint colour histogram (4 levels a channel) and the mean
colour of each cell of a 4x4 grid: the histogram barely moves when the camera
pans or zooms over one picture, the grid tells two shots of one palette apart
(shot and reverse shot in one room).

A boundary lies before frame ``i`` when the frames of the ``window_s`` before it and
the frames of the ``window_s`` from it look unlike (:func:`change`): the distance
between the two windows' mean signatures. A hard cut gives a sharp peak of that
distance at its first frame; a dissolve gives a broader peak at its middle, found
as well at 2 frames/s as at every frame, because the windows span time, not
frames. A peak is a boundary when it reaches ``threshold`` and is the highest within
``min_shot_s`` on either side, so one transition gives one boundary.

Frames without times (a dump labelled without ``--fps``) are taken in frame order,
one frame a window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from simpsons_ray.labels.sampling import median_gap

if TYPE_CHECKING:
    import torch

HIST_LEVELS = 4  # levels per channel: 4**3 = 64 joint bins
GRID = 4  # GRID x GRID cells of mean colour
SIGNATURE_SIZE = HIST_LEVELS**3 + GRID * GRID * 3
SIGNATURE_VERSION = "hist64+grid4-v1"  # kept in every marker: another signature means other shots


@dataclass(frozen=True)
class ShotSettings:
    """How shots are cut; every marker keeps them, so a rerun with others is noticed."""

    threshold: float = 0.15  # chosen on validation videos (bench/bench_shots.py)
    window_s: float = 0.5  # seconds of frames on each side of a candidate boundary
    min_shot_s: float = 0.6  # two boundaries closer than this are one transition

    def to_dict(self) -> dict[str, Any]:
        return {"signature": SIGNATURE_VERSION, "threshold": self.threshold, "window_s": self.window_s, "min_shot_s": self.min_shot_s}


def signature(pixels: "torch.Tensor") -> "torch.Tensor":
    """uint8-range float pixels N x H x W x 3 (0..1) -> float32 signatures N x SIGNATURE_SIZE, on their device."""
    import torch

    n = pixels.shape[0]
    x = pixels.float().clamp(0.0, 1.0)
    levels = (x * (HIST_LEVELS - 1e-3)).long()  # 0..HIST_LEVELS-1
    codes = (levels[..., 0] * HIST_LEVELS + levels[..., 1]) * HIST_LEVELS + levels[..., 2]
    bins = HIST_LEVELS**3
    offsets = torch.arange(n, device=pixels.device).view(n, 1, 1) * bins
    hist = torch.bincount((codes + offsets).reshape(-1), minlength=n * bins).view(n, bins).float()
    hist = hist / hist.sum(dim=1, keepdim=True).clamp(min=1.0)
    grid = torch.nn.functional.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), GRID).reshape(n, -1)
    return torch.cat([hist, grid], dim=1).float()


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How unlike two (batches of) signatures are, 0..1: half the histograms' L1 and the grids' mean absolute difference, averaged."""
    bins = HIST_LEVELS**3
    hist = 0.5 * np.abs(a[..., :bins] - b[..., :bins]).sum(axis=-1)
    grid = np.abs(a[..., bins:] - b[..., bins:]).mean(axis=-1)
    return 0.5 * hist + 0.5 * np.minimum(1.0, 4.0 * grid)


def _spans(times: np.ndarray | None, n: int, window_s: float) -> tuple[np.ndarray, np.ndarray]:
    """For each frame i: the first frame of its window before (lo[i]) and the end of its window from it (hi[i])."""
    if times is None:
        idx = np.arange(n)
        return np.maximum(idx - 1, 0), np.minimum(idx + 1, n)
    reach = max(window_s, median_gap(times) or 1.0) + 1e-6
    lo = np.searchsorted(times, times - reach, side="left")
    hi = np.searchsorted(times, times + reach - 2 * 1e-6, side="right")
    # At least one frame on each side, however sparse or irregular the sampling.
    idx = np.arange(n)
    return np.maximum(np.minimum(lo, idx - 1), 0), np.maximum(hi, idx + 1)


def change(signatures: np.ndarray, times: np.ndarray | None, window_s: float) -> np.ndarray:
    """Per frame: the distance between the mean signature of the window before it and of the window from it (0 for the first)."""
    n = len(signatures)
    out = np.zeros(n, dtype=np.float64)
    if n < 2:
        return out
    lo, hi = _spans(times, n, window_s)
    sums = np.concatenate([np.zeros((1, signatures.shape[1])), np.cumsum(signatures, axis=0, dtype=np.float64)])
    i = np.arange(1, n)
    before = (sums[i] - sums[lo[1:]]) / (i - lo[1:])[:, None]
    after = (sums[hi[1:]] - sums[i]) / (hi[1:] - i)[:, None]
    out[1:] = distance(before, after)
    return out


def cut_shots(signatures: np.ndarray, times: np.ndarray | None, settings: ShotSettings = ShotSettings()) -> np.ndarray:
    """int32 shot index of each frame (frames in time order), 0-based."""
    n = len(signatures)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    d = change(signatures, times, settings.window_s)
    axis = times if times is not None else np.arange(n, dtype=np.float64)
    reach = settings.min_shot_s if times is not None else 1.0
    starts = np.zeros(n, dtype=bool)
    for i in np.flatnonzero(d >= settings.threshold):
        lo = np.searchsorted(axis, axis[i] - reach, side="left")
        hi = np.searchsorted(axis, axis[i] + reach, side="right")
        # The highest within reach; on a tie (a dissolve seen at two frames) the earlier one.
        if d[i] == d[lo:hi].max() and not starts[lo:i].any():
            starts[i] = True
    return np.cumsum(starts).astype(np.int32)
