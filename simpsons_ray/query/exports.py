"""Segments as files other tools open: subtitle tracks (SubRip, WebVTT), an edit list (CMX 3600 EDL), SMPTE timecodes.

Every function takes a segments table as :func:`simpsons_ray.query.segments` returns it
(one row per continuous appearance of one character) and returns text::

    segs = query.segments("out/labels", episodes=["s01e05"])
    open("s01e05.srt", "w").write(exports.subtitles(segs, "srt"))
    open("s01e05.edl", "w").write(exports.edit_list(segs, fps=24))

A subtitle track names who is on screen: the episode's time is cut at every segment's
start and end, each piece names the characters whose segments cover it (longest on
screen first), and neighbouring pieces with the same names are one cue. A video player
shows it beside the episode. The edit list has one event per segment, with the
character in the clip name, so an editor's bin lists every appearance.
"""

from __future__ import annotations

import math
import unicodedata
from fractions import Fraction

import numpy as np
import pandas as pd

from simpsons_ray.core.clock import clock
from simpsons_ray.core.errors import UserError

SUBTITLE_FORMATS = ("srt", "vtt")
EDIT_FORMATS = ("edl",)
# The rates video tools use; 29.97 and 59.94 are NTSC's 30000/1001 and 60000/1001.
DROP_FRAME_RATES = (Fraction(30000, 1001), Fraction(60000, 1001))
DEFAULT_TIMECODE_FPS = 24.0


def display_name(character: str) -> str:
    """``homer_simpson`` -> ``Homer Simpson``: the folder names of the Kaggle data, as people write them.

    Control characters (a line break would end a cue, or start an EDL event) become spaces.
    """
    plain = _one_line(character)
    shown = " ".join(part.capitalize() for part in plain.replace("_", " ").split())
    return shown or "(no name)"  # a blank line would end the cue


def cue_text(name: str, fmt: str) -> str:
    """A name as a subtitle cue shows it, never read as markup.

    Players read tags in both formats (``<i>``, ``<b>``, ``<font ...>`` in SubRip, any
    ``<...>`` in WebVTT) and ``{\\...}`` styling in SubRip, and WebVTT forbids ``-->``
    in a cue: ``&``, ``<`` and ``>`` become entities (which both decode), and SubRip's
    braces become parentheses.
    """
    text = name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("{", "(").replace("}", ")") if fmt == "srt" else text


def _timed(segments: pd.DataFrame, what: str) -> pd.DataFrame:
    """The segments with times; an episode labelled without timestamps is a user error."""
    untimed = segments[segments["start_s"].isna()]
    if len(untimed):
        episode = untimed["episode"].iloc[0]
        raise UserError(
            f"Episode {episode} has no timestamps (its frames were labelled without --fps), so it has no {what}: "
            "relabel it with --fps RATE, or ask for --format csv."
        )
    return segments


def _one_episode(segments: pd.DataFrame, what: str) -> str | None:
    episodes = sorted(segments["episode"].unique())
    if len(episodes) > 1:
        raise UserError(
            f"A {what} is for one episode and these segments span {len(episodes)}: add --episode ID, "
            "or give --output a folder (ending in /) for one file per episode."
        )
    return episodes[0] if episodes else None


# ------------------------------------------------------------------ subtitles
def on_screen_cues(segments: pd.DataFrame) -> list[tuple[float, float, list[str]]]:
    """(start_s, end_s, characters) pieces of one episode with the same characters on screen, in time order.

    Characters are ordered by their total time on screen in the episode, so the same
    character keeps its place from cue to cue.
    """
    segments = _timed(segments, "subtitle track")
    if segments.empty:
        return []
    rank = {name: i for i, name in enumerate(
        segments.groupby("character")["duration_s"].sum().sort_values(ascending=False, kind="stable").index)}
    # Times to the microsecond: a frame's end (t + interval) and the next frame's start
    # differ in the last bits of a float, which would make cues a nanosecond long.
    starts, ends = np.round(segments["start_s"].to_numpy(float), 6), np.round(segments["end_s"].to_numpy(float), 6)
    bounds = np.unique(np.concatenate([starts, ends]))
    left, right = bounds[:-1], bounds[1:]
    # pieces x segments: which segments cover each piece between two consecutive bounds.
    covers = (starts[None, :] <= left[:, None]) & (ends[None, :] >= right[:, None])
    names = segments["character"].to_numpy(object)
    cues: list[tuple[float, float, list[str]]] = []
    for piece in range(len(left)):
        covering = sorted(set(names[covers[piece]]), key=rank.__getitem__)
        if not covering:
            continue
        if cues and cues[-1][2] == covering and math.isclose(cues[-1][1], left[piece], abs_tol=1e-6):
            cues[-1] = (cues[-1][0], float(right[piece]), covering)
        else:
            cues.append((float(left[piece]), float(right[piece]), covering))
    return cues


def subtitles(segments: pd.DataFrame, fmt: str) -> str:
    """A SubRip (``srt``) or WebVTT (``vtt``) track of one episode naming who is on screen."""
    if fmt not in SUBTITLE_FORMATS:
        raise UserError(f"Unknown subtitle format {fmt!r}: use one of {', '.join(SUBTITLE_FORMATS)}.")
    _one_episode(segments, "subtitle track")
    cues = on_screen_cues(segments)
    separator = "," if fmt == "srt" else "."
    blocks = []
    for number, (start, end, names) in enumerate(cues, start=1):
        text = ", ".join(cue_text(display_name(n), fmt) for n in names)
        timing = f"{clock(start, 3, True, separator)} --> {clock(end, 3, True, separator)}"
        blocks.append(f"{number}\n{timing}\n{text}\n")
    if fmt == "vtt":
        return "WEBVTT\n\n" + "\n".join(blocks)
    return "\n".join(blocks)


# ------------------------------------------------------------------ timecodes
def check_timecode_fps(fps: float) -> float:
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and 1 <= fps <= 120):
        raise UserError(f"--timecode-fps must be a frame rate between 1 and 120, got {fps}.")
    return float(fps)


def _rate(fps: float) -> tuple[Fraction, int, bool]:
    """(exact rate, nominal frames per timecode second, drop-frame) for a rate as people type it (29.97, 23.976, 25)."""
    for exact in DROP_FRAME_RATES:
        if abs(fps - float(exact)) < 0.005:
            return exact, round(float(exact)), True
    if abs(fps - 24000 / 1001) < 0.005:
        return Fraction(24000, 1001), 24, False  # 23.976 has no drop-frame timecode: it counts 24 a second
    return Fraction(fps).limit_denominator(1001), round(fps), False


def timecode(seconds: float, fps: float) -> str:
    """SMPTE ``HH:MM:SS:FF`` of the frame shown at ``seconds`` (``;`` before the frames in drop-frame timecode).

    29.97 and 59.94 use drop-frame timecode, as NTSC editors expect: frame numbers
    00 and 01 (00-03 at 59.94) are skipped at every minute but each tenth, so the
    timecode keeps to the clock.
    """
    exact, nominal, drop = _rate(check_timecode_fps(fps))
    frame = max(0, int(math.floor(Fraction(seconds).limit_denominator(10**6) * exact + Fraction(1, 10**6))))
    if drop:
        dropped = 2 * nominal // 30  # 2 at 29.97, 4 at 59.94
        per_ten_minutes = nominal * 600 - dropped * 9
        per_minute = nominal * 60 - dropped
        tens, rest = divmod(frame, per_ten_minutes)
        frame += dropped * 9 * tens + (dropped * ((rest - dropped) // per_minute) if rest > dropped else 0)
    ff = frame % nominal
    total_s = frame // nominal
    hh, mm, ss = total_s // 3600, (total_s // 60) % 60, total_s % 60
    return f"{hh:02d}:{mm:02d}:{ss:02d}{';' if drop else ':'}{ff:02d}"


def with_timecodes(segments: pd.DataFrame, fps: float) -> pd.DataFrame:
    """The segments with ``start_tc``, ``end_tc`` and ``duration_tc`` columns, for a spreadsheet or an editor's import."""
    segments = _timed(segments, "timecodes")
    out = segments.copy()
    out["start_tc"] = [timecode(s, fps) for s in segments["start_s"]]
    out["end_tc"] = [timecode(s, fps) for s in segments["end_s"]]
    out["duration_tc"] = [timecode(s, fps) for s in segments["duration_s"]]
    return out


def edit_list(segments: pd.DataFrame, fps: float = DEFAULT_TIMECODE_FPS, title: str | None = None) -> str:
    """A CMX 3600 edit decision list of one episode: one video event per segment, in time order.

    Source and record timecodes are the segment's times in the episode, so each
    event cuts that appearance out of the episode's own clip. The clip name is the
    episode; a comment line names the character.
    """
    episode = _one_episode(segments, "edit list")
    segments = _timed(segments, "edit list").sort_values(["start_s", "character"], kind="stable")
    _, _, drop = _rate(check_timecode_fps(fps))
    lines = [f"TITLE: {_one_line(title or episode or 'simpsons-ray')}", f"FCM: {'DROP FRAME' if drop else 'NON-DROP FRAME'}", ""]
    for number, row in enumerate(segments.itertuples(index=False), start=1):
        start, end = timecode(row.start_s, fps), timecode(row.end_s, fps)
        lines.append(f"{number:03d}  AX       V     C        {start} {end} {start} {end}")
        lines.append(f"* FROM CLIP NAME: {_one_line(row.episode)}")
        lines.append(f"* COMMENT: {display_name(row.character)} ({_one_line(row.character)}), {row.frames} frames")
        lines.append("")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    """A field stays on its line: control characters and line or paragraph separators become spaces."""
    return "".join(" " if unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") else c for c in str(text))


def render(segments: pd.DataFrame, fmt: str, timecode_fps: float = DEFAULT_TIMECODE_FPS) -> str:
    """One episode's segments as ``srt``, ``vtt`` or ``edl`` text."""
    if fmt in SUBTITLE_FORMATS:
        return subtitles(segments, fmt)
    if fmt in EDIT_FORMATS:
        return edit_list(segments, timecode_fps)
    raise UserError(f"Unknown export format {fmt!r}: use one of {', '.join(SUBTITLE_FORMATS + EDIT_FORMATS)}.")
