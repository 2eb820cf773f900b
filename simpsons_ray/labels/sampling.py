"""How often an episode was sampled: the one rule that labeling's shot cutter and every query use."""

from __future__ import annotations

import numpy as np


def median_gap(values: np.ndarray) -> float | None:
    """Median gap between consecutive distinct values (times in seconds, or frame numbers); None without two of them.

    The median, not the mean: a frame dump with a few missing frames, or a video
    read in ranges, keeps its sampling step.
    """
    distinct = np.unique(np.asarray(values, dtype=np.float64))
    distinct = distinct[~np.isnan(distinct)]
    return float(np.median(np.diff(distinct))) if len(distinct) >= 2 else None
