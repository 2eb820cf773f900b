"""An episode's frame rows, once all are in, become the rows that commit: in time order, cut into shots, answers pooled.

The writer (``commit.py``) appends rows as they arrive, in any order (parallel read
ranges of one video finish in any order), to a temporary file that also holds
every character's score and each frame's shot signature. When the episode is
complete that file is read back (one episode's rows: nothing else grows with
it), sorted by time, cut into shots (``shots.py``), pooled (``pooling.py``), and
written out without the scores and signatures; that file is what commits.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from simpsons_ray.label import pooling, shots
from simpsons_ray.labels import schema

# What the temporary file holds beyond the frame's own columns.
TMP_SCHEMA = pa.schema(
    [
        *schema.LABELS_FILE_SCHEMA,
        pa.field("scores", pa.list_(pa.float32())),  # every character's score, classes order
        pa.field("signature", pa.list_(pa.float32())),  # shots.signature of the frame the model saw
    ]
)


def matrix(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A list<float32> column of equal-length lists -> float32 N x width."""
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return flat.astype(np.float32).reshape(-1, width)


def lists(on: np.ndarray, values: np.ndarray, names: pa.Array) -> tuple[pa.Array, pa.Array]:
    """bool N x C and scores N x C -> (list<string> of the characters on, best first; list<float32> of their scores).

    Equal scores come in class order, as the predictor ranks ``top_labels``.
    """
    rows, codes = np.nonzero(on)
    scores = values[rows, codes]
    order = np.lexsort((codes, -scores, rows))
    rows, codes, scores = rows[order], codes[order], scores[order]
    offsets = pa.array(np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=len(on))))).astype(np.int32))
    return (
        pa.ListArray.from_arrays(offsets, names.take(pa.array(codes, pa.int64()))),
        pa.ListArray.from_arrays(offsets, pa.array(scores.astype(np.float32), pa.float32())),
    )


def time_order(table: pa.Table) -> tuple[pa.Table, np.ndarray | None]:
    """Rows sorted by time (by frame number where times are missing), and the times, if every row has one."""
    timed = table["timestamp_s"].null_count == 0
    keys = [("timestamp_s", "ascending"), ("frame", "ascending")] if timed else [("frame", "ascending")]
    table = table.sort_by(keys)
    times = table["timestamp_s"].to_numpy() if timed and table.num_rows else None
    return table, times


def frame_on(table: pa.Table, scores: np.ndarray, names: pa.Array, thresholds: np.ndarray, multilabel: bool) -> np.ndarray:
    """Who each frame alone puts on screen: every score at its threshold, or a single-label model's top-1 if it reaches its."""
    if multilabel:
        return scores >= thresholds
    on = np.zeros(scores.shape, dtype=bool)
    if table.num_rows:
        # The top-1 the row's ``label`` names, so that the two always agree.
        first = pc.index_in(pc.list_element(table["top_labels"], 0), value_set=names).to_numpy(zero_copy_only=False).astype(np.int64)
        rows = np.arange(len(scores))
        on[rows, first] = scores[rows, first] >= thresholds[first]
    return on


def finish(table: pa.Table, classes: list[str], thresholds: np.ndarray, multilabel: bool, settings: pooling.PoolSettings) -> pa.Table:
    """The temporary rows of one whole episode -> its committed rows (schema.WRITTEN_FILE_SCHEMA)."""
    table, times = time_order(table)
    names = pa.array(classes, pa.string())
    scores = matrix(table["scores"], len(classes))
    shot = shots.cut_shots(matrix(table["signature"], shots.SIGNATURE_SIZE), times, settings.shots)
    own = frame_on(table, scores, names, thresholds, multilabel)
    frame_characters, frame_scores = lists(own, scores, names)
    if settings.method == "none":
        characters, character_scores = frame_characters, frame_scores
    else:
        pooled = pooling.pool(scores, times, shot, settings)
        characters, character_scores = lists(pooling.decide(pooled, thresholds, multilabel), pooled, names)
    columns = {name: table[name] for name in schema.LABELS_FILE_SCHEMA.names}
    columns.update(characters=characters, character_scores=character_scores, shot=pa.array(shot, pa.int32()),
                   frame_characters=frame_characters, frame_character_scores=frame_scores)
    return pa.table([columns[name] for name in schema.WRITTEN_FILE_SCHEMA.names], schema=schema.WRITTEN_FILE_SCHEMA)
