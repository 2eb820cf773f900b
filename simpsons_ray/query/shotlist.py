"""``query shots``: an episode's shots as the labeling job cut them (``label/shots.py``), and who each one shows.

A shot runs from its first frame's time to its last frame's time plus one sampling
interval (as a segment does). ``characters`` names everyone the answer puts on
screen in the shot, most frames first; ``frames_with`` says on how many of the
shot's frames each is, so a character who walks in halfway shows as such.
Outputs labelled before shots existed have no ``shot`` column: their episodes are
left out, and asking only such episodes is one sentence.
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from simpsons_ray.core.errors import UserError
from simpsons_ray.query.columns import DEFAULT_MIN_CONFIDENCE, SHOTS_COLUMNS
from simpsons_ray.query.onscreen import ON_SCREEN_COLUMNS, OnScreen, on_screen
from simpsons_ray.query.reading import (
    LabelsDataset,
    as_labels,
    check_min_confidence,
    concat_frames,
    map_episodes,
    read_episode,
    sampling_interval,
    select_episodes,
)

log = logging.getLogger("simpsons_ray.query")


def shots(
    labels: str | LabelsDataset, min_confidence: float = DEFAULT_MIN_CONFIDENCE, episodes: Iterable[str] | None = None
) -> pd.DataFrame:
    """One row per shot (SHOTS_COLUMNS), in time order within each episode."""
    labels = as_labels(labels)
    min_confidence = check_min_confidence(min_confidence)
    selected = select_episodes(labels, episodes)

    def one_episode(episode: str) -> pd.DataFrame | None:
        table = read_episode(labels, episode, ["frame", "timestamp_s", "shot", *ON_SCREEN_COLUMNS])
        if table.num_rows and table["shot"].null_count == table.num_rows:
            return None  # labelled before shots
        table = table.filter(pc.is_valid(table["shot"]))
        return episode_shots(episode, table, on_screen(table, min_confidence))

    found = map_episodes(selected, one_episode)
    without = [e for e, part in zip(selected, found) if part is None]
    if without and len(without) == len(selected):
        raise UserError(f"The labels at {labels.uri} have no shots for {', '.join(without[:3])}"
                        f"{' and more' if len(without) > 3 else ''}: they were labelled before shots existed; "
                        "label them again with --overwrite to cut them into shots.")
    if without:
        log.warning("query shots: %d episode(s) labelled before shots existed are left out: %s", len(without), ", ".join(without[:5]))
    return concat_frames([p for p in found if p is not None and len(p)], SHOTS_COLUMNS,
                         {"shot": "int64", "start_s": "float64", "end_s": "float64", "duration_s": "float64", "frames": "int64",
                          "first_frame": "int64", "last_frame": "int64"})


def episode_shots(episode: str, table: pa.Table, on: OnScreen) -> pd.DataFrame:
    """SHOTS_COLUMNS for one episode's rows (every row has a shot)."""
    rows = pd.DataFrame({
        "shot": table["shot"].to_numpy(zero_copy_only=False).astype(np.int64),
        "frame": table["frame"].to_numpy(zero_copy_only=False).astype(np.int64),
        "time": table["timestamp_s"].to_numpy(zero_copy_only=False).astype(np.float64),
    })
    interval = sampling_interval(table["timestamp_s"])
    out = rows.groupby("shot").agg(start_s=("time", "min"), end_s=("time", "max"), frames=("frame", "size"),
                                   first_frame=("frame", "min"), last_frame=("frame", "max"))
    out["end_s"] = out["end_s"] + interval if interval else np.nan
    if not interval:
        out["start_s"] = np.nan
    out["duration_s"] = out["end_s"] - out["start_s"]
    who = pd.DataFrame({"shot": rows["shot"].to_numpy()[on.rows], "character": np.asarray(on.names, dtype=object)[on.codes]})
    tally = (who.groupby(["shot", "character"]).size().reset_index(name="n")
             .sort_values(["shot", "n", "character"], ascending=[True, False, True]))
    out["characters"] = tally.groupby("shot")["character"].agg(", ".join).reindex(out.index).fillna("")
    tally["text"] = tally["character"] + ":" + tally["n"].astype(str)
    out["frames_with"] = tally.groupby("shot")["text"].agg(", ".join).reindex(out.index).fillna("")
    return out.reset_index().assign(episode=episode)[SHOTS_COLUMNS]
