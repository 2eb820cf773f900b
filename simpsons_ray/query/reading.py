"""Reading a labels output for a question: open it once, pick episodes, read a few columns of one episode at a time.

The dataset is opened once (a listing: no file is read), the episodes asked for
select their partitions' files before anything is opened, only the columns a
question needs are read, filters are pushed into the Parquet scan, and the work
runs one episode at a time on a small thread pool, so the peak memory is a few
episodes' worth of a few columns, never the table.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError, first_line
from simpsons_ray.labels import schema
from simpsons_ray.labels.ids import check_episode_id, is_episode_id
from simpsons_ray.labels.sampling import median_gap

# Episodes read at once. pyarrow releases the GIL while it reads and decodes, and on
# S3 the threads mostly wait on the network; peak memory grows with this number.


# Episodes read at once. pyarrow releases the GIL while it reads and decodes, and on
# S3 the threads mostly wait on the network; peak memory grows with this number.
READ_THREADS = min(8, 2 * (os.cpu_count() or 1))


# Timestamps come from frame / fps in floating point; gaps within this of the
# sampling interval are the same gap.
TIME_EPSILON_S = 1e-6


T = TypeVar("T")

log = logging.getLogger("simpsons_ray.query")


@dataclass(frozen=True)
class LabelsDataset:
    """A labels output opened for querying: its files grouped by episode, none read yet."""

    uri: str
    dataset: pads.FileSystemDataset
    fragments: dict[str, list[pads.ParquetFileFragment]] = field(repr=False)
    # Answer from each frame alone (``frame_characters``) instead of the answer pooled over its shot (``characters``).
    per_frame: bool = False

    @property
    def episodes(self) -> list[str]:
        return sorted(self.fragments)


def open_labels(labels_uri: str, allow_empty: bool = False, per_frame: bool = False) -> LabelsDataset:
    """List a labels output (no file is opened) and group its Parquet files by episode.

    ``per_frame``: every question answers from each frame's own characters, as if
    the labels had not been pooled over shots (schema.OPTIONAL_FILE_SCHEMA); files
    from before pooling hold only those anyway.
    """
    labels_uri = str(labels_uri)
    if not storage.exists(labels_uri):
        raise UserError(f"No labels at {labels_uri}: the path does not exist; pass the --output of `simpsons-ray label`.")
    if storage.is_file(labels_uri):
        raise UserError(
            f"{labels_uri} is a file, not a labels output: pass the folder that holds the episode=<id> folders."
        )
    try:
        dataset = schema.labels_dataset(labels_uri)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"Cannot list the labels at {labels_uri}: {first_line(exc).rstrip('.')}.") from None
    fragments: dict[str, list[pads.ParquetFileFragment]] = {}
    ignored: dict[str, str] = {}
    for fragment in dataset.get_fragments():
        episode = pads.get_partition_keys(fragment.partition_expression).get("episode")
        if episode is None:
            raise UserError(
                f"{labels_uri} is not a labels output: {storage.to_uri(dataset.filesystem, fragment.path)} is not inside an episode=<id> folder; "
                "pass the folder that holds the episode=<id> folders."
            )
        why = check_episode_id(episode)
        if why:  # labeling never writes such a folder; read back, its id could name a path anywhere (hive decodes %2F)
            ignored[storage.to_uri(dataset.filesystem, posixpath.dirname(fragment.path))] = why
            continue
        fragments.setdefault(episode, []).append(fragment)
    for folder, why in sorted(ignored.items()):
        log.warning("query: ignored %s: its name is not an episode id (%s; see simpsons_ray.labels.ids)", folder, why)
    if not fragments and not allow_empty:
        raise UserError(
            f"No labels at {labels_uri}: it holds no episode=<id>/*.parquet files; "
            "pass the --output of `simpsons-ray label`."
        )
    return LabelsDataset(labels_uri, dataset, fragments, per_frame)


def as_labels(labels: str | LabelsDataset, allow_empty: bool = False) -> LabelsDataset:
    return labels if isinstance(labels, LabelsDataset) else open_labels(labels, allow_empty=allow_empty)


def select_episodes(labels: LabelsDataset, episodes: Iterable[str] | None) -> list[str]:
    """The episodes to read, in order; unknown ones are a user error with suggestions."""
    if episodes is None:
        return labels.episodes
    wanted = list(dict.fromkeys(str(e) for e in episodes))
    missing = [e for e in wanted if e not in labels.fragments]
    if missing:
        raise UserError(
            f"No episode {missing[0]!r} in the labels at {labels.uri}"
            f"{suggestions(missing[0], labels.episodes)}; list them with `simpsons-ray query summary`."
        )
    return sorted(wanted)


# Type families a column may have and still be read as the schema's type: a dataset
# written by another tool (Spark, DuckDB, pandas) may use int32 frames or large strings.
def _family(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _family(t.value_type)
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "floating"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return "list<" + _family(t.value_type) + ">"
    if pa.types.is_null(t):
        return "null"  # an all-null column written by a tool that could not infer a type
    return str(t)


def check_fragment(labels: LabelsDataset, fragment: pads.ParquetFileFragment, columns: Sequence[str]) -> None:
    """Reject a file that lacks a needed column or has it with an unrelated type.

    pyarrow would silently read a missing column as nulls (the dataset has a fixed
    schema), so a wrong dataset must be caught here, by its footer.
    """
    try:
        physical = fragment.physical_schema
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"Cannot read {_file_uri(labels, fragment)} in the labels at {labels.uri}: {first_line(exc).rstrip('.')}.") from None
    for name in columns:
        if name == "episode":
            continue
        expected = schema.READ_SCHEMA.field(name).type
        index = physical.get_field_index(name)
        if index < 0 and name in schema.OPTIONAL_FILE_SCHEMA.names:
            continue  # read as null
        if index < 0:
            raise UserError(
                f"{labels.uri} is not a labels dataset: {_file_uri(labels, fragment)} has no column {name!r} "
                f"(a labels file has {', '.join(schema.LABELS_FILE_SCHEMA.names)})."
            )
        actual = physical.field(index).type
        if _family(actual) not in (_family(expected), "null"):
            raise UserError(
                f"{labels.uri} is not a labels dataset: column {name!r} of {_file_uri(labels, fragment)} is {actual}, "
                f"where the labels schema has {expected}."
            )


def _file_uri(labels: LabelsDataset, fragment: pads.ParquetFileFragment) -> str:
    return storage.to_uri(labels.dataset.filesystem, fragment.path)


def read_episode(
    labels: LabelsDataset, episode: str, columns: Sequence[str], filter: pc.Expression | None = None
) -> pa.Table:
    """The given columns of one episode's rows (every file of its partition), filter applied in the scan."""
    tables = []
    for fragment in labels.fragments[episode]:
        check_fragment(labels, fragment, columns)
        try:
            read = _answer_columns(fragment, columns) if labels.per_frame else list(columns)
            tables.append(fragment.to_table(schema=schema.READ_SCHEMA, columns=read, filter=filter).rename_columns(list(columns)))
        except (OSError, pa.ArrowException) as exc:
            raise UserError(f"Cannot read {_file_uri(labels, fragment)} in the labels at {labels.uri}: {first_line(exc).rstrip('.')}.") from None
    if not tables:
        return schema.READ_SCHEMA.empty_table().select(list(columns))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _answer_columns(fragment: pads.ParquetFileFragment, columns: Sequence[str]) -> list[str]:
    """``columns``, with the frame's own characters read in place of the pooled ones where the file has them."""
    if fragment.physical_schema.get_field_index("frame_characters") < 0:
        return list(columns)  # written before pooling: ``characters`` is the frame's own
    own = {"characters": "frame_characters", "character_scores": "frame_character_scores"}
    return [own.get(c, c) for c in columns]


def map_episodes(episodes: Sequence[str], work: Callable[[str], T]) -> list[T]:
    """``work(episode)`` for each episode on the read pool, results in episode order."""
    if len(episodes) <= 1:
        return [work(e) for e in episodes]
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(episodes))) as pool:
        return list(pool.map(work, episodes))


def check_min_confidence(min_confidence: float) -> float:
    value = float(min_confidence)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise UserError(f"--min-confidence must be between 0 and 1, got {min_confidence}.")
    return value


def labelled_filter(min_confidence: float, character: str | None = None) -> pc.Expression:
    """The scan filter of the rows whose ``label`` puts someone on screen when they have no ``characters`` list (see :func:`on_screen`)."""
    expr = pc.field("label").is_valid() & (pc.field("confidence") >= pc.scalar(min_confidence))
    if character is not None:
        expr = expr & (pc.field("label") == pc.scalar(character))
    return expr


def sampling_interval(timestamps: pa.ChunkedArray) -> float | None:
    """Median gap between consecutive distinct timestamps; None without two of them."""
    return median_gap(pc.drop_null(timestamps).to_numpy())


def frame_step(frames: np.ndarray) -> float:
    """Median gap between consecutive distinct frame numbers (1 for a full dump)."""
    return median_gap(frames) or 1.0


def suggestions(name: str, known: Iterable[str]) -> str:
    known = sorted(set(known))
    lowered = name.lower()
    close = [k for k in known if lowered and lowered in k.lower()]
    close += [k for k in difflib.get_close_matches(name, known, n=5, cutoff=0.5) if k not in close]
    if close:
        return "; closest known names: " + ", ".join(close[:5])
    if known:
        return "; known names include " + ", ".join(known[:5])
    return ""


def known_characters(labels: str | LabelsDataset, episodes: Iterable[str] | None = None) -> list[str]:
    """Every distinct ``label`` or listed character in the dataset (or in the given episodes), sorted.

    Listed characters count too: a multi-label model may name a character on many
    frames without it ever being a frame's top-1 ``label``.
    """
    labels = as_labels(labels)
    selected = select_episodes(labels, episodes)

    def one_episode(episode: str) -> list[str]:
        table = read_episode(labels, episode, ["label", "characters"])
        return pc.unique(pa.chunked_array([*table["label"].chunks, *pc.list_flatten(table["characters"]).chunks], pa.string())).to_pylist()

    names: set[str] = set()
    for part in map_episodes(selected, one_episode):
        names.update(v for v in part if v is not None)
    return sorted(names)


def check_character(labels: LabelsDataset, character: str) -> None:
    known = known_characters(labels)
    if character not in known:
        raise UserError(f"No character {character!r} in the labels at {labels.uri}{suggestions(character, known)}.")


def error_counts(labels_uri: str) -> pd.Series:
    """Rows of ``_errors/`` per episode (empty when the labeling recorded none)."""
    errors_uri = storage.join(labels_uri, schema.ERRORS_DIR)
    if not storage.is_dir(errors_uri):
        return pd.Series(dtype=np.int64)
    fs, path = storage.resolve(errors_uri)
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet", schema=schema.ERRORS_SCHEMA, ignore_prefixes=[".", "_"])
        episodes = dataset.to_table(columns=["episode"])["episode"]
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"Cannot read the error rows in {errors_uri}: {first_line(exc).rstrip('.')}.") from None
    counts = pc.value_counts(episodes)
    found = pd.Series(
        counts.field("counts").to_numpy(zero_copy_only=False).astype(np.int64),
        index=[e if e is not None else "" for e in counts.field("values").to_pylist()],
        dtype=np.int64,
    )
    return found[[is_episode_id(e) for e in found.index]]  # as open_labels: only what labeling can have written


def concat_frames(parts: list[pd.DataFrame], columns: list[str], dtypes: dict[str, str]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, "str")) for c in columns})
    return pd.concat(parts, ignore_index=True)[columns].astype(dtypes)
