"""The fixed, documented schema of the labels dataset; labeling writes it, query reads it.

Layout of a labels output::

    OUTPUT/episode=<id>/<part>.parquet   one row per frame (LABELS_FILE_SCHEMA)
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

from simpsons_ray import storage

PARTITION_SCHEMA = pa.schema([pa.field("episode", pa.string())])

# Columns stored in each Parquet file (everything but the partition key).
LABELS_FILE_SCHEMA = pa.schema(
    [
        pa.field("frame", pa.int64()),  # a video's frame index at its rate, or a dump's number from the file name
        pa.field("timestamp_s", pa.float64()),  # a video's presentation time; a dump's (frame - first) / fps, null without --fps
        pa.field("source", pa.string()),  # "<video URI>#t=<seconds>", a file URI, or "<archive URI>#<member>"
        pa.field("label", pa.string()),  # top-1 character; null below --min-confidence
        pa.field("confidence", pa.float32()),  # top-1 softmax probability
        pa.field("top_labels", pa.list_(pa.string())),
        pa.field("top_scores", pa.list_(pa.float32())),
        pa.field("model_id", pa.string()),
    ]
)

# The dataset as every reader sees it: exactly these columns, in this order.
LABELS_SCHEMA = pa.schema([PARTITION_SCHEMA.field("episode"), *LABELS_FILE_SCHEMA])

# Columns a labels file may have beyond LABELS_FILE_SCHEMA, from a model that names every
# character on screen: readers take them where present and read null elsewhere.
OPTIONAL_FILE_SCHEMA = pa.schema(
    [
        pa.field("characters", pa.list_(pa.string())),  # every character on screen, best first; [] = nobody
        pa.field("character_scores", pa.list_(pa.float32())),  # their scores, same order
    ]
)
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
    """Open a labels output as a pyarrow dataset with the exact labels schema.

    Folders starting with ``_`` or ``.`` (errors, run summaries, temp files) are
    ignored, so only label rows are read.
    """
    fs, path = storage.resolve(labels_uri)
    return pads.dataset(
        path,
        filesystem=fs,
        format="parquet",
        partitioning=hive_partitioning(),
        schema=LABELS_SCHEMA,
        ignore_prefixes=[".", "_"],
    )
