"""What a labels row's ``source`` names, and how to take it apart.

A file URI, ``<archive URI>#<member>`` for a member of a tar or tar.gz archive, or
``<video URI>#t=<seconds>`` for a video frame (the seconds its presentation time).
"""

from __future__ import annotations

import math
from fractions import Fraction

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".ts")


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def split_source(source: str) -> tuple[str, str | None]:
    """``(file URI, None)``, ``(archive URI, member)`` or ``(video URI, "t=<seconds>")`` for a labels ``source``."""
    position = source.find("#")
    while position >= 0:
        head = source[:position].lower()
        if head.endswith(ARCHIVE_SUFFIXES) or (head.endswith(VIDEO_SUFFIXES) and source.startswith("t=", position + 1)):
            return source[:position], source[position + 1:]
        position = source.find("#", position + 1)
    return source, None


def frame_seconds(member: str) -> float | None:
    """The seconds a video source's ``t=<seconds>`` part names, or None when it names no time (finite, >= 0)."""
    if not member.startswith("t="):
        return None
    try:
        seconds = float(member[len("t="):])
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def format_seconds(t: Fraction | float) -> str:
    """Seconds as a source fragment: up to microseconds, no trailing zeros (``12.25``, ``3``)."""
    text = f"{float(t):.6f}".rstrip("0").rstrip(".")
    return text or "0"


def frame_source(uri: str, t: Fraction | float) -> str:
    return f"{uri}#t={format_seconds(t)}"
