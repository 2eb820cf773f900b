"""The columns of every answer, and the defaults the questions share."""

from __future__ import annotations

DEFAULT_MIN_CONFIDENCE = 0.0  # keep every label the labeling job wrote


# One second bridges a character lost for a few frames (a turned head, a blur)
# without joining two separate scenes.
DEFAULT_MAX_GAP_S = 1.0


SCREEN_TIME_COLUMNS = ["episode", "character", "frames", "seconds", "share"]


FRAMES_COLUMNS = ["episode", "frame", "timestamp_s", "confidence", "source"]


SEGMENTS_COLUMNS = ["episode", "character", "start_s", "end_s", "duration_s", "frames", "first_frame", "last_frame"]


TOGETHER_COLUMNS = ["a", "b", "frames", "seconds", "episodes"]


SUMMARY_COLUMNS = ["episode", "frames", "labelled_frames", "error_rows", "mean_confidence", "model_ids"]


AT_COLUMNS = ["episode", "asked_s", "frame", "timestamp_s", "character", "confidence", "source"]


SHOTS_COLUMNS = ["episode", "shot", "start_s", "end_s", "duration_s", "frames", "first_frame", "last_frame", "characters", "frames_with"]
