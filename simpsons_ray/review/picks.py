"""Which frames a person should look at: a key per frame (lowest first), then an order spread over episodes and shots.

- ``uncertain``: how close a frame's scores are to the model's decision. A
  multi-label model decides each character alone, at its own threshold, so a
  frame's key is the smallest distance, in logit space, of any of its top scores
  from that character's threshold (``|logit(p) - logit(t)|``: 0.45 against 0.5 is
  as close as 0.95 against 0.96 is not, and logits say so). A softmax model
  decides by its top-1, so the key is the margin top-1 minus top-2.
- ``random``: a seeded uniform key, the same on every run with the same seed.
- ``character:NAME``: the frames whose answer names NAME, keyed by NAME's score,
  the weakest first.

Spread (uncertain and character): the frames of one shot look alike, so each
episode offers the best frame of every shot first, then the second best of every
shot, and so on; episodes take turns at each of those levels. 500 picks are then
500 shots, not 500 frames of the one shot the model finds hardest. ``min_gap_s``
keeps any two picked frames of an episode that far apart in time.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from simpsons_ray.core.errors import UserError

KINDS = ("uncertain", "random", "character")
# Scores are float32 probabilities; clipping keeps a saturated 0 or 1 a finite logit.
_EPSILON = 1e-7


@dataclass(frozen=True)
class Pick:
    """What to pick: ``uncertain``, ``random`` or ``character`` (with its name)."""

    kind: str
    character: str | None = None

    @classmethod
    def parse(cls, text: str) -> Pick:
        kind, _, name = str(text).partition(":")
        if kind == "character" and name.strip():
            return cls("character", name.strip())
        if kind in ("uncertain", "random") and not name:
            return cls(kind)
        raise UserError(f"Unknown --pick {text!r}: use uncertain, random or character:NAME.")

    @property
    def spread(self) -> bool:
        """Whether picks are spread over shots and episodes (a random pick is uniform instead)."""
        return self.kind != "random"

    def __str__(self) -> str:
        return f"character:{self.character}" if self.kind == "character" else self.kind


@dataclass(frozen=True)
class Decision:
    """How the model turns scores into an answer: its classes, its objective, a multi-label model's thresholds."""

    classes: tuple[str, ...]
    multilabel: bool
    thresholds: tuple[float, ...] = ()


def _lists(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list column flattened: (values, the row of each, its position within its row's list)."""
    lists = table[column].combine_chunks()
    values = pc.list_flatten(lists)
    rows = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    first = np.searchsorted(rows, rows, side="left")  # rows are in order: a row's first value's index
    return values.to_numpy(zero_copy_only=False), rows, np.arange(len(rows)) - first


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPSILON, 1 - _EPSILON)
    return np.log(p) - np.log1p(-p)


def uncertainty(table: pa.Table, decision: Decision) -> np.ndarray:
    """Each row's distance from the model's decision (``top_labels``, ``top_scores``); inf for a row without scores."""
    key = np.full(table.num_rows, np.inf)
    names, rows, positions = _lists(table, "top_labels")
    scores, score_rows, _ = _lists(table, "top_scores")
    if len(scores) != len(names) or not np.array_equal(rows, score_rows):
        raise ValueError("top_labels and top_scores differ in length")  # the labeling job writes them together
    scores = scores.astype(np.float64)
    if decision.multilabel:
        index = {name: i for i, name in enumerate(decision.classes)}
        codes = np.array([index.get(n, -1) for n in names], np.int64)
        known = codes >= 0  # a name the model does not have: labels of another model, no threshold to measure from
        thresholds = np.asarray(decision.thresholds, np.float64)
        distance = np.abs(_logit(scores[known]) - _logit(thresholds[codes[known]]))
        np.minimum.at(key, rows[known], distance)
        return key
    top1 = np.full(table.num_rows, np.nan)
    top2 = np.zeros(table.num_rows)
    top1[rows[positions == 0]] = scores[positions == 0]
    top2[rows[positions == 1]] = scores[positions == 1]
    margin = top1 - top2
    return np.where(np.isnan(margin), np.inf, margin)


def answers(table: pa.Table) -> list[tuple[str, ...]]:
    """Each row's answer: its ``characters`` where it has the list, else its ``label`` ([] for none): as query reads it."""
    listed = table["characters"].to_pylist()
    labels = table["label"].to_pylist()
    return [tuple(c for c in chars if c) if chars is not None else ((label,) if label else ()) for chars, label in zip(listed, labels)]


def character_score(table: pa.Table, character: str) -> np.ndarray:
    """Each row's score for ``character`` where its answer names it (NaN elsewhere): its ``character_scores`` entry, or ``confidence``."""
    score = np.full(table.num_rows, np.nan)
    names, rows, _ = _lists(table, "characters")
    values, value_rows, _ = _lists(table, "character_scores")
    hit = names == character
    if len(values) == len(names) and np.array_equal(rows, value_rows):
        score[rows[hit]] = values[hit].astype(np.float64)
    else:  # a file without scores: the character counts, with no score to rank it by
        score[rows[hit]] = 0.0
    single = ~pc.is_valid(table["characters"]).to_numpy(zero_copy_only=False)
    label = pc.fill_null(pc.equal(table["label"], character), False).to_numpy(zero_copy_only=False)
    confidence = pc.fill_null(table["confidence"], 0.0).to_numpy(zero_copy_only=False).astype(np.float64)
    return np.where(single & label, confidence, score)


def random_keys(rows: int, seed: int, episode: str) -> np.ndarray:
    """A uniform key per row, from the seed and the episode alone: the same whatever order episodes are read in."""
    return np.random.default_rng([seed, zlib.crc32(episode.encode())]).random(rows)


def episode_order(frames: pd.DataFrame, limit: int, min_gap_s: float, spread: bool) -> pd.DataFrame:
    """The first ``limit`` frames of one episode in the order it offers them, with their ``level``.

    ``frames`` has ``key``, ``frame``, ``timestamp_s`` and ``shot`` (null: a shot of
    its own). Spread: level 0 is each shot's lowest key, level 1 each shot's second...;
    in order of level, then key. Without spread every frame is level 0, in key order.
    A frame closer than ``min_gap_s`` to one already offered is passed over (frames
    without a time are never).
    """
    if frames.empty:
        return frames.assign(level=pd.Series(dtype=np.int64))
    shots = frames["shot"].astype("float64").to_numpy()
    alone = -1.0 - np.arange(len(frames))  # a shot of its own per frame without one
    frames = frames.assign(_shot=np.where(np.isnan(shots), alone, shots))
    frames = frames.sort_values(["key", "frame"], kind="stable")
    level = frames.groupby("_shot", sort=False).cumcount() if spread else pd.Series(0, index=frames.index)
    frames = frames.assign(level=level.astype(np.int64)).sort_values(["level", "key", "frame"], kind="stable")
    kept: list[int] = []
    times: list[float] = []
    for position, t in enumerate(frames["timestamp_s"].astype("float64").to_numpy()):
        if min_gap_s > 0 and not np.isnan(t):
            i = bisect.bisect_left(times, t)
            if (i < len(times) and times[i] - t < min_gap_s) or (i > 0 and t - times[i - 1] < min_gap_s):
                continue
            times.insert(i, t)
        kept.append(position)
        if len(kept) == limit:
            break
    return frames.iloc[kept].drop(columns="_shot")


def interleave(episodes: dict[str, pd.DataFrame], limit: int, spread: bool) -> pd.DataFrame:
    """The picks across episodes: by level, episodes taking turns within a level (spread), else by key alone.

    Each table is one episode's :func:`episode_order`. Episodes take turns in the
    order of their best key (then id), so the hardest episode goes first in every round.
    """
    parts = [f.assign(episode=e) for e, f in episodes.items() if not f.empty]
    if not parts:
        return pd.DataFrame(columns=["episode", "key", "level"])
    every = pd.concat(parts, ignore_index=True)
    if not spread:
        return every.sort_values(["key", "episode", "frame"], kind="stable").head(limit).reset_index(drop=True)
    best = every.groupby("episode")["key"].min().reset_index().sort_values(["key", "episode"], kind="stable")
    turn = {e: i for i, e in enumerate(best["episode"])}
    every = every.assign(_turn=every["episode"].map(turn), _round=every.groupby(["episode", "level"]).cumcount())
    ordered = every.sort_values(["level", "_round", "_turn"], kind="stable").head(limit)
    return ordered.drop(columns=["_turn", "_round"]).reset_index(drop=True)
