"""``simpsons-ray query``: one question, its answer as a table in a format, and its pictures.
"""

from __future__ import annotations

import io
import logging
import sys
from dataclasses import dataclass
from typing import TextIO

import pandas as pd

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError
from simpsons_ray.query.columns import DEFAULT_MAX_GAP_S, DEFAULT_MIN_CONFIDENCE
from simpsons_ray.query.onscreen import NOBODY
from simpsons_ray.query.questions import at, check_nobody, frames, parse_time, screen_time, segments, summary, together
from simpsons_ray.query.reading import open_labels
from simpsons_ray.query.shotlist import shots

log = logging.getLogger("simpsons_ray.query")


DEFAULT_CONTACT_SHEET_FRAMES = 24


QUESTIONS = ("screen-time", "frames", "segments", "together", "summary", "at", "shots")


FORMATS = ("table", "csv", "json", "parquet")


SEGMENT_EXPORTS = ("srt", "vtt", "edl")  # segments only: see simpsons_ray.exports


@dataclass(frozen=True)
class QueryConfig:
    """One ``simpsons-ray query`` run: the question, its filters, and where answers go."""

    question: str  # one of QUESTIONS
    labels_uri: str
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    episodes: tuple[str, ...] = ()
    character: str | None = None
    format: str | None = None  # None: from --output's extension, else "table"
    output_uri: str | None = None
    plot_uri: str | None = None
    contact_sheet_uri: str | None = None
    max_gap_s: float = DEFAULT_MAX_GAP_S
    limit: int | None = None
    time: str | None = None  # at: seconds, MM:SS or HH:MM:SS
    frame: int | None = None  # at: a dump's frame number instead of a time
    timecode_fps: float | None = None  # segments: add SMPTE timecodes at this rate; the EDL's rate
    nobody: bool = False  # screen-time, segments, frames: the frames with no character on screen
    per_frame: bool = False  # answer from each frame alone, not from the answer pooled over its shot

    def __post_init__(self) -> None:
        if self.question not in QUESTIONS:
            raise UserError(f"Unknown question {self.question!r}: ask one of {', '.join(QUESTIONS)}.")
        if self.nobody and self.question not in ("screen-time", "segments", "frames"):
            raise UserError(f"--nobody applies to screen-time, segments and frames, not to `query {self.question}`.")
        check_nobody(self.character, self.nobody)
        if self.question == "frames" and not self.character and not self.nobody:
            raise UserError("`query frames` needs --character NAME, or --nobody for the frames with no character on screen.")
        if self.question == "at" and len(self.episodes) != 1:
            raise UserError("`query at` needs exactly one --episodes ID, and --time (12:34 or 754.2) or --frame N.")
        if self.question != "at" and (self.time is not None or self.frame is not None):
            raise UserError("--time and --frame apply to `query at` only.")
        if self.plot_uri and self.question not in ("screen-time", "segments", "together"):
            raise UserError("--plot draws screen-time, segments or together; for frames use --contact-sheet.")
        if self.contact_sheet_uri and self.question != "frames":
            raise UserError("--contact-sheet applies to `query frames` only.")
        if self.timecode_fps is not None and self.question != "segments":
            raise UserError("--timecode-fps applies to `query segments` only.")
        fmt = self.resolved_format
        if fmt in SEGMENT_EXPORTS and self.question != "segments":
            raise UserError(f"--format {fmt} exports segments: ask `query segments`.")
        if fmt not in FORMATS + SEGMENT_EXPORTS:
            raise UserError(f"Unknown --format {self.format!r}: use one of {', '.join(FORMATS + SEGMENT_EXPORTS)}.")
        if fmt == "parquet" and not self.output_uri:
            raise UserError("--format parquet writes a file: add --output FILE.parquet.")
        if self.output_uri and self.output_uri.endswith("/") and fmt not in SEGMENT_EXPORTS:
            raise UserError(f"--output {self.output_uri} is a folder: only --format srt, vtt or edl write one file per episode.")

    @property
    def resolved_format(self) -> str:
        if self.format:
            return self.format
        if self.output_uri and not self.output_uri.endswith("/"):
            extension = storage.basename(self.output_uri).rsplit(".", 1)[-1].lower()
            if extension in FORMATS + SEGMENT_EXPORTS:
                return extension
        return "table"


def ask(config: QueryConfig) -> pd.DataFrame:
    """Answer the config's question as a DataFrame (no output written)."""
    episodes = list(config.episodes) or None
    labels = open_labels(config.labels_uri, allow_empty=config.question == "summary", per_frame=config.per_frame)
    if config.question == "summary":
        return summary(labels, config.min_confidence, episodes)
    if config.question == "shots":
        return shots(labels, config.min_confidence, episodes)
    if config.question == "screen-time":
        return screen_time(labels, config.min_confidence, episodes, config.character, config.nobody)
    if config.question == "frames":
        return frames(labels, config.character, config.min_confidence, episodes, config.limit, config.nobody)
    if config.question == "together":
        return together(labels, config.min_confidence, episodes, config.character)
    if config.question == "segments":
        result = segments(labels, config.character, config.min_confidence, config.max_gap_s, episodes, config.nobody)
        if config.timecode_fps is not None and config.resolved_format not in SEGMENT_EXPORTS:
            from simpsons_ray.query import exports

            result = exports.with_timecodes(result, config.timecode_fps)
        return result
    if config.question == "at":
        time_s = parse_time(config.time) if config.time is not None else None
        return at(labels, config.episodes[0], time_s, config.frame, config.min_confidence)
    raise AssertionError(config.question)  # QueryConfig checked it


def run_query(config: QueryConfig, stdout: TextIO | None = None) -> pd.DataFrame:
    """The ``query`` subcommand: answer, print or write the table, draw the pictures."""
    stdout = stdout or sys.stdout
    result = ask(config)
    if config.limit is not None and config.question != "frames":
        result = result.head(config.limit)
    if config.resolved_format in SEGMENT_EXPORTS:
        _export_segments(config, result, stdout)
    else:
        data = render(result, config.resolved_format)
        if config.output_uri:
            storage.write_bytes(config.output_uri, data)
            log.info("wrote %d rows to %s", len(result), config.output_uri)
        else:
            stdout.write(data.decode())
            stdout.flush()
    if config.plot_uri:
        from simpsons_ray.query import charts as plots

        if config.question == "screen-time":
            plots.screen_time_chart(result, config.plot_uri)
        elif config.question == "together":
            plots.together_heatmap(result, config.plot_uri)
        else:
            plots.segments_timeline(result, config.plot_uri)
        log.info("wrote the chart to %s", config.plot_uri)
    if config.contact_sheet_uri:
        from simpsons_ray.query import charts as plots

        best = result.head(config.limit or DEFAULT_CONTACT_SHEET_FRAMES)
        who = NOBODY if config.nobody else config.character
        plots.contact_sheet(best, config.contact_sheet_uri, title=f"{who}: best {len(best)} frames")
        log.info("wrote the contact sheet to %s", config.contact_sheet_uri)
    return result


def _export_segments(config: QueryConfig, result: pd.DataFrame, stdout: TextIO) -> None:
    """Segments as SubRip, WebVTT or EDL: one file, stdout, or a folder (``--output DIR/``) with a file per episode."""
    from simpsons_ray.query import exports

    fmt, fps = config.resolved_format, config.timecode_fps or exports.DEFAULT_TIMECODE_FPS
    if config.output_uri and config.output_uri.endswith("/"):
        episodes = list(config.episodes) or open_labels(config.labels_uri).episodes
        for episode in episodes:
            mine = result[result["episode"] == episode]
            storage.write_bytes(storage.join(config.output_uri, f"{episode}.{fmt}"), exports.render(mine, fmt, fps).encode())
        log.info("wrote %d %s files to %s", len(episodes), fmt, config.output_uri)
        return
    text = exports.render(result, fmt, fps)
    if config.output_uri:
        storage.write_bytes(config.output_uri, text.encode())
        log.info("wrote %d segments as %s to %s", len(result), fmt, config.output_uri)
    else:
        stdout.write(text)
        stdout.flush()


def render(result: pd.DataFrame, fmt: str) -> bytes:
    """A result as bytes in one of FORMATS; ``table`` is for people, the others for programs."""
    if fmt == "csv":
        return result.to_csv(index=False).encode()
    if fmt == "json":
        return (result.to_json(orient="records", indent=2) + "\n").encode()
    if fmt == "parquet":
        buffer = io.BytesIO()
        result.to_parquet(buffer, index=False)
        return buffer.getvalue()
    if result.empty:
        return b"(no rows)\n"
    text = result.to_string(index=False, na_rep="-", float_format=_readable_float)
    return (text + "\n").encode()


def _readable_float(value: float) -> str:
    return f"{value:.3f}"
