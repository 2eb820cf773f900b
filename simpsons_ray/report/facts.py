"""One self-contained HTML report of a labels output: totals, timelines, contact sheets, quality, the model's card.

This module reads the labels and reduces each episode to its facts; :mod:`simpsons_ray.report.html`
draws the page from them.

    simpsons-ray report --labels out/labels --output report.html [--model out/model]

The file needs no server and no network: styles, scripts, charts (SVG) and thumbnails
(JPEG, base64) are inline, so it opens from a laptop's disk or an S3 presigned link.

How it stays fast on a whole series: each episode's partition is read once, with only
the columns the report needs, on the query module's thread pool, and reduced at once
to small per-episode facts (screen time, segments, pairs on screen together, the best
frames of each character); the rows themselves are never held together. Timelines
travel as compact JSON and are drawn by the browser when a reader opens an episode.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from simpsons_ray import query
from simpsons_ray.core.errors import UserError

# A frame whose top-1 confidence is under this counts as low-confidence in the quality table.
DEFAULT_LOW_CONFIDENCE = 0.5
DEFAULT_THUMBNAILS = 8  # best frames per character in the contact sheets
THUMBNAIL_PX = (160, 120)
# Characters given their own column in the per-episode table and chart; the rest are summed.
TABLE_CHARACTERS = 15
_SEASON = re.compile(r"^(s\d+)e\d+", re.IGNORECASE)
_COLUMNS = ["frame", "timestamp_s", "source", "label", "confidence", "model_id", "characters", "character_scores", "shot"]


@dataclass(frozen=True)
class ReportConfig:
    """One ``simpsons-ray report`` run."""

    labels_uri: str
    output_uri: str
    model_uri: str | None = None
    episodes: tuple[str, ...] = ()
    characters: tuple[str, ...] = ()
    min_confidence: float = query.DEFAULT_MIN_CONFIDENCE
    low_confidence: float = DEFAULT_LOW_CONFIDENCE
    max_gap_s: float = query.DEFAULT_MAX_GAP_S
    thumbnails: int = DEFAULT_THUMBNAILS


# ------------------------------------------------------------------ per-episode facts
@dataclass
class EpisodeFacts:
    """What the report needs of one episode, reduced from its rows."""

    episode: str
    rows: int
    labelled: int  # frames with at least one character on screen
    interval: float | None  # seconds per frame; None without timestamps
    mean_confidence: float
    low_confidence: int
    model_ids: list[str]
    multi_label: bool
    screen: pd.DataFrame  # character, frames
    pairs: pd.DataFrame  # a, b, frames
    segments: pd.DataFrame  # query.SEGMENTS_COLUMNS
    best: pd.DataFrame  # character, score, frame, timestamp_s, source
    error_rows: int = 0
    cuts: np.ndarray = field(default_factory=lambda: np.zeros(0))  # where each shot after the first starts: seconds, or frames untimed
    shots: int = 0  # 0: labelled before shots

    @property
    def season(self) -> str:
        match = _SEASON.match(self.episode)
        return match.group(1).lower() if match else "-"

    def seconds(self, frames: float) -> float:
        return frames * self.interval if self.interval is not None else math.nan


def episode_facts(labels: query.LabelsDataset, episode: str, config: ReportConfig) -> EpisodeFacts:
    """Read one episode once and reduce it to :class:`EpisodeFacts`."""
    columns = [c for c in _COLUMNS if c != "source" or config.thumbnails > 0]  # sources only for thumbnails
    table = query.read_episode(labels, episode, columns)
    interval = query.sampling_interval(table["timestamp_s"])
    on = query.on_screen(table, config.min_confidence, frozenset(config.characters))
    names = np.asarray(on.names, dtype=object)
    frame = table["frame"].to_numpy(zero_copy_only=False).astype(np.int64)
    timestamp = table["timestamp_s"].to_numpy(zero_copy_only=False).astype(np.float64)
    confidence = table["confidence"].to_numpy(zero_copy_only=False).astype(np.float64)
    model_ids = sorted(v for v in pc.unique(table["model_id"]).to_pylist() if v is not None)

    counts = np.bincount(on.codes, minlength=len(names))
    present = np.flatnonzero(counts)
    screen = pd.DataFrame({"character": names[present], "frames": counts[present].astype(np.int64)})
    screen = screen.sort_values("character", kind="stable").reset_index(drop=True)

    unique_rows = np.unique(on.rows)
    pairs = query.pairs_on_screen(on)
    segments = query.segments_on_screen(episode, on, frame, timestamp, interval, config.max_gap_s)

    chosen: list[np.ndarray] = []
    if config.thumbnails > 0:
        for code in present:
            mine = np.flatnonzero(on.codes == code)
            order = np.lexsort((on.rows[mine], -on.scores[mine]))  # best score first, then row order
            chosen.append(mine[order[: config.thumbnails]])
    picked = np.concatenate(chosen) if chosen else np.array([], np.int64)
    rows = on.rows[picked]
    best = pd.DataFrame({
        "episode": episode,
        "character": names[on.codes[picked]],
        "score": on.scores[picked],
        "frame": frame[rows],
        "timestamp_s": timestamp[rows],
        "source": table["source"].take(pa.array(rows, pa.int64())).to_pylist() if len(rows) else [],
    })
    return EpisodeFacts(
        episode=episode,
        rows=table.num_rows,
        labelled=len(unique_rows),
        interval=interval,
        mean_confidence=float(np.nanmean(confidence)) if np.isfinite(confidence).any() else math.nan,
        low_confidence=int(np.sum(np.nan_to_num(confidence, nan=0.0) < config.low_confidence)),
        model_ids=model_ids,
        multi_label=bool(pc.any(pc.is_valid(table["characters"])).as_py()),
        screen=screen,
        pairs=pairs,
        segments=segments,
        best=best,
        cuts=_cuts(table, frame, timestamp, interval),
        shots=len(pc.unique(table["shot"].drop_null())),
    )


def _cuts(table: pa.Table, frame: np.ndarray, timestamp: np.ndarray, interval: float | None) -> np.ndarray:
    """Where each shot after the first starts, on the timeline's axis (seconds, or frame numbers without times)."""
    shot = table["shot"].to_numpy(zero_copy_only=False)
    known = ~pd.isna(shot)
    if not known.any():
        return np.zeros(0)
    position = timestamp if interval is not None else frame.astype(np.float64)
    order = np.lexsort((frame[known], position[known]))
    shot, position = shot[known][order].astype(np.int64), position[known][order]
    return position[1:][np.diff(shot) != 0]


def _failed_episode(episode: str, error_rows: int) -> EpisodeFacts:
    empty = pd.DataFrame({"character": pd.Series(dtype=object), "frames": pd.Series(dtype=np.int64)})
    return EpisodeFacts(
        episode=episode, rows=0, labelled=0, interval=None, mean_confidence=math.nan, low_confidence=0, model_ids=[],
        multi_label=False, screen=empty, pairs=pd.DataFrame(columns=["a", "b", "frames"]),
        segments=pd.DataFrame(columns=query.SEGMENTS_COLUMNS),
        best=pd.DataFrame(columns=["episode", "character", "score", "frame", "timestamp_s", "source"]), error_rows=error_rows,
    )


def collect(config: ReportConfig) -> tuple[query.LabelsDataset, list[EpisodeFacts]]:
    """Every selected episode's facts, in episode order, error rows included."""
    labels = query.open_labels(config.labels_uri)
    query.check_min_confidence(config.min_confidence)
    selected = query.select_episodes(labels, list(config.episodes) or None)
    facts = query.map_episodes(selected, lambda e: episode_facts(labels, e, config))
    errors = query.error_counts(labels.uri)
    for f in facts:
        f.error_rows = int(errors.get(f.episode, 0))
    # Episodes whose every frame failed have error rows and no labels: they belong in the quality table.
    failed = [e for e in errors.index if e not in labels.fragments and (not config.episodes or e in config.episodes)]
    facts += [_failed_episode(e, int(errors[e])) for e in failed]
    facts.sort(key=lambda f: f.episode)
    if config.characters:
        known = set().union(*(set(f.screen["character"]) for f in facts)) if facts else set()
        missing = [c for c in config.characters if c not in known]
        if missing:
            all_known = query.known_characters(labels, selected)
            if missing[0] not in all_known:
                raise UserError(f"No character {missing[0]!r} in the labels at {labels.uri}{query.suggestions(missing[0], all_known)}.")
    return labels, facts


# ------------------------------------------------------------------ tables across episodes
def screen_table(facts: list[EpisodeFacts]) -> pd.DataFrame:
    """episode, season, character, frames, seconds: one row per character seen in an episode."""
    parts = [f.screen.assign(episode=f.episode, season=f.season, seconds=f.seconds(1.0) * f.screen["frames"]) for f in facts if len(f.screen)]
    if not parts:
        return pd.DataFrame(columns=["episode", "season", "character", "frames", "seconds"])
    return pd.concat(parts, ignore_index=True)[["episode", "season", "character", "frames", "seconds"]]


def together_table(facts: list[EpisodeFacts]) -> pd.DataFrame:
    """a, b, frames, seconds, episodes: how long each pair of characters shared the screen (as `query together` counts it)."""
    return query.together_across((f.episode, f.pairs, f.interval) for f in facts)


def quality_table(facts: list[EpisodeFacts]) -> pd.DataFrame:
    return pd.DataFrame(
        [{
            "episode": f.episode,
            "frames": f.rows,
            "labelled": f.labelled,
            "nobody": f.rows - f.labelled,
            "error_rows": f.error_rows,
            "mean_confidence": f.mean_confidence,
            "low_confidence_share": f.low_confidence / f.rows if f.rows else math.nan,
            "minutes": f.seconds(f.rows) / 60,
            "model_ids": ", ".join(f.model_ids),
        } for f in facts],
        columns=["episode", "frames", "labelled", "nobody", "error_rows", "mean_confidence", "low_confidence_share", "minutes", "model_ids"],
    )


def best_frames(facts: list[EpisodeFacts], per_character: int) -> pd.DataFrame:
    parts = [f.best for f in facts if len(f.best)]
    if not parts or per_character <= 0:
        return pd.DataFrame(columns=["episode", "character", "score", "frame", "timestamp_s", "source"])
    joined = pd.concat(parts, ignore_index=True)
    joined = joined.sort_values(["character", "score", "episode", "frame"], ascending=[True, False, True, True], kind="stable")
    return joined.groupby("character", sort=False).head(per_character).reset_index(drop=True)


