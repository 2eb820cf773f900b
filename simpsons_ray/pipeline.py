"""The Ray side of labeling: one Ray Dataset for all episodes still to do, and the sizes of its stages.

    read      one task per archive, per chunk of a folder, or per time range of a video   (ingest.py, frames.py, video.py)
    decode    CPU tasks: decode, resize, normalise, as the model artifact says          (ingest.py, preprocess.py)
              (video frames arrive decoded and resized by their read task: only normalised here;
              with --gpu: header checks only, the predictor decodes JPEGs on the GPU, see --decode)
    predict   an actor pool (one actor per GPU, or CPU actors); the model loads once per actor   (predictor.py)
    write     the driver appends each episode's rows to a temporary Parquet file as they come    (commit.py)

Every read block carries its read task's id, and the task's last row says how
many rows the task produced, so the driver knows when an episode is complete
whatever order the blocks arrive in, and commits it then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from simpsons_ray import frames as frames_lib
from simpsons_ray.commit import EpisodeWriter, LabelSettings
from simpsons_ray.errors import UserError
from simpsons_ray.ingest import (
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
from simpsons_ray.layout import OutputLayout
from simpsons_ray.predictor import FramePredictor
from simpsons_ray.preprocess import PreprocessConfig

if TYPE_CHECKING:
    from simpsons_ray.labeling import LabelConfig

logger = logging.getLogger("simpsons_ray.labeling")

PROGRESS_EVERY_S = 10.0

# Logical CPU reservations, which decide what Ray runs side by side. Reading is
# mostly waiting on storage: a quarter CPU, so reads overlap with decoding. A
# video's read task decodes and scales its range itself, on one FFmpeg thread: half
# a CPU, so that on 2 cores two ranges decode beside the two predictor actors
# (at 4 sampled frames/s the actors have little to do, and decoding every frame
# is most of the work). Decoding frame files is real CPU work: one CPU per task
# (half the cluster's CPUs at most). A CPU predictor actor reserves half a CPU at most (its forward pass still uses its
# share of the cores) so that decode tasks run beside the actors even on a 2-CPU
# machine; the different reservation also keeps Ray Data from fusing decoding
# into the actor, which would serialise it.
READ_TASK_CPUS = 0.25
VIDEO_READ_TASK_CPUS = 0.5
DECODE_TASK_CPUS = 1.0
CPU_PREDICTOR_CPUS = 0.5
DECODE_CHOICES = ("auto", "tasks", "predictor")


@dataclass
class Progress:
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


def run_pipeline(
    config: LabelConfig,
    layout: OutputLayout,
    run_id: str,
    todo: list[frames_lib.Episode],
    classes: list[str],
    preprocess: PreprocessConfig,
    settings: LabelSettings,
    progress: Progress,
) -> list[str]:
    """Stream every frame of ``todo`` through the model; commit each episode as it completes."""
    videos = VideoPlan(config.sample_fps, config.seconds_per_read_task, preprocess.image_size)
    specs = plan_read_tasks(todo, config.frames_per_read_task, videos)
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


def check_resources(config: LabelConfig) -> None:
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


def ensure_ray() -> None:
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

