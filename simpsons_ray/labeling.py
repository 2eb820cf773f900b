"""Label whole episodes: frame dumps -> Ray Data -> predictor actors -> Parquet, exactly once.

Run it on one CPU, one GPU or a cluster with the same command::

    simpsons-ray label --model model/ --frames frames/ --output labels/
    simpsons-ray label --model s3://b/model --frames s3://b/frames --output s3://b/labels --gpu --num-workers 4 --batch-size 256
    ray job submit --working-dir . -- python jobs/label.py --model ... --frames ... --output ... --gpu

The pipeline (one Ray Dataset for all episodes still to do)::

    read      one task per archive or per chunk of a folder: raw bytes, streamed   (ingest.py, frames.py)
    decode    CPU tasks: decode, resize, normalise, as the model artifact says     (ingest.py, preprocess.py)
              (with --gpu: header checks only; the predictor decodes JPEGs on the GPU, see --decode)
    predict   an actor pool (one actor per GPU, or CPU actors); the model loads once per actor
    write     the driver appends each episode's rows to a temporary Parquet file as they come

Exactly once: an episode becomes visible when its finished file is moved into
``OUTPUT/episode=<id>/`` and then marked done in ``OUTPUT/_progress/<id>.json``.
A rerun skips marked episodes (no inference when all are done) and first removes
whatever an interrupted run left of the others, so every frame ends up in exactly
one row. Every read block carries its read task's id, and the task's last row
says how many rows the task produced, so the driver knows when an episode is
complete whatever order the blocks arrive in.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simpsons_ray import frames as frames_lib
from simpsons_ray import schema, storage
from simpsons_ray.errors import UserError
from simpsons_ray.ingest import (
    BLOCK_BYTES,
    FRAMES_PER_READ_TASK,
    JPEG,
    MAX_ROWS_PER_BLOCK,
    PIXELS,
    ReadSpec,
    decode_frames,
    frame_dump_datasource,
    plan_read_tasks,
    route_frames,
    rows_per_block,
)
from simpsons_ray.model import read_artifact_config
from simpsons_ray.preprocess import PreprocessConfig, normalize

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PROGRESS_DIR = "_progress"  # <id>.json: the episode is committed (and with which settings)
TMP_DIR = "_tmp"  # files being written; anything here is from an unfinished run
LABELS_FILE = "part-0.parquet"

# Rows per Parquet row group: a handful of row groups per 30,000-frame episode.
ROW_GROUP_ROWS = 16384
PROGRESS_EVERY_S = 10.0

# Logical CPU reservations, which decide what Ray runs side by side. Reading is
# mostly waiting on storage: a quarter CPU, so reads overlap with decoding.
# Decoding is real CPU work: one CPU per task (half the cluster's CPUs at most). A
# CPU predictor actor reserves half a CPU at most (its forward pass still uses its
# share of the cores) so that decode tasks run beside the actors even on a 2-CPU
# machine; the different reservation also keeps Ray Data from fusing decoding
# into the actor, which would serialise it.
READ_TASK_CPUS = 0.25
DECODE_TASK_CPUS = 1.0
CPU_PREDICTOR_CPUS = 0.5


@dataclass(frozen=True)
class LabelConfig:
    """Everything one labeling run needs; the CLI builds it from its flags."""

    model_uri: str
    frames_uri: str
    output_uri: str
    fps: float | None = None  # timestamp_s = frame / fps; null without it
    episodes: tuple[str, ...] = ()  # empty: every episode under frames_uri
    batch_size: int = 64  # frames per forward pass
    num_workers: int | None = None  # predictor actors; None: 1 with use_gpu, else one per CPU (see predictor_pool)
    use_gpu: bool = False
    min_confidence: float = 0.0  # label is null below this top-1 probability
    top_k: int = 3
    overwrite: bool = False  # relabel episodes already done
    decode: str = "auto"  # where frames are decoded: "tasks" (PIL, CPU tasks), "predictor", or "auto" (see decode_in_predictor)
    frames_per_read_task: int = FRAMES_PER_READ_TASK


# -------------------------------------------------------------------------- predict
class FramePredictor:
    """Scores batches of normalised images; the model loads once, in ``__init__``.

    The model runs with its BatchNorms folded into the convolutions and in
    channels_last memory format, on CPU as on GPU (oneDNN's fast path on CPUs; on
    a 2-core machine the two together ran resnet18 at 64 px ~35% faster). On CUDA
    it also runs in bf16 autocast (the fast path of Ampere and later), which can be
    asked for on CPU too: that is how it is tested.

    With ``decode=True`` it takes the output of ``ingest.route_frames`` instead of
    normalised images: JPEG bytes, which it decodes on its own device with
    ``torchvision.io.decode_jpeg`` (nvJPEG on a GPU) and resizes there, and raw
    pixels of frames the CPU tasks decoded. It normalises both on the device.
    """

    def __init__(
        self,
        model_uri: str,
        top_k: int,
        device: str = "cpu",
        mixed_precision: bool | None = None,
        channels_last: bool | None = None,
        cpu_threads: int | None = None,
        expected_model_id: str | None = None,
        decode: bool = False,
    ):
        import torch

        from simpsons_ray.model import fold_batchnorm, load_artifact

        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.mixed_precision = on_cuda if mixed_precision is None else mixed_precision
        self.channels_last = True if channels_last is None else channels_last
        if not on_cuda and cpu_threads:
            # Ray sets OMP_NUM_THREADS to the actor's CPU reservation (1); the forward
            # pass is the heavy stage, so let it use the cores it has been given.
            torch.set_num_threads(max(1, min(cpu_threads, os.cpu_count() or 1)))
        artifact = load_artifact(model_uri, self.device)
        if expected_model_id is not None and artifact.model_id != expected_model_id:
            # Rows carry the id from config.json; weights swapped since would make it a lie.
            raise UserError(
                f"{model_uri}/model.pt is {artifact.model_id} but its config.json says {expected_model_id}: "
                "the weights changed after the artifact was saved; save the model again."
            )
        self.model = fold_batchnorm(artifact.model)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model_id = artifact.model_id
        self.top_k = min(top_k, len(artifact.classes))
        self.decode = decode
        self.preprocess = artifact.preprocess
        # As the model was scored when trained: calibrated logits, mirror image averaged in.
        self.temperature = artifact.temperature
        self.tta_flip = artifact.tta_flip

    def predict(self, images: "np.ndarray | torch.Tensor") -> tuple[np.ndarray, np.ndarray]:
        """Normalised float32 NHWC -> (top-k scores float32, top-k class indices int64), best first."""
        import torch

        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        # The NCHW view of contiguous NHWC memory is channels_last already: no copy.
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision):
            logits = self.model(x)
            if self.tta_flip:
                logits = (logits + self.model(torch.flip(x, dims=[3]))) / 2
        probs = (logits.float() / self.temperature).softmax(dim=1)
        scores, indices = probs.topk(self.top_k, dim=1)
        return scores.cpu().numpy().astype(np.float32), indices.cpu().numpy().astype(np.int64)

    def decode_batch(self, data: np.ndarray, encoding: np.ndarray) -> tuple["torch.Tensor", np.ndarray]:
        """route_frames' frames -> (normalised float32 NHWC on the device, error per frame; "" if decoded).

        JPEGs are decoded together in one decode_jpeg call; if one of them is
        corrupt the call fails, and they are decoded one by one to find it. Frames
        of the same size are resized together, with antialiasing, as PIL does.
        """
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        size = self.preprocess.image_size
        errors = np.full(len(data), "", dtype=object)
        pixels: list[torch.Tensor | None] = [None] * len(data)
        jpegs = [i for i, e in enumerate(encoding) if e == JPEG]
        if jpegs:
            encoded = [torch.from_numpy(np.frombuffer(data[i], dtype=np.uint8).copy()) for i in jpegs]
            try:
                decoded: list[Any] = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:
                decoded = []
                for one in encoded:
                    try:
                        decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError as exc:
                        decoded.append(exc)
            by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for i, image in zip(jpegs, decoded):
                if isinstance(image, Exception):
                    errors[i] = f"cannot decode image: {str(image).splitlines()[0]}"
                else:
                    pixels[i] = image
                    by_shape[tuple(image.shape)].append(i)
            for shape, rows in by_shape.items():
                if shape[1:] != (size, size):
                    resized = F.resize(torch.stack([pixels[i] for i in rows]), [size, size], InterpolationMode.BILINEAR, antialias=True)
                    for i, image in zip(rows, resized):
                        pixels[i] = image
        for i, e in enumerate(encoding):
            if e == PIXELS:
                hwc = np.frombuffer(data[i], dtype=np.uint8).reshape(size, size, 3)
                pixels[i] = torch.from_numpy(hwc.copy()).permute(2, 0, 1).to(self.device)
        good = [p for p in pixels if p is not None]
        if not good:
            return torch.empty((0, size, size, 3)), errors
        return normalize(torch.stack(good).permute(0, 2, 3, 1), self.preprocess).permute(0, 2, 3, 1), errors

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = np.array(batch["error"], dtype=object)
        ok = np.array([not e for e in errors], dtype=bool)
        n = len(ok)
        scores = np.zeros((n, self.top_k), dtype=np.float32)
        indices = np.full((n, self.top_k), -1, dtype=np.int64)
        if self.decode and ok.any():
            images, decode_errors = self.decode_batch(batch["data"][ok], batch["encoding"][ok])
            errors[ok] = decode_errors  # every frame in `ok` had no error before
            ok[ok] = decode_errors == ""
            if ok.any():
                scores[ok], indices[ok] = self.predict(images)
        elif ok.any():
            scores[ok], indices[ok] = self.predict(batch["image"][ok])
        out = {k: batch[k] for k in ("episode", "task", "task_end", "source", "frame")}
        out["error"] = errors
        out["top_scores"] = scores
        out["top_indices"] = indices
        return out


# ---------------------------------------------------------------------------- write
@dataclass(frozen=True)
class OutputLayout:
    """Where everything of a labels output lives (see schema.py for the layout)."""

    output_uri: str

    def episode_dir(self, episode_id: str) -> str:
        return storage.join(self.output_uri, f"episode={episode_id}")

    def labels_file(self, episode_id: str) -> str:
        return storage.join(self.episode_dir(episode_id), LABELS_FILE)

    def errors_file(self, episode_id: str) -> str:
        return storage.join(self.output_uri, schema.ERRORS_DIR, f"{episode_id}.parquet")

    def marker(self, episode_id: str) -> str:
        return storage.join(self.output_uri, PROGRESS_DIR, f"{episode_id}.json")

    def tmp_dir(self) -> str:
        return storage.join(self.output_uri, TMP_DIR)

    def tmp_run_dir(self, run_id: str) -> str:
        return storage.join(self.tmp_dir(), run_id)

    def run_summary(self, run_id: str) -> str:
        return storage.join(self.output_uri, schema.RUNS_DIR, f"{run_id}.json")

    def remove_partial_writes(self) -> None:
        """Remove the temp files of atomic local writes that a kill cut short (``<name>.tmp-<hex>``)."""
        for folder in (schema.ERRORS_DIR, PROGRESS_DIR):
            for entry in storage.list_files(storage.join(self.output_uri, folder), recursive=False):
                if ".tmp-" in entry.relpath:
                    storage.delete(entry.uri)

    def remove_episode(self, episode_id: str) -> None:
        """Remove an episode's labels, errors and marker (marker first: never 'done' without rows)."""
        storage.delete(self.marker(episode_id))
        storage.delete(self.episode_dir(episode_id))
        storage.delete(self.errors_file(episode_id))


@dataclass(frozen=True)
class LabelSettings:
    """What makes two runs' labels the same; stored in each episode's marker."""

    model_id: str
    top_k: int
    min_confidence: float
    fps: float | None

    def differences(self, marker: dict[str, Any]) -> list[str]:
        return [f"{k} {marker.get(k)!r} (now {v!r})" for k, v in asdict(self).items() if marker.get(k) != v]


class EpisodeWriter:
    """Appends one episode's rows to a temporary Parquet file, then commits it atomically."""

    def __init__(self, layout: OutputLayout, run_id: str, episode: frames_lib.Episode, classes: list[str], settings: LabelSettings):
        self.layout = layout
        self.episode = episode
        self.settings = settings
        self.tmp_parent = layout.tmp_run_dir(run_id)
        self.tmp_uri = storage.join(self.tmp_parent, f"episode={episode.episode_id}.parquet")
        self._classes = np.array(classes, dtype=object)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._sink = None
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
        s = self.settings
        n = len(batch["frame"])
        k = batch["top_indices"].shape[1]
        top_labels = self._classes[batch["top_indices"]]
        scores = batch["top_scores"].astype(np.float32)
        confidence = scores[:, 0]
        labels = np.where(confidence >= s.min_confidence, top_labels[:, 0], None)
        frame = batch["frame"].astype(np.int64)
        offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
        return pa.Table.from_arrays(
            [
                pa.array(frame, pa.int64()),
                pa.array(frame / s.fps, pa.float64()) if s.fps else pa.nulls(n, pa.float64()),
                pa.array(batch["source"].tolist(), pa.string()),
                pa.array(labels.tolist(), pa.string()),
                pa.array(confidence, pa.float32()),
                pa.ListArray.from_arrays(offsets, pa.array(top_labels.reshape(-1).tolist(), pa.string())),
                pa.ListArray.from_arrays(offsets, pa.array(scores.reshape(-1), pa.float32())),
                pa.array([s.model_id] * n, pa.string()),
            ],
            schema=schema.LABELS_FILE_SCHEMA,
        )

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            storage.makedirs(self.tmp_parent)
            fs, path = storage.resolve(self.tmp_uri)
            self._sink = fs.open_output_stream(path)
            self._writer = pq.ParquetWriter(self._sink, schema.LABELS_FILE_SCHEMA, compression="zstd")
        self._writer.write_table(pa.concat_tables(self._pending), row_group_size=ROW_GROUP_ROWS)
        self._pending, self._pending_rows = [], 0

    def commit(self, run_id: str) -> dict[str, Any]:
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
            storage.move(self.tmp_uri, self.layout.labels_file(eid))
        marker = {
            "episode": eid,
            "source": self.episode.uri,
            **asdict(self.settings),
            "frames": self.frames,
            "errors": len(self.errors),
            "run_id": run_id,
            "committed_at": _now(),
        }
        storage.write_json(self.layout.marker(eid), marker)
        return marker


# ----------------------------------------------------------------------------- run
@dataclass
class _Progress:
    """Counts for the progress lines and the summary."""

    episodes_total: int
    started: float = field(default_factory=time.monotonic)
    frames: int = 0
    errors: int = 0
    episodes_done: int = 0
    last_line: float = field(default_factory=time.monotonic)

    def rate(self) -> float:
        return self.frames / max(time.monotonic() - self.started, 1e-9)

    def line(self) -> str:
        return (
            f"{self.episodes_done}/{self.episodes_total} episodes, {self.frames:,} frames labelled, "
            f"{self.errors:,} errors, {self.rate():,.1f} frames/s"
        )


def label(config: LabelConfig) -> dict[str, Any]:
    """Label every episode under ``config.frames_uri`` that is not done yet; returns the run summary."""
    started_at, t0 = _now(), time.monotonic()
    _validate(config)
    model_config, classes = read_artifact_config(config.model_uri)  # UserError if not a model
    preprocess = PreprocessConfig.from_model_config(model_config)
    settings = LabelSettings(
        model_id=_model_id(config.model_uri, model_config),
        top_k=min(config.top_k, len(classes)),
        min_confidence=float(config.min_confidence),
        fps=float(config.fps) if config.fps else None,
    )
    episodes = frames_lib.list_episodes(config.frames_uri, config.episodes)
    storage.check_writable(config.output_uri, "labels output")
    layout = OutputLayout(config.output_uri)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]

    todo, skipped = _split_done(layout, episodes, settings, config.overwrite)
    logger.info(
        "label: %d episode(s) under %s, %d already labelled by %s, %d to do",
        len(episodes), config.frames_uri, len(skipped), settings.model_id, len(todo),
    )
    if todo:
        _check_weights(config.model_uri, model_config, settings.model_id)
        _ensure_ray()
        _check_resources(config)
    # Anything an interrupted run left behind: temp files, and rows or errors of
    # episodes it never marked done. Removed before any new row is written.
    storage.delete(layout.tmp_dir())
    layout.remove_partial_writes()
    for episode in todo:
        layout.remove_episode(episode.episode_id)

    progress = _Progress(len(todo))
    empty: list[str] = []
    if todo:
        empty = _run_pipeline(config, layout, run_id, todo, classes, preprocess, settings, progress)
        storage.delete(layout.tmp_run_dir(run_id))

    wall = time.monotonic() - t0
    summary = {
        "run_id": run_id,
        "model_id": settings.model_id,
        "frames_labelled": progress.frames,
        "errors": progress.errors,
        "episodes": len(episodes),
        "episodes_labelled": progress.episodes_done,
        "episodes_skipped": len(skipped),
        "empty_episodes": empty,
        "wall_time_s": round(wall, 3),
        "frames_per_s": round(progress.frames / wall, 2) if wall > 0 else 0.0,
        "started_at": started_at,
        "finished_at": _now(),
        "output": config.output_uri,
        "config": asdict(config),
    }
    storage.write_json(layout.run_summary(run_id), summary)
    logger.info(
        "label: done in %.1f s: %d frames labelled (%.1f frames/s), %d errors, %d episodes labelled, %d skipped as done; "
        "model %s; labels in %s, summary in %s",
        wall, progress.frames, summary["frames_per_s"], progress.errors, progress.episodes_done, len(skipped),
        settings.model_id, config.output_uri, layout.run_summary(run_id),
    )
    if empty:
        logger.info("label: no frames in episode(s) %s (see %s)", ", ".join(empty), storage.join(config.output_uri, schema.ERRORS_DIR))
    return summary


def _validate(config: LabelConfig) -> None:
    if config.batch_size <= 0 or (config.num_workers is not None and config.num_workers <= 0) or config.top_k <= 0 or config.frames_per_read_task <= 0:
        raise UserError("--batch-size, --num-workers and --top-k must be positive integers.")
    if config.decode not in DECODE_CHOICES:
        raise UserError(f"--decode {config.decode} is not one of {', '.join(DECODE_CHOICES)}.")
    if not 0.0 <= config.min_confidence <= 1.0:
        raise UserError(f"--min-confidence {config.min_confidence} is not a probability: give a value between 0 and 1.")
    if config.fps is not None and config.fps <= 0:
        raise UserError(f"--fps {config.fps} must be a positive number of frames per second.")


def _model_id(model_uri: str, model_config: dict[str, Any]) -> str:
    """The artifact's id of its weights; hashed from model.pt when an older config lacks it."""
    if model_config.get("model_id"):
        return str(model_config["model_id"])
    return _weights_id(model_uri, model_config)


def _weights_id(model_uri: str, model_config: dict[str, Any]) -> str:
    from simpsons_ray.model import WEIGHTS_FILE, weights_id

    return weights_id(storage.read_bytes(storage.join(model_uri, WEIGHTS_FILE)), model_config["arch"])


def _check_weights(model_uri: str, model_config: dict[str, Any], model_id: str) -> None:
    """Fail before any work when model.pt is not the weights config.json names (every row carries that id)."""
    actual = _weights_id(model_uri, model_config)
    if actual != model_id:
        raise UserError(
            f"{model_uri}/model.pt is {actual} but its config.json says {model_id}: "
            "the weights changed after the artifact was saved; save the model again."
        )


def _split_done(
    layout: OutputLayout, episodes: list[frames_lib.Episode], settings: LabelSettings, overwrite: bool
) -> tuple[list[frames_lib.Episode], list[frames_lib.Episode]]:
    """(episodes to label, episodes already labelled with these settings)."""
    todo, done, clashes = [], [], []
    for episode in episodes:
        marker_uri = layout.marker(episode.episode_id)
        if overwrite or not storage.exists(marker_uri):
            todo.append(episode)
            continue
        diff = settings.differences(storage.read_json(marker_uri))
        if diff:
            clashes.append(f"{episode.episode_id} ({', '.join(diff)})")
        else:
            done.append(episode)
    if clashes:
        raise UserError(
            f"{layout.output_uri} already holds labels made with other settings for episode(s) {'; '.join(clashes[:3])}"
            f"{' and more' if len(clashes) > 3 else ''}: pass --overwrite to relabel them, or choose another --output."
        )
    return todo, done


def _run_pipeline(
    config: LabelConfig,
    layout: OutputLayout,
    run_id: str,
    todo: list[frames_lib.Episode],
    classes: list[str],
    preprocess: PreprocessConfig,
    settings: LabelSettings,
    progress: _Progress,
) -> list[str]:
    """Stream every frame of ``todo`` through the model; commit each episode as it completes."""
    specs = plan_read_tasks(todo, config.frames_per_read_task)
    by_id = {e.episode_id: e for e in todo}
    tasks_of: dict[str, set[int]] = defaultdict(set)
    episode_of: dict[int, str] = {}
    for spec in specs:
        tasks_of[spec.episode_id].add(spec.task_id)
        episode_of[spec.task_id] = spec.episode_id
    received: Counter[int] = Counter()
    expected: dict[int, int] = {}
    writers: dict[str, EpisodeWriter] = {}
    empty: list[str] = []

    with _data_context():
        dataset = _build_dataset(config, specs, preprocess, settings.model_id)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            episode_ids = batch["episode"]
            for eid in np.unique(episode_ids):
                writer = writers.get(eid)
                if writer is None:
                    writer = writers[eid] = EpisodeWriter(layout, run_id, by_id[eid], classes, settings)
                writer.add({k: v[episode_ids == eid] for k, v in batch.items()})
            tasks, counts = np.unique(batch["task"], return_counts=True)
            received.update(dict(zip(tasks.tolist(), counts.tolist())))
            ends = batch["task_end"] > 0
            expected.update(zip(batch["task"][ends].tolist(), batch["task_end"][ends].tolist()))
            for task in tasks.tolist():
                if expected.get(task) != received[task]:
                    continue
                eid = episode_of[task]
                tasks_of[eid].discard(task)
                if not tasks_of[eid]:
                    del tasks_of[eid]
                    writer = writers.pop(eid)
                    marker = writer.commit(run_id)
                    progress.frames += marker["frames"]
                    progress.errors += marker["errors"]
                    progress.episodes_done += 1
                    if marker["frames"] == 0:
                        empty.append(eid)
                    logger.info("label: episode %s committed: %d frames, %d errors (%s)", eid, marker["frames"], marker["errors"], progress.line())
            if time.monotonic() - progress.last_line > PROGRESS_EVERY_S:
                progress.last_line = time.monotonic()
                in_flight = sum(w.frames for w in writers.values())
                logger.info("label: %s; %d frames in episodes under way", progress.line(), in_flight)
    if tasks_of:
        # Every read task reports its row count, so this means rows went missing.
        raise RuntimeError(f"labeling ended with episodes incomplete: {sorted(tasks_of)}")
    return sorted(empty)


def _build_dataset(config: LabelConfig, specs: list[ReadSpec], preprocess: PreprocessConfig, model_id: str):
    """read -> decode (CPU tasks) -> predict (actor pool); the few Ray Data lines in one place."""
    import ray

    block_rows = rows_per_block(preprocess.image_size)
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    # One read per spec: left to itself, Ray Data would cut every read block into
    # dozens of tiny ones to reach its default parallelism. A read task's output
    # comes out in blocks of at most BLOCK_BYTES (see _data_context), so the frames
    # of one large archive are decoded by many CPU tasks at once while it streams.
    dataset = ray.data.read_datasource(
        frame_dump_datasource(specs, block_rows), num_cpus=READ_TASK_CPUS, override_num_blocks=len(specs)
    )
    in_predictor = decode_in_predictor(config)
    dataset = dataset.map_batches(
        route_frames if in_predictor else decode_frames,
        fn_kwargs={"preprocess": preprocess},
        # Routed JPEGs stay compressed, so their batches need not shrink with the image size.
        batch_size=MAX_ROWS_PER_BLOCK if in_predictor else block_rows,
        batch_format="numpy",
        num_cpus=min(DECODE_TASK_CPUS, max(cluster_cpus / 2, 0.25)),  # a 1-CPU machine still decodes
    )
    actors, predictor_args, resources = predictor_pool(config, cluster_cpus)
    return dataset.map_batches(
        FramePredictor,
        fn_constructor_kwargs={
            "model_uri": config.model_uri,
            "top_k": config.top_k,
            "expected_model_id": model_id,
            "decode": in_predictor,
            **predictor_args,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=config.batch_size,
        batch_format="numpy",
        **resources,
    )


DECODE_CHOICES = ("auto", "tasks", "predictor")


def decode_in_predictor(config: LabelConfig) -> bool:
    """Whether JPEG frames are decoded by the predictor instead of by CPU tasks.

    "auto" picks the predictor when it runs on a GPU: nvJPEG decodes there, the
    CPU tasks only check headers, and compressed frames instead of float tensors
    travel to the GPU. On CPU, decoding in separate tasks keeps both kinds of
    work running side by side, so "auto" keeps the tasks.
    """
    return config.decode == "predictor" or (config.decode == "auto" and config.use_gpu)


def predictor_pool(config: LabelConfig, cluster_cpus: int) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(actors, FramePredictor arguments, Ray resources per actor) for the predictor pool.

    GPU: one actor per GPU, ``--num-workers`` of them (default 1). CPU: by default
    one single-threaded actor per CPU of the cluster. On 2 cores, two
    single-threaded actors labelled 919 frames/s where one actor with two threads
    did 816 (80,000 frames, resnet18 at 64 px): the threads of one forward pass
    wait for each other at every layer, separate actors never do.
    """
    if config.use_gpu:
        return config.num_workers or 1, {"device": "cuda"}, {"num_gpus": 1, "num_cpus": 1}
    actors = config.num_workers or max(1, cluster_cpus)
    threads = max(1, cluster_cpus // actors)  # each actor's share of the cores, for its forward pass
    # Decode tasks share the cores with the forward pass. OpenMP threads that spin
    # while waiting would take their time slices; passive waiting lets them run.
    # The actors together reserve at most half the CPUs, so decode tasks always fit.
    reserve = min(CPU_PREDICTOR_CPUS, cluster_cpus / 2 / actors)
    resources = {"num_cpus": reserve, "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}}
    return actors, {"device": "cpu", "cpu_threads": threads}, resources


# Written by `ray up` on the head node of a cluster-launcher cluster; its autoscaler
# reads it. Under `ray job submit` the driver runs on that head node.
AUTOSCALER_CONFIG = "~/ray_bootstrap_config.yaml"


def _check_resources(config: LabelConfig) -> None:
    """--gpu on a cluster without GPUs: an error, unless an autoscaler can still add GPU nodes."""
    import ray

    if not config.use_gpu or ray.cluster_resources().get("GPU", 0) >= 1:
        return
    if os.path.exists(os.path.expanduser(AUTOSCALER_CONFIG)):
        # cluster.yaml starts GPU workers at 0: the predictors' GPU requests make
        # the autoscaler add them, which takes minutes, not an error.
        logger.warning("label: no GPU in the cluster yet; the predictors will start when the autoscaler adds GPU nodes "
                       "(stop the job and rerun without --gpu if this cluster has none)")
        return
    raise UserError("--gpu was given but the Ray cluster has no GPU: start it on GPU nodes, or drop --gpu to label on CPUs.")


def _ensure_ray() -> None:
    """Join the Ray cluster of this job (RAY_ADDRESS, `ray job submit`), or start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Our progress lines replace Ray Data's bars, and blocks stay small; the previous settings come back after.

    Blocks of at most BLOCK_BYTES instead of Ray Data's 128 MiB: the raw frames
    of an archive then leave its read task in many blocks, each decoded by its
    own task, as they stream. (The alternative, a repartition stage, is one more
    task per block and held decoding back until reading was done: the first
    frames reached the model seconds later.)
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.target_max_block_size)
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    ctx.target_max_block_size = BLOCK_BYTES
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.target_max_block_size = saved


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
