"""Questions asked of a labels dataset: screen time, a character's frames, segments, who is on screen together, summary, who is on screen at a moment.

Every function takes the URI of a labels output (local path or ``s3://``) in the
layout of :mod:`simpsons_ray.labels.schema` and returns a pandas DataFrame::

    from simpsons_ray import query
    query.screen_time("out/labels", min_confidence=0.6)
    query.frames("out/labels", "ned_flanders", episodes=["s01e01"], limit=20)
    query.segments("out/labels", character="krusty_the_clown", max_gap_s=1.0)
    query.together("out/labels", character="homer_simpson")
    query.summary("out/labels")
    query.at("out/labels", "s01e05", query.parse_time("12:34"))
    query.shots("out/labels", episodes=["s01e05"])  # the shots the labeling job cut, and who each one shows
    query.screen_time(query.open_labels("out/labels", per_frame=True))  # each frame alone, not pooled over its shot
    query.screen_time("out/labels", nobody=True)  # adds a "(nobody)" row per episode

Every question answers from ``characters``, the answer the labeling job pooled
over each shot (``label/pooling.py``), unless the labels are opened with
``per_frame=True`` (``--per-frame``): then from each frame's own answer.

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

Owns: ``reading`` (opening an output, reading episodes), ``onscreen`` (the rule of
who a row puts on screen; segments and pairs), ``questions`` (the six questions),
``command`` (``simpsons-ray query``: formats, files, pictures), ``exports`` (SRT,
WebVTT, EDL, timecodes) and ``charts`` (PNG charts and contact sheets).

May import: ``core``, ``media``, ``labels``.
"""

from simpsons_ray.query.columns import (
    AT_COLUMNS,
    DEFAULT_MAX_GAP_S,
    DEFAULT_MIN_CONFIDENCE,
    FRAMES_COLUMNS,
    SCREEN_TIME_COLUMNS,
    SEGMENTS_COLUMNS,
    SHOTS_COLUMNS,
    SUMMARY_COLUMNS,
    TOGETHER_COLUMNS,
)
from simpsons_ray.query.command import FORMATS, QUESTIONS, SEGMENT_EXPORTS, QueryConfig, ask, render, run_query
from simpsons_ray.query.onscreen import (
    NOBODY,
    OnScreen,
    nobody_on_screen,
    on_screen,
    pairs_on_screen,
    segments_on_screen,
    together_across,
)
from simpsons_ray.query.questions import at, frames, parse_time, screen_time, segments, summary, together

# What the report reads labels with, as the questions do.
from simpsons_ray.query.reading import (
    LabelsDataset,
    check_min_confidence,
    error_counts,
    known_characters,
    map_episodes,
    open_labels,
    read_episode,
    sampling_interval,
    select_episodes,
    suggestions,
)
from simpsons_ray.query.shotlist import shots

__all__ = [
    "AT_COLUMNS", "DEFAULT_MAX_GAP_S", "DEFAULT_MIN_CONFIDENCE", "FORMATS", "FRAMES_COLUMNS", "NOBODY", "QUESTIONS",
    "SCREEN_TIME_COLUMNS", "SEGMENTS_COLUMNS", "SEGMENT_EXPORTS", "SHOTS_COLUMNS", "SUMMARY_COLUMNS", "TOGETHER_COLUMNS", "LabelsDataset",
    "OnScreen", "QueryConfig", "ask", "at", "frames", "known_characters", "nobody_on_screen", "on_screen", "open_labels",
    "pairs_on_screen", "parse_time", "render", "run_query", "screen_time", "segments", "segments_on_screen", "shots", "summary",
    "together", "together_across", "check_min_confidence", "error_counts", "map_episodes", "read_episode",
    "sampling_interval", "select_episodes", "suggestions",
]
