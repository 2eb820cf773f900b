"""The Ray side of labeling: one Ray Dataset for all episodes still to do, and the sizes of its stages.

    read      one task per folder or archive (it lists its own frames), or per time range of a video  (ingest.py, frames.py, video.py)
    decode    CPU tasks: decode, resize, normalise, as the model artifact says          (ingest.py, preprocess.py)
              (video frames arrive decoded and resized by their read task: only normalised here;
              with --gpu: header checks only, the predictor decodes JPEGs on the GPU, see --decode)
    predict   an actor pool (one actor per GPU, or CPU actors); the model loads once per actor   (predictor.py)
    write     the driver appends each episode's rows to a temporary Parquet file as they come    (commit.py)

Every read block carries its read task's id, and the task's last row says how
many rows the task produced, so the driver knows when an episode is complete
whatever order the blocks arrive in (completion.py), and commits it then.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from simpsons_ray.core import console
from simpsons_ray.label import episodes as episodes_lib
from simpsons_ray.label.commit import EpisodeWriter
from simpsons_ray.label.completion import Completion
from simpsons_ray.label.ingest import (
    BLOCK_BYTES,
    MAX_ROWS_PER_BLOCK,
    ReadSpec,
    VideoPlan,
    decode_frames,
    frame_dump_datasource,
    plan_read_tasks,
    route_frames,
    rows_per_block,
)
from simpsons_ray.label.leases import LeaseKeeper
from simpsons_ray.label.predictor import FramePredictor
from simpsons_ray.label.resources import DECODE_TASK_CPUS, READ_TASK_CPUS, VIDEO_READ_TASK_CPUS, decode_in_predictor, predictor_pool
from simpsons_ray.label.settings import LabelSettings
from simpsons_ray.labels.layout import OutputLayout
from simpsons_ray.model.preprocess import PreprocessConfig

if TYPE_CHECKING:
    from simpsons_ray.label.config import LabelConfig

logger = logging.getLogger("simpsons_ray.label")


@dataclass
class Progress:
    """Counts for the progress lines and the summary."""

    episodes_total: int
    started: float = field(default_factory=time.monotonic)
    frames: int = 0
    errors: int = 0
    episodes_done: int = 0
    first_batch_at: float | None = None  # time.monotonic() when the first labelled batch reached the driver

    def rate(self) -> float:
        return self.frames / max(time.monotonic() - self.started, 1e-9)

    def line(self) -> str:
        return (
            f"{self.episodes_done}/{self.episodes_total} episodes, {self.frames:,} frames labelled, "
            f"{self.errors:,} errors, {self.rate():,.1f} frames/s"
        )


def run_pipeline(
    config: LabelConfig,
    layout: OutputLayout,
    run_id: str,
    todo: list[episodes_lib.Episode],
    classes: list[str],
    preprocess: PreprocessConfig,
    settings: LabelSettings,
    progress: Progress,
    leases: LeaseKeeper,
    grow: bool = True,
) -> list[str]:
    """Stream every frame of ``todo`` through the model; commit each episode as it completes, if its lease is still ours.

    Returns the episodes that had no frame. When the run fails, the episodes under
    way are dropped: their temporary files deleted, S3 uploads aborted.
    """
    specs = plan_read_tasks(todo, VideoPlan(config.sample_fps, config.seconds_per_read_task, preprocess.image_size))
    completion = Completion((spec.task_id, spec.episode_id) for spec in specs)
    writers = _Writers(layout, run_id, {e.episode_id: e for e in todo}, classes, settings)
    empty: list[str] = []
    bar = console.ProgressBar("label", "frames")
    with _data_context(), _discard_on_failure(writers.open):
        dataset = _build_dataset(config, specs, preprocess, settings.model_id, grow)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            if progress.first_batch_at is None:
                progress.first_batch_at = time.monotonic()
            writers.add(batch)
            for episode in completion.add(batch):
                _commit(writers.open.pop(episode), completion.fingerprint(episode), run_id, leases, progress, empty)
            total, estimated = completion.frames_total()
            bar.update(completion.rows, total, estimated, note=f"{progress.episodes_done}/{progress.episodes_total} episodes"
                       + (f", {progress.errors:,} errors" if progress.errors else ""))
    bar.close(note=f"{progress.episodes_done}/{progress.episodes_total} episodes")
    if completion.unfinished:
        # Every read task reports its row count, so this means rows went missing.
        raise RuntimeError(f"labeling ended with episodes incomplete: {completion.unfinished}")
    return sorted(empty)


class _Writers:
    """One open :class:`EpisodeWriter` per episode whose rows have started to arrive."""

    def __init__(self, layout: OutputLayout, run_id: str, episodes: dict[str, episodes_lib.Episode], classes: list[str],
                 settings: LabelSettings):
        self.layout, self.run_id, self.episodes, self.classes, self.settings = layout, run_id, episodes, classes, settings
        self.open: dict[str, EpisodeWriter] = {}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        episode_ids = batch["episode"]
        for eid in np.unique(episode_ids):
            writer = self.open.get(eid)
            if writer is None:
                writer = self.open[eid] = EpisodeWriter(self.layout, self.run_id, self.episodes[eid], self.classes, self.settings)
            writer.add({k: v[episode_ids == eid] for k, v in batch.items()})


def _commit(writer: EpisodeWriter, fingerprint: str, run_id: str, leases: LeaseKeeper, progress: Progress, empty: list[str]) -> None:
    """Land a complete episode if this job still holds its lease, else drop its rows (the protocol: commit.py)."""
    eid = writer.episode.episode_id
    writer.stage()
    if not leases.renew(eid):
        writer.discard()
        logger.warning("label: episode %s: another job took its lease over; its rows from this job are dropped", eid)
        return
    marker = writer.land(run_id, fingerprint, lambda: leases.holds(eid))
    if marker is None:
        writer.discard()
        leases.abandon(eid)
        logger.warning("label: episode %s: this job stalled past its lease while committing; the episode is left to the job "
                       "that takes it over, or to the next run", eid)
        return
    leases.release([eid])
    progress.frames += marker["frames"]
    progress.errors += marker["errors"]
    progress.episodes_done += 1
    if marker["frames"] == 0:
        empty.append(eid)
    # One line per episode only when asked: a season is hundreds; the bar says how far the run is.
    logger.log(logging.INFO if console.verbose() else logging.DEBUG, "label: episode %s committed: %d frames, %d errors (%s)",
               eid, marker["frames"], marker["errors"], progress.line())


def _build_dataset(config: LabelConfig, specs: list[ReadSpec], preprocess: PreprocessConfig, model_id: str, grow: bool):
    """read -> decode (CPU tasks) -> predict (actor pool); the few Ray Data lines in one place."""
    import ray

    block_rows = rows_per_block(preprocess.image_size)
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    # One read per spec: left to itself, Ray Data would cut every read block into
    # dozens of tiny ones to reach its default parallelism. A read task's output
    # comes out in blocks of at most BLOCK_BYTES (see _data_context), so the frames
    # of one large archive are decoded by many CPU tasks at once while it streams.
    only_videos = all(spec.video is not None for spec in specs)
    read_cpus = VIDEO_READ_TASK_CPUS if any(spec.video is not None for spec in specs) else READ_TASK_CPUS
    dataset = ray.data.read_datasource(frame_dump_datasource(specs, block_rows), num_cpus=read_cpus, override_num_blocks=len(specs))
    # Video frames leave their read task decoded and scaled: the predictor only
    # normalises them, so a run of videos alone needs no decode stage.
    in_predictor = decode_in_predictor(config) or only_videos
    if not only_videos:
        dataset = dataset.map_batches(
            route_frames if in_predictor else decode_frames,
            fn_kwargs={"preprocess": preprocess},
            # Routed JPEGs stay compressed, so their batches need not shrink with the image size.
            batch_size=MAX_ROWS_PER_BLOCK if in_predictor else block_rows,
            batch_format="numpy",
            num_cpus=min(DECODE_TASK_CPUS, max(cluster_cpus / 2, 0.25)),  # a 1-CPU machine still decodes
        )
    free = ray.available_resources()  # what other jobs on this cluster leave
    pool = predictor_pool(config, cluster_cpus, int(ray.cluster_resources().get("GPU", 0)), free.get("CPU", 0.0), free.get("GPU", 0.0),
                          grow=grow)
    if pool.max_size == pool.min_size:
        logger.info("label: predictor pool of %d actor(s)", pool.initial)
    else:
        logger.info("label: predictor pool of %d actor(s) to start, growing up to %s as frames queue and the cluster allows",
                    pool.initial, pool.max_size or "what the cluster holds")
    return dataset.map_batches(
        FramePredictor,
        fn_constructor_kwargs={
            "model_uri": config.model_uri,
            "top_k": config.top_k,
            "expected_model_id": model_id,
            "decode": in_predictor,
            **pool.predictor_args,
        },
        compute=pool.strategy(),
        batch_size=config.batch_size,
        batch_format="numpy",
        **pool.resources,
    )


@contextlib.contextmanager
def _discard_on_failure(writers: dict[str, EpisodeWriter]) -> Iterator[None]:
    try:
        yield
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise


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

