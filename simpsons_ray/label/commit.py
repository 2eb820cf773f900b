"""The Parquet commit protocol: an episode's files land whole, only while its lease is this job's, then its marker.

An :class:`EpisodeWriter` appends the predictor's rows for one episode to a
temporary Parquet file under ``OUTPUT/_tmp/<run_id>/``. When the episode is
complete, the commit goes in steps (``pipeline._commit`` drives them):

1. **stage** (nothing visible): the rows are read back whole, put in time order,
   cut into shots and pooled (``finish.py``) into a second temporary file; the
   error rows go to a third.
2. **renew** the episode's lease, conditionally (``leases.py``): it fails if another
   job has taken the episode over, and then the staged files are deleted and the
   commit ends having written nothing visible. A renewal that lands gives this job
   the episode for most of a TTL (90 of 120 s), by its own monotonic clock.
3. **land**: before each of the three visible writes the job asks whether that time
   is still running (``LeaseKeeper.holds``); if not, it stops. In order:
   ``episode=<id>/part-0.parquet`` is replaced by the staged labels, or removed when
   the episode has no labelled frame; ``_errors/<id>.parquet`` is replaced by the
   staged errors, or removed when there are none; then the marker
   ``_progress/<id>.json`` is written. Both files are always replaced or removed,
   so an episode never shows one job's labels beside another job's errors.
4. **release** the lease.

What a crash (or a stall past the lease) at each point leaves:

- before or during 1-2: temporary files under ``_tmp/<run>/`` only; the next run
  removes them, and whoever holds the episode labels it.
- during 3, after the labels or the errors moved but before the marker: the episode
  has no marker (or the one of an earlier run, if this was a takeover; its files were
  removed when the takeover started). A run that takes the episode up again removes
  both files before labelling it (``run._clear_leftovers``); readers may see the
  new labels without their marker meanwhile.
- after 3: the episode is committed; its lease expires or the next run removes it.

A job that stalls after step 2 for longer than its lease writes nothing more when it
wakes (it asks before each write). What no check can stop is a stall *inside* one of
the three writes, already sent, outlasting the TTL and a whole takeover: the stalled
write can then land after the other job's. A single S3 request or local rename
does not stall for minutes in practice; a shared local disk that does is outside
this protocol.
"""

from __future__ import annotations

from typing import Any, Callable

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
        self.errors_uri = storage.join(self.tmp_parent, f"episode={episode.episode_id}.errors.parquet")
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
            for uri in (self.tmp_uri, self.finished_uri, self.errors_uri):
                storage.abort_uploads(uri)
                storage.delete(uri)

    def stage(self) -> None:
        """Step 1: the episode's labels and errors as temporary files, ready to move in; nothing visible yet."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None
            self._finish()
        if self.errors:
            eid = self.episode.episode_id
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
            storage.write_bytes(self.errors_uri, sink.getvalue().to_pybytes())

    def land(self, run_id: str, fingerprint: str, still_held: Callable[[], bool]) -> dict[str, Any] | None:
        """Step 3: replace or remove the labels file, then the errors file, then write the marker; each only while
        ``still_held()``. The marker, or None when the lease ran out first (the steps not taken are left undone)."""
        eid = self.episode.episode_id
        steps = [
            lambda: _replace_or_remove(self.finished_uri, self.frames > 0, self.layout.labels_file(eid)),
            lambda: _replace_or_remove(self.errors_uri, bool(self.errors), self.layout.errors_file(eid)),
        ]
        for step in steps:
            if not still_held():
                return None
            step()
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
        if not still_held():
            return None
        storage.write_json(self.layout.marker(eid), marker)
        return marker


def _replace_or_remove(staged_uri: str, staged: bool, target_uri: str) -> None:
    if staged:
        storage.move(staged_uri, target_uri)
    else:
        storage.delete(target_uri)


def _lists(flat, rows: int, width: int, type_: pa.DataType) -> pa.ListArray:
    """N lists of ``width`` values each, from their values end to end."""
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat, type_))
