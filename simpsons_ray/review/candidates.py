"""The frames of a labels output worth a person's look: each episode read once, keyed, and cut to what it can offer.

An episode is read (a few columns), keyed (picks.py), ordered as it offers its
frames, and cut to the first ``limit`` of them before the next is read: at most
``limit`` picks come from any one episode, so the memory is a few episodes' rows
plus ``limit`` per episode, never the output's table.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa

from simpsons_ray.core.errors import UserError
from simpsons_ray.query.reading import LabelsDataset, known_characters, map_episodes, read_episode, suggestions
from simpsons_ray.review.picks import Decision, Pick, answers, character_score, episode_order, interleave, random_keys, uncertainty

log = logging.getLogger(__name__)

COLUMNS = ["frame", "timestamp_s", "source", "label", "confidence", "top_labels", "top_scores", "model_id",
           "characters", "character_scores", "shot"]
# What a pick carries on: where the frame is, what the model said, and its key.
PICK_COLUMNS = ["episode", "frame", "timestamp_s", "source", "shot", "answer", "score", "model_id", "key", "level"]


def check_character(labels: LabelsDataset, decision: Decision, character: str) -> None:
    """One sentence, with the closest names, when ``character`` is not a character of the model or of the labels."""
    if character in decision.classes:
        return
    known = sorted(set(decision.classes) | set(known_characters(labels)))
    raise UserError(f"No character {character!r} in the model or the labels at {labels.uri}{suggestions(character, known)}.")


def keyed(table: pa.Table, episode: str, decision: Decision, pick: Pick, seed: int) -> tuple[pa.Table, np.ndarray]:
    """One episode's rows that the pick can take, and their keys (lowest first)."""
    if pick.kind == "character":
        assert pick.character is not None
        key = character_score(table, pick.character)
        has = ~np.isnan(key)
        return table.filter(pa.array(has)), key[has]
    if pick.kind == "random":
        return table, random_keys(table.num_rows, seed, episode)
    try:
        return table, uncertainty(table, decision)
    except ValueError as exc:
        raise UserError(f"The labels of episode {episode!r} are not a labels output's: {exc}.") from None


def offered(table: pa.Table, key: np.ndarray, episode: str, limit: int, min_gap_s: float, spread: bool) -> pd.DataFrame:
    """The first ``limit`` frames an episode offers (picks.episode_order), with what the model said about each."""
    frames = pd.DataFrame({
        "row": np.arange(table.num_rows),
        "key": key,
        "frame": table["frame"].to_numpy(zero_copy_only=False),
        "timestamp_s": table["timestamp_s"].to_pandas(),
        "shot": table["shot"].to_pandas().astype("float64"),
    })
    chosen = episode_order(frames, limit, min_gap_s, spread)
    rows = table.take(pa.array(chosen["row"].to_numpy(), pa.int64()))
    return chosen.drop(columns="row").assign(
        episode=episode,
        source=rows["source"].to_pylist(),
        answer=answers(rows),
        score=rows["confidence"].to_pandas().astype("float64").to_numpy(),
        model_id=rows["model_id"].to_pylist(),
    )


def pick_frames(labels: LabelsDataset, decision: Decision, pick: Pick, limit: int, seed: int = 0, min_gap_s: float = 0.0) -> pd.DataFrame:
    """The frames to review, in the order a person should see them (PICK_COLUMNS); ``score`` is the top-1 score, or NAME's."""
    if pick.kind == "character":
        assert pick.character is not None
        check_character(labels, decision, pick.character)

    def one_episode(episode: str) -> pd.DataFrame:
        table, key = keyed(read_episode(labels, episode, COLUMNS), episode, decision, pick, seed)
        frames = offered(table, key, episode, limit, min_gap_s, pick.spread)
        if pick.kind == "character":
            frames = frames.assign(score=frames["key"])
        return frames

    per_episode = dict(zip(labels.episodes, map_episodes(labels.episodes, one_episode)))
    picked = interleave(per_episode, limit, pick.spread)
    if picked.empty:
        who = f"whose answer names {pick.character!r}" if pick.kind == "character" else "to pick"
        raise UserError(f"No frame {who} in the labels at {labels.uri}.")
    return picked[PICK_COLUMNS]


def check_answers(picked: pd.DataFrame, decision: Decision, model_id: str, labels_uri: str, model_uri: str) -> None:
    """Refuse labels whose answers name characters the model does not have: a reviewer could not keep or correct them."""
    unknown = sorted({c for answer in picked["answer"] for c in answer} - set(decision.classes))
    if unknown:
        raise UserError(f"The labels at {labels_uri} name characters the model at {model_uri} does not have "
                        f"({', '.join(unknown[:5])}): pass the --model that labelled them.")
    others = sorted({str(m) for m in picked["model_id"] if m and m != model_id})
    if others:
        log.warning("review: %d picked frames were labelled by %s, not by %s; they were ranked by %s's thresholds",
                    int((picked["model_id"] != model_id).sum()), ", ".join(others), model_id, model_id)
