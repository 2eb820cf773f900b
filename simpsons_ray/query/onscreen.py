"""Who each row of a labels table puts on screen, and what follows from it: segments, and pairs on screen together.

The one rule every question and the report use (:func:`on_screen`): a row with a
``characters`` list (a multi-label model) puts each listed character on screen
whose score in ``character_scores`` is at least ``min_confidence``, so two
characters on one frame both get the frame, and an empty list means nobody. A row
without a list (a single-label model's older outputs) puts its ``label`` on screen
when its ``confidence`` is at least ``min_confidence``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from simpsons_ray.query.columns import DEFAULT_MIN_CONFIDENCE, SEGMENTS_COLUMNS, TOGETHER_COLUMNS
from simpsons_ray.query.reading import TIME_EPSILON_S, concat_frames, frame_step

# The character of --nobody's rows: parentheses keep it apart from any class name a model can have.


# The character of --nobody's rows: parentheses keep it apart from any class name a model can have.
NOBODY = "(nobody)"


# The columns that say who a row puts on screen (see on_screen).
ON_SCREEN_COLUMNS = ["label", "confidence", "characters", "character_scores"]


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


def rows_with_someone(rows: int, on: OnScreen) -> np.ndarray:
    """A mask of the ``rows`` rows: True where ``on`` puts at least one character on screen."""
    someone = np.zeros(rows, dtype=bool)
    someone[on.rows] = True
    return someone


def nobody_on_screen(table: pa.Table, on: OnScreen) -> OnScreen:
    """The rows of ``table`` where ``on`` (every character, unfiltered) puts nobody, as the one character :data:`NOBODY`.

    Each row's score is its top-1 ``confidence`` (NaN where null), so the frames
    that came closest to naming someone can be told from the empty ones.
    """
    rows = np.flatnonzero(~rows_with_someone(table.num_rows, on))
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
        position, step, allowed_gap, tolerance = timestamp[rows], interval, max_gap_s, TIME_EPSILON_S
    else:
        position, step, allowed_gap, tolerance = frame[rows].astype(np.float64), frame_step(frame), 0.0, 1e-9
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
        return concat_frames([], TOGETHER_COLUMNS, dtypes)
    joined = pd.concat(parts, ignore_index=True)
    grouped = joined.assign(untimed=joined["seconds"].isna()).groupby(["a", "b"])
    result = grouped.agg(frames=("frames", "sum"), seconds=("seconds", "sum"), untimed=("untimed", "any"), episodes=("episode", "nunique"))
    result.loc[result["untimed"], "seconds"] = np.nan
    result = result.reset_index().sort_values(["seconds", "frames", "a", "b"], ascending=[False, False, True, True], kind="stable")
    return result[TOGETHER_COLUMNS].astype(dtypes).reset_index(drop=True)


def _array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
