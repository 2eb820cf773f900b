"""The fixed, documented schema of the labels dataset; labeling writes it, query reads it.

Layout of a labels output::

    OUTPUT/episode=<id>/<part>.parquet   one row per frame (WRITTEN_FILE_SCHEMA)
    OUTPUT/_errors/...parquet            frames that could not be labelled (ERRORS_SCHEMA)
    OUTPUT/_runs/<run_id>.json           one summary per run
    OUTPUT/_...                          other metadata; never labels

The ``episode`` column lives in the hive partition directory name, not inside the
files: Spark refuses a column that is both in the files and in the partition path,
and pyarrow, pandas and DuckDB all rebuild it from the path.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads

from simpsons_ray.core import storage

PARTITION_SCHEMA = pa.schema([pa.field("episode", pa.string())])

# Columns every labels file has, however old (everything but the partition key). A
# score is a softmax probability for a single-label model, a character's sigmoid for a
# multi-label one (model.Artifact.objective).
LABELS_FILE_SCHEMA = pa.schema(
    [
        pa.field("frame", pa.int64()),  # a video's frame index at its rate, or a dump's number from the file name
        pa.field("timestamp_s", pa.float64()),  # a video's presentation time; a dump's (frame - first) / fps, null without --fps
        pa.field("source", pa.string()),  # "<video URI>#t=<seconds>", a file URI, or "<archive URI>#<member>"
        pa.field("label", pa.string()),  # top-1 character; null below its threshold (--min-confidence, or a multi-label model's own)
        pa.field("confidence", pa.float32()),  # top-1 score
        pa.field("top_labels", pa.list_(pa.string())),
        pa.field("top_scores", pa.list_(pa.float32())),
        pa.field("model_id", pa.string()),
    ]
)

# Columns that files written before they existed lack: readers take them where
# present and read null elsewhere (query.check_fragment, labels_dataset).
#
# ``characters`` is the episode's answer: pooled over the frame's shot (label/pooling.py)
# in files that have ``shot``, the frame's own answer in older files (and with --pool
# none); ``frame_characters`` is always the frame's own. ``label``, ``confidence`` and
# the top-k are the frame's own in every file.
OPTIONAL_FILE_SCHEMA = pa.schema(
    [
        pa.field("characters", pa.list_(pa.string())),  # every character whose score reaches its threshold, best first; [] = nobody
        pa.field("character_scores", pa.list_(pa.float32())),  # their scores, same order
        pa.field("shot", pa.int32()),  # the frame's shot, 0-based in time order within the episode (label/shots.py)
        pa.field("frame_characters", pa.list_(pa.string())),  # the frame's own answer, before pooling
        pa.field("frame_character_scores", pa.list_(pa.float32())),  # their scores, same order
    ]
)

# What labeling writes in each file now.
WRITTEN_FILE_SCHEMA = pa.schema([*LABELS_FILE_SCHEMA, *OPTIONAL_FILE_SCHEMA])

# The columns every labels output has, the partition key first.
LABELS_SCHEMA = pa.schema([PARTITION_SCHEMA.field("episode"), *LABELS_FILE_SCHEMA])
# The dataset as every reader sees it: exactly these columns, in this order; an old
# file's missing optional columns read as null.
READ_SCHEMA = pa.schema([*LABELS_SCHEMA, *OPTIONAL_FILE_SCHEMA])

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("episode", pa.string()),
        pa.field("source", pa.string()),
        pa.field("error", pa.string()),
    ]
)

ERRORS_DIR = "_errors"
RUNS_DIR = "_runs"


def hive_partitioning() -> pads.Partitioning:
    return pads.partitioning(PARTITION_SCHEMA, flavor="hive")


def labels_dataset(labels_uri: str) -> pads.Dataset:
    """Open a labels output as a pyarrow dataset with the exact labels schema (READ_SCHEMA).

    Folders starting with ``_`` or ``.`` (errors, run summaries, temp files) are
    ignored, so only label rows are read. Files written before ``characters``
    existed read null there.
    """
    fs, path = storage.resolve(labels_uri)
    return pads.dataset(
        path,
        filesystem=fs,
        format="parquet",
        partitioning=hive_partitioning(),
        schema=READ_SCHEMA,
        ignore_prefixes=[".", "_"],
    )
