"""The Parquet commit protocol: an episode's rows land whole, then its marker says it is done.

An :class:`EpisodeWriter` appends the predictor's rows for one episode to a
temporary Parquet file under ``OUTPUT/_tmp/<run_id>/``; ``commit`` writes the
episode's error rows, moves the labels file into ``OUTPUT/episode=<id>/`` and only
then writes the marker. A marker therefore never names an episode without its
rows, and a rerun removes whatever an unmarked episode left (``run.py``). The file
that moves in is not the one the rows were appended to: that one is read back
whole, put in time order, cut into shots and pooled first (``finish.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simpsons_ray.core import storage
from simpsons_ray.core.clock import now_iso
from simpsons_ray.label import episodes as frames_lib
from simpsons_ray.label import finish
from simpsons_ray.label.settings import LabelSettings
from simpsons_ray.labels import schema
from simpsons_ray.labels.layout import OutputLayout

# Rows per Parquet row group: a handful of row groups per 30,000-frame episode.
ROW_GROUP_ROWS = 16384


class EpisodeWriter:
    """Appends one episode's rows to a temporary Parquet file, then commits it atomically."""

    def __init__(self, layout: OutputLayout, run_id: str, episode: frames_lib.Episode, classes: list[str], settings: LabelSettings):
        self.layout = layout
        self.episode = episode
        self.settings = settings
        self.tmp_parent = layout.tmp_run_dir(run_id)
        self.tmp_uri = storage.join(self.tmp_parent, f"episode={episode.episode_id}.parquet")
        self.finished_uri = storage.join(self.tmp_parent, f"episode={episode.episode_id}.finished.parquet")
        self._class_list = list(classes)
        self._classes = np.array(classes, dtype=object)
        self._thresholds = settings.character_thresholds(len(classes))
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._sink: Any = None  # pyarrow's output stream, opened with the first row group
        self.frames = 0
        self.errors: list[tuple[str, str]] = []  # (source, error)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        errors = batch["error"]
        ok = np.array([not e for e in errors], dtype=bool)
        for i in np.flatnonzero(~ok):
            self.errors.append((str(batch["source"][i]), str(errors[i])))
        if ok.any():
            table = self._label_rows({k: v[ok] for k, v in batch.items()})
            self._pending.append(table)
            self._pending_rows += table.num_rows
            self.frames += table.num_rows
            if self._pending_rows >= ROW_GROUP_ROWS:
                self._flush()

    def _label_rows(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """The frames' own columns, every character's score and the shot signature (finish.TMP_SCHEMA)."""
        s = self.settings
        n = len(batch["frame"])
        k = batch["top_indices"].shape[1]
        top_labels = self._classes[batch["top_indices"]]
        scores = batch["top_scores"].astype(np.float32)
        confidence = scores[:, 0]
        # The top-1 is the label when it reaches its own threshold (all the same for a single-label model).
        labelled = confidence >= self._thresholds[batch["top_indices"][:, 0]]
        labels = np.where(labelled, top_labels[:, 0], None)
        frame = batch["frame"].astype(np.int64)
        return pa.Table.from_arrays(
            [
                pa.array(frame, pa.int64()),
                s.timestamps(frame, batch["timestamp"].astype(np.float64)),
                pa.array(batch["source"].tolist(), pa.string()),
                pa.array(list(labels), pa.string()),
                pa.array(confidence, pa.float32()),
                _lists(top_labels.reshape(-1).tolist(), n, k, pa.string()),
                _lists(scores.reshape(-1), n, k, pa.float32()),
                pa.array([s.model_id] * n, pa.string()),
                _lists(batch["scores"].astype(np.float32).reshape(-1), n, batch["scores"].shape[1], pa.float32()),
                _lists(batch["signature"].astype(np.float32).reshape(-1), n, batch["signature"].shape[1], pa.float32()),
            ],
            schema=finish.TMP_SCHEMA,
        )

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            storage.makedirs(self.tmp_parent)
            fs, path = storage.resolve(self.tmp_uri)
            self._sink = fs.open_output_stream(path)
            self._writer = pq.ParquetWriter(self._sink, finish.TMP_SCHEMA, compression="zstd")
        self._writer.write_table(pa.concat_tables(self._pending), row_group_size=ROW_GROUP_ROWS)
        self._pending, self._pending_rows = [], 0

    def _finish(self) -> None:
        """Read the episode's rows back, in time order, cut into shots and pooled (finish.py); write the file that commits."""
        fs, path = storage.resolve(self.tmp_uri)
        with fs.open_input_file(path) as f:
            rows = pq.read_table(f)
        done = finish.finish(rows, self._class_list, self._thresholds, self.settings.multilabel, self.settings.pool)
        del rows
        fs, path = storage.resolve(self.finished_uri)
        with fs.open_output_stream(path) as sink:
            pq.write_table(done, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        storage.delete(self.tmp_uri)

    def discard(self) -> None:
        """Drop the episode's rows: close and delete the temporary file, abort an S3 upload the close could not finish."""
        try:
            if self._writer is not None:
                self._writer.close()
                self._sink.close()
        except OSError:
            pass
        finally:
            self._writer = None
            self._pending = []
            for uri in (self.tmp_uri, self.finished_uri):
                storage.abort_uploads(uri)
                storage.delete(uri)

    def commit(self, run_id: str, fingerprint: str = "") -> dict[str, Any]:
        """Land the episode: errors, then labels, then the marker that says it is done."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
        eid = self.episode.episode_id
        if self.errors:
            table = pa.table(
                {
                    "episode": pa.array([eid] * len(self.errors), pa.string()),
                    "source": pa.array([s for s, _ in self.errors], pa.string()),
                    "error": pa.array([e for _, e in self.errors], pa.string()),
                },
                schema=schema.ERRORS_SCHEMA,
            )
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            storage.write_bytes(self.layout.errors_file(eid), sink.getvalue().to_pybytes())
        if self._writer is not None:
            self._finish()
            storage.move(self.finished_uri, self.layout.labels_file(eid))
        marker = {
            "episode": eid,
            "source": self.episode.uri,
            "kind": self.episode.kind,
            **self.settings.for_episode(self.episode.kind),
            "source_fingerprint": fingerprint,  # frames.fingerprint_files: a rerun notices a changed source
            "frames": self.frames,
            "errors": len(self.errors),
            "run_id": run_id,
            "committed_at": now_iso(),
        }
        storage.write_json(self.layout.marker(eid), marker)
        return marker


def _lists(flat, rows: int, width: int, type_: pa.DataType) -> pa.ListArray:
    """N lists of ``width`` values each, from their values end to end."""
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat, type_))
