"""Time as the project writes it: the one clock format for seconds, and the moment now.

Every time a person reads (a progress bar's ETA, a report's screen time, a query's
error message, a contact sheet's caption, a subtitle cue) goes through
:func:`clock`, so the same second looks the same everywhere; every timestamp a file
records (run summaries, markers) comes from :func:`now_iso`.
"""

from __future__ import annotations

import datetime as dt
import math


def clock(seconds: float | None, decimals: int = 0, always_hours: bool = False, decimal_mark: str = ".") -> str:
    """``m:ss`` (``h:mm:ss`` from an hour on) with ``decimals`` digits of the second; ``-`` for no number.

    Rounded once, to the last digit shown, so 59.9996 s reads ``1:00.000``, never
    ``0:60.000``. ``always_hours`` writes ``HH:MM:SS`` whatever the length (SubRip and
    WebVTT cues: ``clock(s, 3, True, ",")`` is ``00:01:02,500``). Negative seconds
    read as 0.
    """
    if seconds is None or not math.isfinite(seconds):
        return "-"
    scale = 10**decimals
    units = max(0, int(round(float(seconds) * scale)))
    whole, fraction = divmod(units, scale)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    tail = f"{secs:02d}" + (f"{decimal_mark}{fraction:0{decimals}d}" if decimals else "")
    if always_hours:
        return f"{hours:02d}:{minutes:02d}:{tail}"
    return f"{hours}:{minutes:02d}:{tail}" if hours else f"{minutes}:{tail}"


def now_iso() -> str:
    """The current UTC time to the second, ISO 8601 (``2026-12-07T17:18:00+00:00``), as files record it."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_stamp() -> str:
    """The current UTC time as a compact sortable stamp (``20261207T171800Z``), the start of a run's id."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def frame_time(timestamp_s: float | None, frame: int) -> str:
    """A frame's moment for a caption: ``12:34.5`` from its timestamp, or ``frame N`` when it has none."""
    if timestamp_s is None or (isinstance(timestamp_s, float) and math.isnan(timestamp_s)):
        return f"frame {frame}"
    return clock(timestamp_s, 1)
