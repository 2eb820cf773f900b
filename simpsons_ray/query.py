"""Questions asked of a labels dataset: screen time, a character's frames, segments, who is on screen together, summary, who is on screen at a moment.

Every function takes the URI of a labels output (local path or ``s3://``) in the
layout of :mod:`simpsons_ray.schema` and returns a pandas DataFrame::

    from simpsons_ray import query
    query.screen_time("out/labels", min_confidence=0.6)
    query.frames("out/labels", "ned_flanders", episodes=["s01e01"], limit=20)
    query.segments("out/labels", character="krusty_the_clown", max_gap_s=1.0)
    query.together("out/labels", character="homer_simpson")
    query.summary("out/labels")
    query.at("out/labels", "s01e05", query.parse_time("12:34"))
    query.screen_time("out/labels", nobody=True)  # adds a "(nobody)" row per episode

Who a row puts on screen (:func:`on_screen`, the one rule every question and the
report use): a row with a ``characters`` list (a multi-label model) puts each
listed character on screen whose score in ``character_scores`` is at least
``min_confidence``, so two characters on one frame both get the frame, and an
empty list means nobody. A row without a list (a single-label model's older
outputs) puts its ``label`` on screen when its ``confidence`` is at least
``min_confidence`` (the labeling job already left ``label`` null below its own
threshold; a null label or a null confidence is nobody). A row that puts nobody
on screen is what ``nobody=True`` (``--nobody``) counts, under the same
``min_confidence``.

Time: each frame stands for its episode's sampling interval, the median gap
between the episode's consecutive distinct timestamps (all rows, labelled or
not). A dump that keeps one frame in five at 24 fps therefore gives 5/24 s per
frame, and seconds are true seconds. An episode without timestamps (labelled
without ``--fps``) has null seconds.

How it stays fast on big outputs: the dataset is opened once (a listing, no file
is read), the episodes asked for select their partitions' files before anything
is opened, only the columns a question needs are read, filters are pushed into
the Parquet scan, and the work runs one episode at a time on a small thread pool,
so the peak memory is a few episodes' worth of a few columns, never the table.
"""

from __future__ import annotations

import difflib
import io
import logging
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, TextIO, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from simpsons_ray import schema, storage
from simpsons_ray.errors import UserError, first_line

log = logging.getLogger(__name__)

DEFAULT_MIN_CONFIDENCE = 0.0  # keep every label the labeling job wrote
# One second bridges a character lost for a few frames (a turned head, a blur)
# without joining two separate scenes.
DEFAULT_MAX_GAP_S = 1.0
DEFAULT_CONTACT_SHEET_FRAMES = 24
# Episodes read at once. pyarrow releases the GIL while it reads and decodes, and on
# S3 the threads mostly wait on the network; peak memory grows with this number.
READ_THREADS = min(8, 2 * (os.cpu_count() or 1))
# Timestamps come from frame / fps in floating point; gaps within this of the
# sampling interval are the same gap.
_TIME_EPSILON_S = 1e-6
# The character of --nobody's rows: parentheses keep it apart from any class name a model can have.
NOBODY = "(nobody)"
# The columns that say who a row puts on screen (see on_screen).
_ON_SCREEN_COLUMNS = ["label", "confidence", "characters", "character_scores"]

QUESTIONS = ("screen-time", "frames", "segments", "together", "summary", "at")
FORMATS = ("table", "csv", "json", "parquet")
SEGMENT_EXPORTS = ("srt", "vtt", "edl")  # segments only: see simpsons_ray.exports

SCREEN_TIME_COLUMNS = ["episode", "character", "frames", "seconds", "share"]
FRAMES_COLUMNS = ["episode", "frame", "timestamp_s", "confidence", "source"]
SEGMENTS_COLUMNS = ["episode", "character", "start_s", "end_s", "duration_s", "frames", "first_frame", "last_frame"]
TOGETHER_COLUMNS = ["a", "b", "frames", "seconds", "episodes"]
SUMMARY_COLUMNS = ["episode", "frames", "labelled_frames", "error_rows", "mean_confidence", "model_ids"]
AT_COLUMNS = ["episode", "asked_s", "frame", "timestamp_s", "character", "confidence", "source"]

T = TypeVar("T")


# ------------------------------------------------------------------ opening a dataset
@dataclass(frozen=True)
class LabelsDataset:
    """A labels output opened for querying: its files grouped by episode, none read yet."""

    uri: str
    dataset: pads.FileSystemDataset
    fragments: dict[str, list[pads.ParquetFileFragment]] = field(repr=False)

    @property
    def episodes(self) -> list[str]:
        return sorted(self.fragments)


def open_labels(labels_uri: str, allow_empty: bool = False) -> LabelsDataset:
    """List a labels output (no file is opened) and group its Parquet files by episode."""
    labels_uri = str(labels_uri)
    if not storage.exists(labels_uri):
        raise UserError(f"No labels at {labels_uri}: the path does not exist; pass the --output of `simpsons-ray label`.")
    if storage.is_file(labels_uri):
        raise UserError(
            f"{labels_uri} is a file, not a labels output: pass the folder that holds the episode=<id> folders."
        )
    try:
        dataset = schema.labels_dataset(labels_uri)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"Cannot list the labels at {labels_uri}: {first_line(exc).rstrip('.')}.") from None
    fragments: dict[str, list[pads.ParquetFileFragment]] = {}
    for fragment in dataset.get_fragments():
        episode = pads.get_partition_keys(fragment.partition_expression).get("episode")
        if episode is None:
            raise UserError(
                f"{labels_uri} is not a labels output: {storage.to_uri(dataset.filesystem, fragment.path)} is not inside an episode=<id> folder; "
                "pass the folder that holds the episode=<id> folders."
            )
        fragments.setdefault(episode, []).append(fragment)
    if not fragments and not allow_empty:
        raise UserError(
            f"No labels at {labels_uri}: it holds no episode=<id>/*.parquet files; "
            "pass the --output of `simpsons-ray label`."
        )
    return LabelsDataset(labels_uri, dataset, fragments)


def _as_labels(labels: str | LabelsDataset, allow_empty: bool = False) -> LabelsDataset:
    return labels if isinstance(labels, LabelsDataset) else open_labels(labels, allow_empty=allow_empty)


def _select_episodes(labels: LabelsDataset, episodes: Iterable[str] | None) -> list[str]:
    """The episodes to read, in order; unknown ones are a user error with suggestions."""
    if episodes is None:
        return labels.episodes
    wanted = list(dict.fromkeys(str(e) for e in episodes))
    missing = [e for e in wanted if e not in labels.fragments]
    if missing:
        raise UserError(
            f"No episode {missing[0]!r} in the labels at {labels.uri}"
            f"{_suggestions(missing[0], labels.episodes)}; list them with `simpsons-ray query summary`."
        )
    return sorted(wanted)


# Type families a column may have and still be read as the schema's type: a dataset
# written by another tool (Spark, DuckDB, pandas) may use int32 frames or large strings.
def _family(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _family(t.value_type)
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "floating"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return "list<" + _family(t.value_type) + ">"
    if pa.types.is_null(t):
        return "null"  # an all-null column written by a tool that could not infer a type
    return str(t)


def _check_fragment(labels: LabelsDataset, fragment: pads.ParquetFileFragment, columns: Sequence[str]) -> None:
    """Reject a file that lacks a needed column or has it with an unrelated type.

    pyarrow would silently read a missing column as nulls (the dataset has a fixed
    schema), so a wrong dataset must be caught here, by its footer.
    """
    try:
        physical = fragment.physical_schema
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"Cannot read {_file_uri(labels, fragment)} in the labels at {labels.uri}: {first_line(exc).rstrip('.')}.") from None
    for name in columns:
        if name == "episode":
            continue
        expected = schema.READ_SCHEMA.field(name).type
        index = physical.get_field_index(name)
        if index < 0 and name in schema.OPTIONAL_FILE_SCHEMA.names:
            continue  # read as null
        if index < 0:
            raise UserError(
                f"{labels.uri} is not a labels dataset: {_file_uri(labels, fragment)} has no column {name!r} "
                f"(a labels file has {', '.join(schema.LABELS_FILE_SCHEMA.names)})."
            )
        actual = physical.field(index).type
        if _family(actual) not in (_family(expected), "null"):
            raise UserError(
                f"{labels.uri} is not a labels dataset: column {name!r} of {_file_uri(labels, fragment)} is {actual}, "
                f"where the labels schema has {expected}."
            )


def _file_uri(labels: LabelsDataset, fragment: pads.ParquetFileFragment) -> str:
    return storage.to_uri(labels.dataset.filesystem, fragment.path)


def _read_episode(
    labels: LabelsDataset, episode: str, columns: Sequence[str], filter: pc.Expression | None = None
) -> pa.Table:
    """The given columns of one episode's rows (every file of its partition), filter applied in the scan."""
    tables = []
    for fragment in labels.fragments[episode]:
        _check_fragment(labels, fragment, columns)
        try:
            tables.append(fragment.to_table(schema=schema.READ_SCHEMA, columns=list(columns), filter=filter))
        except (OSError, pa.ArrowException) as exc:
            raise UserError(f"Cannot read {_file_uri(labels, fragment)} in the labels at {labels.uri}: {first_line(exc).rstrip('.')}.") from None
    if not tables:
        return schema.READ_SCHEMA.empty_table().select(list(columns))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _map_episodes(episodes: Sequence[str], work: Callable[[str], T]) -> list[T]:
    """``work(episode)`` for each episode on the read pool, results in episode order."""
    if len(episodes) <= 1:
        return [work(e) for e in episodes]
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(episodes))) as pool:
        return list(pool.map(work, episodes))


# ----------------------------------------------------------------------- helpers
def _check_min_confidence(min_confidence: float) -> float:
    value = float(min_confidence)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise UserError(f"--min-confidence must be between 0 and 1, got {min_confidence}.")
    return value


def _labelled(min_confidence: float, character: str | None = None) -> pc.Expression:
    """The scan filter of the rows whose ``label`` puts someone on screen when they have no ``characters`` list (see :func:`on_screen`)."""
    expr = pc.field("label").is_valid() & (pc.field("confidence") >= pc.scalar(min_confidence))
    if character is not None:
        expr = expr & (pc.field("label") == pc.scalar(character))
    return expr


def _labelled_mask(table: pa.Table, min_confidence: float) -> pa.ChunkedArray:
    mask = pc.and_kleene(pc.is_valid(table["label"]), pc.greater_equal(table["confidence"], min_confidence))
    return pc.fill_null(mask, False)


def _sampling_interval(timestamps: pa.ChunkedArray) -> float | None:
    """Median gap between consecutive distinct timestamps; None without two of them."""
    values = pc.drop_null(timestamps).to_numpy().astype(np.float64)
    values = np.unique(values[~np.isnan(values)])
    if len(values) < 2:
        return None
    return float(np.median(np.diff(values)))


def _frame_step(frames: np.ndarray) -> float:
    """Median gap between consecutive distinct frame numbers (1 for a full dump)."""
    values = np.unique(frames)
    return float(np.median(np.diff(values))) if len(values) >= 2 else 1.0


def _suggestions(name: str, known: Iterable[str]) -> str:
    known = sorted(set(known))
    lowered = name.lower()
    close = [k for k in known if lowered and lowered in k.lower()]
    close += [k for k in difflib.get_close_matches(name, known, n=5, cutoff=0.5) if k not in close]
    if close:
        return "; closest known names: " + ", ".join(close[:5])
    if known:
        return "; known names include " + ", ".join(known[:5])
    return ""


def known_characters(labels: str | LabelsDataset, episodes: Iterable[str] | None = None) -> list[str]:
    """Every distinct ``label`` or listed character in the dataset (or in the given episodes), sorted.

    Listed characters count too: a multi-label model may name a character on many
    frames without it ever being a frame's top-1 ``label``.
    """
    labels = _as_labels(labels)
    selected = _select_episodes(labels, episodes)

    def one_episode(episode: str) -> list[str]:
        table = _read_episode(labels, episode, ["label", "characters"])
        return pc.unique(pa.chunked_array([*table["label"].chunks, *pc.list_flatten(table["characters"]).chunks], pa.string())).to_pylist()

    names: set[str] = set()
    for part in _map_episodes(selected, one_episode):
        names.update(v for v in part if v is not None)
    return sorted(names)


def _check_character(labels: LabelsDataset, character: str) -> None:
    known = known_characters(labels)
    if character not in known:
        raise UserError(f"No character {character!r} in the labels at {labels.uri}{_suggestions(character, known)}.")


# ----------------------------------------------------------------------- queries
def _check_nobody(character: str | None, nobody: bool) -> None:
    if nobody and character is not None:
        raise UserError("--nobody counts the frames with no character on screen: drop --character, or drop --nobody.")


def screen_time(
    labels: str | LabelsDataset,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    episodes: Iterable[str] | None = None,
    character: str | None = None,
    nobody: bool = False,
) -> pd.DataFrame:
    """Per episode and character: ``frames``, ``seconds`` and ``share`` of the frames with anyone on screen.

    A frame counts for every character it puts on screen (:func:`on_screen`), so
    with a multi-label model shares add up to more than 1 where characters share
    frames; for single-label outputs they add up to 1. ``seconds`` is frames x the
    episode's sampling interval (null without timestamps). ``share`` is relative
    to the episode's frames with at least one character, also when ``character``
    keeps only one character's rows. ``nobody`` adds a row per episode whose
    character is :data:`NOBODY`, with the frames that put nobody on screen (its
    share is null: those frames are not part of the share's whole).
    """
    labels = _as_labels(labels)
    min_confidence = _check_min_confidence(min_confidence)
    _check_nobody(character, nobody)
    selected = _select_episodes(labels, episodes)

    def one_episode(episode: str) -> pd.DataFrame:
        table = _read_episode(labels, episode, ["timestamp_s", *_ON_SCREEN_COLUMNS])
        interval = _sampling_interval(table["timestamp_s"])
        on = on_screen(table, min_confidence)
        counts = np.bincount(on.codes, minlength=len(on.names)).astype(np.int64)
        present = np.flatnonzero(counts)
        someone = _rows_with_someone(table.num_rows, on)
        names, frame_counts = np.asarray(on.names, dtype=object)[present], counts[present]
        share = frame_counts / someone.sum()  # with nobody on screen there is no count to divide
        if nobody:
            names = np.append(names, NOBODY)
            frame_counts = np.append(frame_counts, np.int64(table.num_rows - someone.sum()))
            share = np.append(share, np.nan)
        result = pd.DataFrame({"episode": episode, "character": names, "frames": frame_counts})
        result["seconds"] = result["frames"] * interval if interval is not None else np.nan
        result["share"] = share
        return result

    parts = [p for p in _map_episodes(selected, one_episode) if len(p)]
    result = _concat(parts, SCREEN_TIME_COLUMNS, {"frames": "int64", "seconds": "float64", "share": "float64"})
    if character is not None:
        result = result[result["character"] == character]
        if result.empty:
            _check_character(labels, character)
    result = result.sort_values(["episode", "frames", "character"], ascending=[True, False, True], kind="stable")
    return result.reset_index(drop=True)


def frames(
    labels: str | LabelsDataset,
    character: str | None,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    episodes: Iterable[str] | None = None,
    limit: int | None = None,
    nobody: bool = False,
) -> pd.DataFrame:
    """That character's frames: episode, frame, timestamp_s, confidence, source; best first.

    ``confidence`` is the character's score on the frame: its ``character_scores``
    entry where the row lists characters, else the row's top-1 confidence. With
    ``nobody`` (and no character) the frames that put nobody on screen, their
    ``confidence`` the row's top-1 confidence, so the frames that came closest to
    naming someone come first. Ties in confidence keep episode and frame order.
    ``limit`` keeps the best N, selected per episode before the results meet, so
    a small N stays small.
    """
    labels = _as_labels(labels)
    min_confidence = _check_min_confidence(min_confidence)
    _check_nobody(character, nobody)
    if character is None and not nobody:
        raise UserError("`query frames` needs --character NAME, or --nobody for the frames with no character on screen.")
    selected = _select_episodes(labels, episodes)
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be a positive number of rows, got {limit}.")
    # A listed row may name the character whatever its label; an unlisted row must carry it as its label.
    # Frames with nobody can't be told apart in the scan (a null confidence is nobody too).
    row_filter = None if nobody else pc.field("characters").is_valid() | _labelled(min_confidence, character)
    sort_keys = [("confidence", "descending"), ("episode", "ascending"), ("frame", "ascending")]

    def one_episode(episode: str) -> pa.Table:
        table = _read_episode(labels, episode, ["frame", "timestamp_s", "source", *_ON_SCREEN_COLUMNS], row_filter)
        if nobody:
            on = nobody_on_screen(table, on_screen(table, min_confidence))
        else:
            on = on_screen(table, min_confidence, frozenset([character]))
        rows = pa.array(on.rows, pa.int64())
        table = pa.table(
            {
                "episode": pa.repeat(pa.scalar(episode, pa.string()), len(on.rows)),
                "frame": table["frame"].take(rows),
                "timestamp_s": table["timestamp_s"].take(rows),
                # float32 like the stored scores, so a score prints as the labels hold it.
                "confidence": pa.array(on.scores.astype(np.float32), pa.float32(), from_pandas=True),
                "source": table["source"].take(rows),
            }
        )
        if limit is not None and table.num_rows > limit:
            table = table.take(pc.sort_indices(table, sort_keys=sort_keys)[:limit])
        return table

    tables = _map_episodes(selected, one_episode)
    table = pa.concat_tables(tables) if tables else pa.schema([schema.LABELS_SCHEMA.field(c) for c in FRAMES_COLUMNS]).empty_table()
    table = table.take(pc.sort_indices(table, sort_keys=sort_keys))
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0 and not nobody:
        _check_character(labels, character)
    return table.to_pandas().reset_index(drop=True)


def segments(
    labels: str | LabelsDataset,
    character: str | None = None,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    max_gap_s: float = DEFAULT_MAX_GAP_S,
    episodes: Iterable[str] | None = None,
    nobody: bool = False,
) -> pd.DataFrame:
    """Continuous on-screen intervals per episode and character (see :func:`segments_on_screen`).

    Every character a frame puts on screen has the frame in its segments. With
    ``nobody`` (and no character) the stretches where nobody is on screen, as
    segments of the character :data:`NOBODY`.
    """
    labels = _as_labels(labels)
    min_confidence = _check_min_confidence(min_confidence)
    _check_nobody(character, nobody)
    if max_gap_s < 0 or math.isnan(max_gap_s):
        raise UserError(f"--max-gap-s must be zero or more seconds, got {max_gap_s}.")
    selected = _select_episodes(labels, episodes)

    def one_episode(episode: str) -> pd.DataFrame:
        table = _read_episode(labels, episode, ["frame", "timestamp_s", *_ON_SCREEN_COLUMNS])
        on = on_screen(table, min_confidence, frozenset([character]) if character is not None else frozenset())
        if nobody:
            on = nobody_on_screen(table, on)
        frame = table["frame"].to_numpy(zero_copy_only=False).astype(np.int64)
        timestamp = table["timestamp_s"].to_numpy(zero_copy_only=False).astype(np.float64)
        return segments_on_screen(episode, on, frame, timestamp, _sampling_interval(table["timestamp_s"]), max_gap_s)

    parts = [p for p in _map_episodes(selected, one_episode) if len(p)]
    result = _concat(
        parts,
        SEGMENTS_COLUMNS,
        {"start_s": "float64", "end_s": "float64", "duration_s": "float64", "frames": "int64", "first_frame": "int64", "last_frame": "int64"},
    )
    if character is not None and result.empty:
        _check_character(labels, character)
    return result


def together(
    labels: str | LabelsDataset,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    episodes: Iterable[str] | None = None,
    character: str | None = None,
) -> pd.DataFrame:
    """Each pair of characters on screen together: a, b (a < b), frames, seconds, episodes; longest first.

    Only a multi-label output (a ``characters`` column) can put two characters on
    one frame; a single-label output has no pairs. See :func:`together_across` for
    the seconds. ``character`` keeps the pairs it is in.
    """
    labels = _as_labels(labels)
    min_confidence = _check_min_confidence(min_confidence)
    selected = _select_episodes(labels, episodes)

    def one_episode(episode: str) -> tuple[str, pd.DataFrame, float | None]:
        table = _read_episode(labels, episode, ["timestamp_s", *_ON_SCREEN_COLUMNS])
        return episode, pairs_on_screen(on_screen(table, min_confidence)), _sampling_interval(table["timestamp_s"])

    result = together_across(_map_episodes(selected, one_episode))
    if character is not None:
        result = result[(result["a"] == character) | (result["b"] == character)].reset_index(drop=True)
        if result.empty:
            _check_character(labels, character)
    return result


def summary(
    labels: str | LabelsDataset,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    episodes: Iterable[str] | None = None,
) -> pd.DataFrame:
    """Per episode: frames (rows), labelled frames, error rows, mean confidence and model ids.

    ``labelled_frames`` counts the frames with at least one character on screen (the
    rule of :func:`on_screen`). ``mean_confidence`` is the mean top-1 confidence over all the episode's rows,
    labelled or not; ``model_ids`` lists the distinct model ids, comma-separated.
    Episodes whose every frame failed appear with their error rows and 0 frames.
    """
    labels = _as_labels(labels, allow_empty=True)
    min_confidence = _check_min_confidence(min_confidence)
    errors = _error_counts(labels.uri)
    if not labels.fragments and errors.empty:
        open_labels(labels.uri)  # raises the usual "no labels" sentence
    error_only = [e for e in (episodes or []) if e in errors.index and e not in labels.fragments]
    selected = _select_episodes(labels, [e for e in episodes if e not in error_only] if episodes is not None else None)

    def one_episode(episode: str) -> dict:
        table = _read_episode(labels, episode, ["label", "confidence", "characters", "character_scores", "model_id"])
        model_ids = sorted(v for v in pc.unique(table["model_id"]).to_pylist() if v is not None)
        mean = pc.mean(table["confidence"]).as_py()
        return {
            "episode": episode,
            "frames": table.num_rows,
            "labelled_frames": len(np.unique(on_screen(table, min_confidence).rows)),
            "mean_confidence": np.nan if mean is None else float(mean),
            "model_ids": ",".join(model_ids),
        }

    result = pd.DataFrame(_map_episodes(selected, one_episode), columns=[c for c in SUMMARY_COLUMNS if c != "error_rows"])
    if episodes is None:
        only_errors = sorted(set(errors.index) - set(result["episode"]))
    else:
        only_errors = sorted(set(error_only))
    if only_errors:
        empty = pd.DataFrame({"episode": only_errors, "frames": 0, "labelled_frames": 0, "mean_confidence": np.nan, "model_ids": ""})
        result = pd.concat([result, empty], ignore_index=True) if len(result) else empty
    result["error_rows"] = result["episode"].map(errors).fillna(0).astype(np.int64)
    result = result.astype({"frames": "int64", "labelled_frames": "int64", "mean_confidence": "float64"})
    return result[SUMMARY_COLUMNS].sort_values("episode", kind="stable").reset_index(drop=True)


def parse_time(text: str | float) -> float:
    """Seconds from ``754.2``, ``12:34``, ``12:34.5`` or ``1:02:03``; a user error otherwise."""
    raw = str(text).strip()
    parts = raw.split(":")
    try:
        if len(parts) > 3 or any(p.strip() == "" for p in parts):
            raise ValueError
        values = [float(p) for p in parts]
        if any(v < 0 or math.isnan(v) or math.isinf(v) for v in values) or any(v >= 60 for v in values[1:]):
            raise ValueError
    except ValueError:
        raise UserError(f"--time {raw!r} is not a time: write seconds (754.2), MM:SS (12:34) or HH:MM:SS (1:02:03.5).") from None
    seconds = 0.0
    for value in values:
        seconds = seconds * 60 + value
    return seconds


def at(
    labels: str | LabelsDataset,
    episode: str,
    time_s: float | None = None,
    frame: int | None = None,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
) -> pd.DataFrame:
    """Who is on screen in ``episode`` at ``time_s`` seconds (or at dump frame ``frame``): a row per character.

    The frame shown at ``t`` is the last one whose timestamp is at or before ``t``,
    as a video player shows it, provided ``t`` falls within its sampling interval;
    a gap in the labels (frames that failed) is a user error naming the nearest
    frames. Each row gives the character, its confidence and the frame it comes
    from; a frame with nobody labelled gives one row with a null character.
    """
    labels = _as_labels(labels)
    min_confidence = _check_min_confidence(min_confidence)
    if (time_s is None) == (frame is None):
        raise UserError("`query at` needs one of --time (seconds or MM:SS) or --frame N.")
    _select_episodes(labels, [episode])
    table = _read_episode(labels, episode, ["frame", "timestamp_s", "source", "label", "confidence", "characters", "character_scores"])
    table = table.take(pc.sort_indices(table, sort_keys=[("frame", "ascending")]))
    numbers = table["frame"].to_numpy(zero_copy_only=False).astype(np.int64)
    if frame is not None:
        hits = np.flatnonzero(numbers == int(frame))
        if not len(hits):
            raise UserError(f"Episode {episode} has no labelled frame {frame}: its frames run {numbers.min()} to {numbers.max()}.")
        row, asked = int(hits[0]), float("nan")
    else:
        row, asked = _row_at(episode, table, float(time_s)), float(time_s)
    picked_table = table.slice(row, 1)
    picked = picked_table.to_pylist()[0]
    on = on_screen(picked_table, min_confidence)
    shown = [(on.names[c], float(s)) for c, s in zip(on.codes, on.scores)]
    shown = shown or [(None, picked["confidence"] if picked["characters"] is None else None)]
    rows = [
        {"episode": episode, "asked_s": asked, "frame": picked["frame"], "timestamp_s": picked["timestamp_s"],
         "character": name, "confidence": score, "source": picked["source"]}
        for name, score in shown
    ]
    return pd.DataFrame(rows, columns=AT_COLUMNS).astype(
        {"asked_s": "float64", "frame": "int64", "timestamp_s": "float64", "confidence": "float64"})


@dataclass
class OnScreen:
    """Who a labels table puts on screen: one entry per (row, character), characters as codes into ``names``."""

    rows: np.ndarray  # int64 row index in the table
    codes: np.ndarray  # int64 index into names
    scores: np.ndarray  # float64
    names: list[str]


def on_screen(table: pa.Table, min_confidence: float = DEFAULT_MIN_CONFIDENCE, characters: frozenset[str] = frozenset()) -> OnScreen:
    """Every character each row of ``table`` puts on screen, best first within a row, as codes into ``names``.

    A row with a ``characters`` list (a multi-label model) names them all, each
    counted when its score reaches ``min_confidence`` or has no score; a row without
    one has its ``label``, counted when its ``confidence`` reaches ``min_confidence``
    (a null confidence never does). ``characters``, when given, keeps only those names.
    """
    has_list = pc.is_valid(table["characters"])
    row_parts, name_parts, score_parts = [], [], []
    if pc.any(has_list).as_py():
        listed = table.filter(has_list)
        listed_rows = np.flatnonzero(has_list.to_numpy(zero_copy_only=False))
        row_parts.append(listed_rows[pc.list_parent_indices(listed["characters"]).to_numpy()])
        name_parts.append(pc.list_flatten(listed["characters"]))
        scores = pc.list_flatten(listed["character_scores"])
        if len(scores) != len(name_parts[-1]):  # a file without scores: every listed character counts
            scores = pa.array(np.ones(len(name_parts[-1]), np.float32))
        score_parts.append(scores)
    single = pc.and_(pc.invert(has_list), pc.is_valid(table["label"]))
    row_parts.append(np.flatnonzero(single.to_numpy(zero_copy_only=False)))
    name_parts.append(table["label"].filter(single))
    score_parts.append(table["confidence"].filter(single))
    encoded = pc.dictionary_encode(pa.concat_arrays([_array(p).cast(pa.string()) for p in name_parts]))
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    dictionary = encoded.dictionary.to_pylist()
    rows = np.concatenate(row_parts).astype(np.int64)
    scores = np.concatenate([_array(p).to_numpy(zero_copy_only=False).astype(np.float64) for p in score_parts])
    listed = np.arange(len(scores)) < len(scores) - len(row_parts[-1])  # the listed characters come first
    with np.errstate(invalid="ignore"):
        keep = (scores >= min_confidence) | (listed & np.isnan(scores))
    if characters:
        keep &= np.isin(codes, [i for i, n in enumerate(dictionary) if n in characters])
    return OnScreen(rows[keep], codes[keep], scores[keep], dictionary)


def _rows_with_someone(rows: int, on: OnScreen) -> np.ndarray:
    """A mask of the ``rows`` rows: True where ``on`` puts at least one character on screen."""
    someone = np.zeros(rows, dtype=bool)
    someone[on.rows] = True
    return someone


def nobody_on_screen(table: pa.Table, on: OnScreen) -> OnScreen:
    """The rows of ``table`` where ``on`` (every character, unfiltered) puts nobody, as the one character :data:`NOBODY`.

    Each row's score is its top-1 ``confidence`` (NaN where null), so the frames
    that came closest to naming someone can be told from the empty ones.
    """
    rows = np.flatnonzero(~_rows_with_someone(table.num_rows, on))
    confidence = table["confidence"].to_numpy(zero_copy_only=False).astype(np.float64)
    return OnScreen(rows, np.zeros(len(rows), np.int64), confidence[rows], [NOBODY])


def segments_on_screen(
    episode: str, on: OnScreen, frame: np.ndarray, timestamp: np.ndarray, interval: float | None, max_gap_s: float
) -> pd.DataFrame:
    """One episode's on-screen segments per character (SEGMENTS_COLUMNS), from who its rows put on screen.

    ``frame`` and ``timestamp`` hold the episode's column for every row, as
    ``on.rows`` index them; ``interval`` is its sampling interval (None without
    timestamps). Each frame of a character covers ``[t, t + interval)``; a segment
    runs from its first frame's start to its last frame's end, so ``duration_s =
    end_s - start_s`` counts the last frame's interval too, and one frame alone
    lasts one interval. Two frames of a character join when the time neither
    covers, ``t2 - (t1 + interval)``, is at most ``max_gap_s``. Without timestamps
    the times are null and only frames adjacent in the dump join (the dump's step
    is the median gap between the episode's frame numbers). ``frames`` counts the
    character's frames inside. Sorted by start (first frame untimed), then name.
    """
    rows, codes = on.rows, on.codes
    timed = interval is not None
    if timed:
        known = ~np.isnan(timestamp[rows])
        rows, codes = rows[known], codes[known]
        position, step, allowed_gap, tolerance = timestamp[rows], interval, max_gap_s, _TIME_EPSILON_S
    else:
        position, step, allowed_gap, tolerance = frame[rows].astype(np.float64), _frame_step(frame), 0.0, 1e-9
    if not len(rows):
        return pd.DataFrame(columns=SEGMENTS_COLUMNS)
    names = np.asarray(on.names, dtype=object)
    frame = frame[rows]
    order = np.lexsort((frame, position, codes))
    codes, position, frame = codes[order], position[order], frame[order]
    # The time between the end of one frame's interval and the start of the next.
    uncovered = np.diff(position) - step
    starts = np.concatenate(([True], (np.diff(codes) != 0) | (uncovered > allowed_gap + tolerance)))
    segment_id = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.concatenate((first[1:] - 1, [len(codes) - 1]))
    count = np.bincount(segment_id).astype(np.int64)
    # In time (or frame) order, then by name; sorted here in numpy, which is several
    # times faster than sorting the DataFrame's string columns.
    name_rank = np.argsort(np.argsort(names, kind="stable"), kind="stable")
    by = np.lexsort((name_rank[codes[first]], position[first] if timed else frame[first]))
    first, last, count = first[by], last[by], count[by]
    start = position[first]
    end = position[last] + step
    return pd.DataFrame(
        {
            "episode": episode,
            "character": names[codes[first]],
            "start_s": start if timed else np.nan,
            "end_s": end if timed else np.nan,
            "duration_s": (end - start) if timed else np.nan,
            "frames": count,
            "first_frame": frame[first],
            "last_frame": frame[last],
        }
    )


def pairs_on_screen(on: OnScreen) -> pd.DataFrame:
    """a, b, frames: for each pair of characters (a < b) that ``on`` puts on one row, how many rows."""
    order = np.argsort(on.rows, kind="stable")
    rows, codes = on.rows[order], on.codes[order]
    shared = np.zeros(len(rows), dtype=bool)  # the entries of rows with two or more characters
    same = rows[1:] == rows[:-1]
    shared[1:] |= same
    shared[:-1] |= same
    if not shared.any():
        return pd.DataFrame({"a": pd.Series(dtype=object), "b": pd.Series(dtype=object), "frames": pd.Series(dtype=np.int64)})
    names = np.asarray(on.names, dtype=object)
    alphabetical = np.argsort(names, kind="stable")
    rank = np.argsort(alphabetical, kind="stable")  # code -> its place in name order
    entries = pd.DataFrame({"row": rows[shared], "rank": rank[codes[shared]]})
    joined = entries.merge(entries, on="row")  # every two characters of a row, both ways and each with itself
    a, b = joined["rank_x"].to_numpy(), joined["rank_y"].to_numpy()
    keep = a < b
    pair, frames = np.unique(a[keep] * len(names) + b[keep], return_counts=True)
    return pd.DataFrame(
        {"a": names[alphabetical[pair // len(names)]], "b": names[alphabetical[pair % len(names)]], "frames": frames.astype(np.int64)}
    )


def together_across(episodes: Iterable[tuple[str, pd.DataFrame, float | None]]) -> pd.DataFrame:
    """TOGETHER_COLUMNS from each episode's (episode, :func:`pairs_on_screen` table, sampling interval).

    ``seconds`` sums each episode's frames x its interval; a pair seen in an episode
    without timestamps has null seconds rather than the seconds of its timed
    episodes alone. ``episodes`` counts the episodes the pair shares. Longest
    first, then most frames, then by names.
    """
    parts = [
        pairs.assign(seconds=pairs["frames"] * (np.nan if interval is None else interval), episode=episode)
        for episode, pairs, interval in episodes
        if len(pairs)
    ]
    dtypes = {"frames": "int64", "seconds": "float64", "episodes": "int64"}
    if not parts:
        return _concat([], TOGETHER_COLUMNS, dtypes)
    joined = pd.concat(parts, ignore_index=True)
    grouped = joined.assign(untimed=joined["seconds"].isna()).groupby(["a", "b"])
    result = grouped.agg(frames=("frames", "sum"), seconds=("seconds", "sum"), untimed=("untimed", "any"), episodes=("episode", "nunique"))
    result.loc[result["untimed"], "seconds"] = np.nan
    result = result.reset_index().sort_values(["seconds", "frames", "a", "b"], ascending=[False, False, True, True], kind="stable")
    return result[TOGETHER_COLUMNS].astype(dtypes).reset_index(drop=True)


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _row_at(episode: str, table: pa.Table, time_s: float) -> int:
    """Index of the row shown at ``time_s`` in a table sorted by frame."""
    times = table["timestamp_s"].to_numpy(zero_copy_only=False).astype(np.float64)
    if np.isnan(times).all():
        raise UserError(f"Episode {episode} has no timestamps (labelled without --fps): ask for a frame with --frame N instead of --time.")
    interval = _sampling_interval(table["timestamp_s"]) or 0.0
    valid = np.flatnonzero(~np.isnan(times))
    order = valid[np.argsort(times[valid], kind="stable")]
    sorted_times = times[order]
    first, last = sorted_times[0], sorted_times[-1] + interval
    if time_s < first - _TIME_EPSILON_S or time_s >= last + _TIME_EPSILON_S:
        raise UserError(f"{_clock(time_s)} is outside episode {episode}: its labelled frames cover {_clock(first)} to {_clock(last)}.")
    position = int(np.searchsorted(sorted_times, time_s + _TIME_EPSILON_S, side="right")) - 1
    shown = sorted_times[position]
    if time_s - shown >= interval + _TIME_EPSILON_S:
        after = sorted_times[position + 1]
        raise UserError(
            f"Episode {episode} has no labelled frame at {_clock(time_s)}: the nearest are at {_clock(shown)} and {_clock(after)} "
            "(the frames between were not labelled; see `query summary` for error rows)."
        )
    return int(order[position])


def _clock(seconds: float) -> str:
    minutes, secs = divmod(max(0.0, float(seconds)), 60.0)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:06.3f}" if hours else f"{minutes}:{secs:06.3f}"


def _error_counts(labels_uri: str) -> pd.Series:
    """Rows of ``_errors/`` per episode (empty when the labeling recorded none)."""
    errors_uri = storage.join(labels_uri, schema.ERRORS_DIR)
    if not storage.is_dir(errors_uri):
        return pd.Series(dtype=np.int64)
    fs, path = storage.resolve(errors_uri)
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet", schema=schema.ERRORS_SCHEMA, ignore_prefixes=[".", "_"])
        episodes = dataset.to_table(columns=["episode"])["episode"]
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"Cannot read the error rows in {errors_uri}: {first_line(exc).rstrip('.')}.") from None
    counts = pc.value_counts(episodes)
    return pd.Series(
        counts.field("counts").to_numpy(zero_copy_only=False).astype(np.int64),
        index=[e if e is not None else "" for e in counts.field("values").to_pylist()],
        dtype=np.int64,
    )


def _concat(parts: list[pd.DataFrame], columns: list[str], dtypes: dict[str, str]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, "str")) for c in columns})
    return pd.concat(parts, ignore_index=True)[columns].astype(dtypes)


# --------------------------------------------------------------------- the command
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

    def __post_init__(self) -> None:
        if self.question not in QUESTIONS:
            raise UserError(f"Unknown question {self.question!r}: ask one of {', '.join(QUESTIONS)}.")
        if self.nobody and self.question not in ("screen-time", "segments", "frames"):
            raise UserError(f"--nobody applies to screen-time, segments and frames, not to `query {self.question}`.")
        _check_nobody(self.character, self.nobody)
        if self.question == "frames" and not self.character and not self.nobody:
            raise UserError("`query frames` needs --character NAME, or --nobody for the frames with no character on screen.")
        if self.question == "at" and len(self.episodes) != 1:
            raise UserError("`query at` needs exactly one --episode ID, and --time (12:34 or 754.2) or --frame N.")
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
    if config.question == "screen-time":
        return screen_time(config.labels_uri, config.min_confidence, episodes, config.character, config.nobody)
    if config.question == "frames":
        return frames(config.labels_uri, config.character, config.min_confidence, episodes, config.limit, config.nobody)
    if config.question == "together":
        return together(config.labels_uri, config.min_confidence, episodes, config.character)
    if config.question == "segments":
        result = segments(config.labels_uri, config.character, config.min_confidence, config.max_gap_s, episodes, config.nobody)
        if config.timecode_fps is not None and config.resolved_format not in SEGMENT_EXPORTS:
            from simpsons_ray import exports

            result = exports.with_timecodes(result, config.timecode_fps)
        return result
    if config.question == "at":
        time_s = parse_time(config.time) if config.time is not None else None
        return at(config.labels_uri, config.episodes[0], time_s, config.frame, config.min_confidence)
    return summary(config.labels_uri, config.min_confidence, episodes)


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
        from simpsons_ray import plots

        if config.question == "screen-time":
            plots.screen_time_chart(result, config.plot_uri)
        elif config.question == "together":
            plots.together_heatmap(result, config.plot_uri)
        else:
            plots.segments_timeline(result, config.plot_uri)
        log.info("wrote the chart to %s", config.plot_uri)
    if config.contact_sheet_uri:
        from simpsons_ray import plots

        best = result.head(config.limit or DEFAULT_CONTACT_SHEET_FRAMES)
        who = NOBODY if config.nobody else config.character
        plots.contact_sheet(best, config.contact_sheet_uri, title=f"{who}: best {len(best)} frames")
        log.info("wrote the contact sheet to %s", config.contact_sheet_uri)
    return result


def _export_segments(config: QueryConfig, result: pd.DataFrame, stdout: TextIO) -> None:
    """Segments as SubRip, WebVTT or EDL: one file, stdout, or a folder (``--output DIR/``) with a file per episode."""
    from simpsons_ray import exports

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


