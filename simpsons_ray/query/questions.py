"""The questions: screen time, a character's frames, segments, pairs on screen together, a summary, who is on screen at a moment.

Each takes a labels output (a URI, or a :class:`~simpsons_ray.query.reading.LabelsDataset`
already open) and returns a pandas DataFrame with the documented columns below.

Time: each frame stands for its episode's sampling interval, the median gap
between the episode's consecutive distinct timestamps (all rows, labelled or
not). A dump that keeps one frame in five at 24 fps therefore gives 5/24 s per
frame, and seconds are true seconds. An episode without timestamps (labelled
without ``--fps``) has null seconds.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from simpsons_ray.core.clock import clock
from simpsons_ray.core.errors import UserError
from simpsons_ray.labels import schema
from simpsons_ray.query.columns import (
    AT_COLUMNS,
    DEFAULT_MAX_GAP_S,
    DEFAULT_MIN_CONFIDENCE,
    FRAMES_COLUMNS,
    SCREEN_TIME_COLUMNS,
    SEGMENTS_COLUMNS,
    SUMMARY_COLUMNS,
)
from simpsons_ray.query.onscreen import (
    NOBODY,
    ON_SCREEN_COLUMNS,
    nobody_on_screen,
    on_screen,
    pairs_on_screen,
    rows_with_someone,
    segments_on_screen,
    together_across,
)
from simpsons_ray.query.reading import (
    TIME_EPSILON_S,
    LabelsDataset,
    as_labels,
    check_character,
    check_min_confidence,
    concat_frames,
    error_counts,
    labelled_filter,
    map_episodes,
    open_labels,
    read_episode,
    sampling_interval,
    select_episodes,
)

# ------------------------------------------------------------------ opening a dataset


# ----------------------------------------------------------------------- helpers


# ----------------------------------------------------------------------- queries
def check_nobody(character: str | None, nobody: bool) -> None:
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
    labels = as_labels(labels)
    min_confidence = check_min_confidence(min_confidence)
    check_nobody(character, nobody)
    selected = select_episodes(labels, episodes)

    def one_episode(episode: str) -> pd.DataFrame:
        table = read_episode(labels, episode, ["timestamp_s", *ON_SCREEN_COLUMNS])
        interval = sampling_interval(table["timestamp_s"])
        on = on_screen(table, min_confidence)
        counts = np.bincount(on.codes, minlength=len(on.names)).astype(np.int64)
        present = np.flatnonzero(counts)
        someone = rows_with_someone(table.num_rows, on)
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

    parts = [p for p in map_episodes(selected, one_episode) if len(p)]
    result = concat_frames(parts, SCREEN_TIME_COLUMNS, {"frames": "int64", "seconds": "float64", "share": "float64"})
    if character is not None:
        result = result[result["character"] == character]
        if result.empty:
            check_character(labels, character)
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
    labels = as_labels(labels)
    min_confidence = check_min_confidence(min_confidence)
    check_nobody(character, nobody)
    if character is None and not nobody:
        raise UserError("`query frames` needs --character NAME, or --nobody for the frames with no character on screen.")
    selected = select_episodes(labels, episodes)
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be a positive number of rows, got {limit}.")
    # A listed row may name the character whatever its label; an unlisted row must carry it as its label.
    # Frames with nobody can't be told apart in the scan (a null confidence is nobody too).
    row_filter = None if nobody else pc.field("characters").is_valid() | labelled_filter(min_confidence, character)
    sort_keys = [("confidence", "descending"), ("episode", "ascending"), ("frame", "ascending")]

    def one_episode(episode: str) -> pa.Table:
        table = read_episode(labels, episode, ["frame", "timestamp_s", "source", *ON_SCREEN_COLUMNS], row_filter)
        if nobody:
            on = nobody_on_screen(table, on_screen(table, min_confidence))
        else:
            on = on_screen(table, min_confidence, frozenset([character or ""]))
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

    tables = map_episodes(selected, one_episode)
    table = pa.concat_tables(tables) if tables else pa.schema([schema.LABELS_SCHEMA.field(c) for c in FRAMES_COLUMNS]).empty_table()
    table = table.take(pc.sort_indices(table, sort_keys=sort_keys))
    if limit is not None:
        table = table.slice(0, limit)
    if table.num_rows == 0 and character is not None:
        check_character(labels, character)
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
    labels = as_labels(labels)
    min_confidence = check_min_confidence(min_confidence)
    check_nobody(character, nobody)
    if max_gap_s < 0 or math.isnan(max_gap_s):
        raise UserError(f"--max-gap-s must be zero or more seconds, got {max_gap_s}.")
    selected = select_episodes(labels, episodes)

    def one_episode(episode: str) -> pd.DataFrame:
        table = read_episode(labels, episode, ["frame", "timestamp_s", *ON_SCREEN_COLUMNS])
        on = on_screen(table, min_confidence, frozenset([character]) if character is not None else frozenset())
        if nobody:
            on = nobody_on_screen(table, on)
        frame = table["frame"].to_numpy(zero_copy_only=False).astype(np.int64)
        timestamp = table["timestamp_s"].to_numpy(zero_copy_only=False).astype(np.float64)
        return segments_on_screen(episode, on, frame, timestamp, sampling_interval(table["timestamp_s"]), max_gap_s)

    parts = [p for p in map_episodes(selected, one_episode) if len(p)]
    result = concat_frames(
        parts,
        SEGMENTS_COLUMNS,
        {"start_s": "float64", "end_s": "float64", "duration_s": "float64", "frames": "int64", "first_frame": "int64", "last_frame": "int64"},
    )
    if character is not None and result.empty:
        check_character(labels, character)
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
    labels = as_labels(labels)
    min_confidence = check_min_confidence(min_confidence)
    selected = select_episodes(labels, episodes)

    def one_episode(episode: str) -> tuple[str, pd.DataFrame, float | None]:
        table = read_episode(labels, episode, ["timestamp_s", *ON_SCREEN_COLUMNS])
        return episode, pairs_on_screen(on_screen(table, min_confidence)), sampling_interval(table["timestamp_s"])

    result = together_across(map_episodes(selected, one_episode))
    if character is not None:
        result = result[(result["a"] == character) | (result["b"] == character)].reset_index(drop=True)
        if result.empty:
            check_character(labels, character)
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
    labels = as_labels(labels, allow_empty=True)
    min_confidence = check_min_confidence(min_confidence)
    errors = error_counts(labels.uri)
    if not labels.fragments and errors.empty:
        open_labels(labels.uri)  # raises the usual "no labels" sentence
    error_only = [e for e in (episodes or []) if e in errors.index and e not in labels.fragments]
    selected = select_episodes(labels, [e for e in episodes if e not in error_only] if episodes is not None else None)

    def one_episode(episode: str) -> dict:
        table = read_episode(labels, episode, ["label", "confidence", "characters", "character_scores", "model_id"])
        model_ids = sorted(v for v in pc.unique(table["model_id"]).to_pylist() if v is not None)
        mean = pc.mean(table["confidence"]).as_py()
        return {
            "episode": episode,
            "frames": table.num_rows,
            "labelled_frames": len(np.unique(on_screen(table, min_confidence).rows)),
            "mean_confidence": np.nan if mean is None else float(mean),
            "model_ids": ",".join(model_ids),
        }

    result = pd.DataFrame(map_episodes(selected, one_episode), columns=[c for c in SUMMARY_COLUMNS if c != "error_rows"])
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
    labels = as_labels(labels)
    min_confidence = check_min_confidence(min_confidence)
    if (time_s is None) == (frame is None):
        raise UserError("`query at` needs one of --time (seconds or MM:SS) or --frame N.")
    select_episodes(labels, [episode])
    table = read_episode(labels, episode, ["frame", "timestamp_s", "source", "label", "confidence", "characters", "character_scores"])
    table = table.take(pc.sort_indices(table, sort_keys=[("frame", "ascending")]))
    numbers = table["frame"].to_numpy(zero_copy_only=False).astype(np.int64)
    if frame is not None:
        hits = np.flatnonzero(numbers == int(frame))
        if not len(hits):
            raise UserError(f"Episode {episode} has no labelled frame {frame}: its frames run {numbers.min()} to {numbers.max()}.")
        row, asked = int(hits[0]), float("nan")
    else:
        assert time_s is not None  # one of the two is given: checked above
        row, asked = _row_at(episode, table, float(time_s)), float(time_s)
    picked_table = table.slice(row, 1)
    picked = picked_table.to_pylist()[0]
    on = on_screen(picked_table, min_confidence)
    shown: list[tuple[str | None, float | None]] = [(on.names[c], float(s)) for c, s in zip(on.codes, on.scores)]
    shown = shown or [(None, picked["confidence"] if picked["characters"] is None else None)]
    rows = [
        {"episode": episode, "asked_s": asked, "frame": picked["frame"], "timestamp_s": picked["timestamp_s"],
         "character": name, "confidence": score, "source": picked["source"]}
        for name, score in shown
    ]
    return pd.DataFrame(rows, columns=AT_COLUMNS).astype(
        {"asked_s": "float64", "frame": "int64", "timestamp_s": "float64", "confidence": "float64"})


def _row_at(episode: str, table: pa.Table, time_s: float) -> int:
    """Index of the row shown at ``time_s`` in a table sorted by frame."""
    times = table["timestamp_s"].to_numpy(zero_copy_only=False).astype(np.float64)
    if np.isnan(times).all():
        raise UserError(f"Episode {episode} has no timestamps (labelled without --fps): ask for a frame with --frame N instead of --time.")
    interval = sampling_interval(table["timestamp_s"]) or 0.0
    valid = np.flatnonzero(~np.isnan(times))
    order = valid[np.argsort(times[valid], kind="stable")]
    sorted_times = times[order]
    first, last = sorted_times[0], sorted_times[-1] + interval
    if time_s < first - TIME_EPSILON_S or time_s >= last + TIME_EPSILON_S:
        raise UserError(f"{clock(time_s, 3)} is outside episode {episode}: its labelled frames cover {clock(first, 3)} to {clock(last, 3)}.")
    position = int(np.searchsorted(sorted_times, time_s + TIME_EPSILON_S, side="right")) - 1
    shown = sorted_times[position]
    if time_s - shown >= interval + TIME_EPSILON_S:
        after = sorted_times[position + 1]
        raise UserError(
            f"Episode {episode} has no labelled frame at {clock(time_s, 3)}: the nearest are at {clock(shown, 3)} and {clock(after, 3)} "
            "(the frames between were not labelled; see `query summary` for error rows)."
        )
    return int(order[position])


# --------------------------------------------------------------------- the command


