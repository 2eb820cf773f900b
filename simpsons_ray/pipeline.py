"""The Ray side of labeling: one Ray Dataset for all episodes still to do, and the sizes of its stages.

    read      one task per folder or archive (it lists its own frames), or per time range of a video  (ingest.py, frames.py, video.py)
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

from simpsons_ray import cluster, console
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
from simpsons_ray.leases import LeaseKeeper
from simpsons_ray.predictor import FramePredictor
from simpsons_ray.preprocess import PreprocessConfig

if TYPE_CHECKING:
    from simpsons_ray.labeling import LabelConfig

logger = logging.getLogger("simpsons_ray.labeling")


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
    first_batch_at: float | None = None  # time.monotonic() when the first labelled batch reached the driver

    def rate(self) -> float:
        return self.frames / max(time.monotonic() - self.started, 1e-9)

    def line(self) -> str:
        return (
            f"{self.episodes_done}/{self.episodes_total} episodes, {self.frames:,} frames labelled, "
            f"{self.errors:,} errors, {self.rate():,.1f} frames/s"
        )


def _frames_total(expected: dict[int, int], tasks: int) -> tuple[float | None, bool]:
    """(total frames, whether it is an estimate): a read task's count is known when it ends.

    Until every task has ended, each unfinished one counts as the mean of the ended
    ones, so the total and the ETA settle as the work goes.
    """
    if not expected:
        return None, True
    known = sum(expected.values())
    unfinished = tasks - len(expected)
    return known + unfinished * known / len(expected), unfinished > 0


def run_pipeline(
    config: LabelConfig,
    layout: OutputLayout,
    run_id: str,
    todo: list[frames_lib.Episode],
    classes: list[str],
    preprocess: PreprocessConfig,
    settings: LabelSettings,
    progress: Progress,
    leases: LeaseKeeper,
    grow: bool = True,
) -> list[str]:
    """Stream every frame of ``todo`` through the model; commit each episode as it completes, if its lease is still ours.

    When the run fails, the episodes under way are dropped: their temporary files
    deleted, S3 uploads aborted.
    """
    videos = VideoPlan(config.sample_fps, config.seconds_per_read_task, preprocess.image_size)
    specs = plan_read_tasks(todo, videos)
    by_id = {e.episode_id: e for e in todo}
    tasks_of: dict[str, set[int]] = defaultdict(set)
    episode_of: dict[int, str] = {}
    for spec in specs:
        tasks_of[spec.episode_id].add(spec.task_id)
        episode_of[spec.task_id] = spec.episode_id
    received: Counter[int] = Counter()
    expected: dict[int, int] = {}
    writers: dict[str, EpisodeWriter] = {}
    fingerprints: dict[str, str] = {}  # what each episode's read tasks saw of its source
    empty: list[str] = []

    bar, seen = console.ProgressBar("label", "frames"), 0
    with _data_context(), _discard_on_failure(writers):
        dataset = _build_dataset(config, specs, preprocess, settings.model_id, grow)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            if progress.first_batch_at is None:
                progress.first_batch_at = time.monotonic()
            episode_ids = batch["episode"]
            for eid in np.unique(episode_ids):
                writer = writers.get(eid)
                if writer is None:
                    writer = writers[eid] = EpisodeWriter(layout, run_id, by_id[eid], classes, settings)
                writer.add({k: v[episode_ids == eid] for k, v in batch.items()})
            seen += len(batch["task"])
            tasks, counts = np.unique(batch["task"], return_counts=True)
            received.update(dict(zip(tasks.tolist(), counts.tolist())))
            ends = batch["task_end"] > 0
            expected.update(zip(batch["task"][ends].tolist(), batch["task_end"][ends].tolist()))
            for eid, fingerprint in zip(episode_ids[ends].tolist(), batch["fingerprint"][ends].tolist()):
                if fingerprints.setdefault(eid, fingerprint) != fingerprint:
                    logger.warning("label: episode %s changed while it was being read; a rerun will say so", eid)
                    fingerprints[eid] = "changed during the run"
            for task in tasks.tolist():
                if expected.get(task) != received[task]:
                    continue
                eid = episode_of[task]
                tasks_of[eid].discard(task)
                if not tasks_of[eid]:
                    del tasks_of[eid]
                    writer = writers.pop(eid)
                    if not leases.still_mine(eid):
                        writer.discard()
                        logger.warning("label: episode %s: another job took its lease over; its rows from this job are dropped", eid)
                        continue
                    marker = writer.commit(run_id, fingerprints.get(eid, ""))
                    leases.release([eid])
                    progress.frames += marker["frames"]
                    progress.errors += marker["errors"]
                    progress.episodes_done += 1
                    if marker["frames"] == 0:
                        empty.append(eid)
                    # One line per episode only when asked: a season is hundreds; the bar says how far the run is.
                    logger.log(logging.INFO if console.verbose() else logging.DEBUG, "label: episode %s committed: %d frames, %d errors (%s)",
                               eid, marker["frames"], marker["errors"], progress.line())
            total, estimated = _frames_total(expected, len(specs))
            bar.update(seen, total, estimated,
                       note=f"{progress.episodes_done}/{progress.episodes_total} episodes" + (f", {progress.errors:,} errors" if progress.errors else ""))
    bar.close(note=f"{progress.episodes_done}/{progress.episodes_total} episodes")
    if tasks_of:
        # Every read task reports its row count, so this means rows went missing.
        raise RuntimeError(f"labeling ended with episodes incomplete: {sorted(tasks_of)}")
    return sorted(empty)


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



def decode_in_predictor(config: LabelConfig) -> bool:
    """Whether JPEG frames are decoded by the predictor instead of by CPU tasks.

    "auto" picks the predictor when it runs on a GPU: nvJPEG decodes there, the
    CPU tasks only check headers, and compressed frames instead of float tensors
    travel to the GPU. On CPU, decoding in separate tasks keeps both kinds of
    work running side by side, so "auto" keeps the tasks.
    """
    return config.decode == "predictor" or (config.decode == "auto" and config.use_gpu)


@dataclass(frozen=True)
class PoolPlan:
    """The predictor pool: Ray Data grows it from ``initial`` up to ``max_size`` (None: no limit) as work and cluster allow.

    It never shrinks below what it started with: actors that a quiet moment let go
    would each cost a model load (seconds) when the frames come back.
    """

    min_size: int
    initial: int
    max_size: int | None
    predictor_args: dict[str, Any]
    resources: dict[str, Any]

    def strategy(self):
        import ray

        if self.max_size == self.min_size:
            return ray.data.ActorPoolStrategy(size=self.min_size)
        return ray.data.ActorPoolStrategy(min_size=self.min_size, max_size=self.max_size, initial_size=self.initial)


def predictor_pool(config: LabelConfig, cluster_cpus: int, cluster_gpus: int = 0, free_cpus: float | None = None,
                   free_gpus: float | None = None, grow: bool = True) -> PoolPlan:
    """How the predictor pool is sized: elastic, from one actor up to ``--num-workers`` (default: no limit).

    The pool starts with what is free on the cluster now (one actor per free GPU,
    or per free CPU once a decode task has one) and Ray Data adds actors while
    frames queue up and the cluster has room, including room an autoscaler adds
    while the job runs; idle actors go away. A snapshot of the whole cluster at
    start-up would keep one actor on a cluster whose workers start at zero
    (cluster.yaml), however many nodes arrive later; and two jobs that each sized
    themselves to the whole cluster left no CPU for either's decode tasks.

    CPU actors are single-threaded by default: on 2 cores, two single-threaded
    actors labelled 919 frames/s where one actor with two threads did 816
    (80,000 frames, resnet18 at 64 px): the threads of one forward pass wait for
    each other at every layer, separate actors never do. A ``--num-workers``
    smaller than the CPUs gives each actor its share of them as threads.
    """
    limit = config.num_workers
    if config.use_gpu:
        free = cluster_gpus if free_gpus is None else int(free_gpus)
        initial = max(1, min(limit or free, free))
        return PoolPlan(initial, initial, limit if grow else initial, {"device": "cuda"}, {"num_gpus": 1, "num_cpus": 1})
    free = cluster_cpus if free_cpus is None else free_cpus
    room = int((free - DECODE_TASK_CPUS) / CPU_PREDICTOR_CPUS) if free > DECODE_TASK_CPUS else 1
    initial = max(1, min(limit or cluster_cpus, cluster_cpus, room))
    threads = max(1, cluster_cpus // limit) if limit else 1  # each actor's share of the cores, for its forward pass
    # Decode tasks share the cores with the forward pass. OpenMP threads that spin
    # while waiting would take their time slices; passive waiting lets them run.
    # An actor reserves half a CPU (its forward pass still uses its share of the
    # cores), so decode tasks always fit beside the actors; --num-workers actors
    # together reserve at most half the CPUs of the cluster as it is now.
    reserve = min(CPU_PREDICTOR_CPUS, cluster_cpus / 2 / limit) if limit else CPU_PREDICTOR_CPUS
    resources = {"num_cpus": reserve, "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}}
    return PoolPlan(initial, initial, limit if grow else initial, {"device": "cpu", "cpu_threads": threads}, resources)


# How long --gpu waits, by default, for an autoscaler to add a GPU node: a cloud GPU
# node takes a few minutes to boot and join.
WAIT_FOR_GPUS_S = 600.0
WAIT_LINE_EVERY_S = 30.0


def check_resources(config: LabelConfig, can_autoscale: bool) -> None:
    """--gpu on a cluster without GPUs: wait for an autoscaler to add one, or fail in one sentence.

    A cluster whose autoscaler publishes its node types (cluster.py) is asked for
    a GPU when one of them has GPUs, and refused at once when none has. Any other
    cluster this job joined may still autoscale (KubeRay, a managed service):
    there too the job asks for a GPU and waits up to ``config.wait_for_gpus``
    seconds, with a line every 30 s. A local Ray that this job started itself
    cannot grow, so there it fails at once.
    """
    import ray

    if not config.use_gpu or ray.cluster_resources().get("GPU", 0) >= 1:
        return
    types = cluster.node_types()
    if types is not None and not cluster.can_add("GPU", types):
        raise UserError("--gpu was given but the Ray cluster has no GPU and its autoscaler has no GPU node type: "
                        "add one to the cluster's config, or drop --gpu to label on CPUs.")
    if (types is None and not can_autoscale) or config.wait_for_gpus <= 0:
        raise UserError("--gpu was given but the Ray cluster has no GPU: start it on GPU nodes, or drop --gpu to label on CPUs.")
    from ray.autoscaler.sdk import request_resources

    wanted = config.num_workers or 1
    request_resources(bundles=[{"GPU": 1}] * wanted)
    started = last_line = time.monotonic()
    logger.info("label: the Ray cluster has no GPU yet; asked its autoscaler for %d and waiting up to %.0f s (--wait-for-gpus)",
                wanted, config.wait_for_gpus)
    try:
        while ray.cluster_resources().get("GPU", 0) < 1:
            waited = time.monotonic() - started
            if waited >= config.wait_for_gpus:
                raise UserError(
                    f"--gpu was given but no GPU joined the Ray cluster within {config.wait_for_gpus:.0f} s (--wait-for-gpus): "
                    "check that its autoscaler can start GPU nodes, wait longer, or drop --gpu to label on CPUs."
                )
            if time.monotonic() - last_line >= WAIT_LINE_EVERY_S:
                last_line = time.monotonic()
                logger.info("label: still waiting for a GPU node: %.0f s of %.0f s", waited, config.wait_for_gpus)
            time.sleep(min(1.0, config.wait_for_gpus - waited))
        logger.info("label: a GPU joined the cluster after %.0f s", time.monotonic() - started)
    finally:
        request_resources(bundles=[])  # the predictors' own requests keep what they use; drop the standing ask


STARTED, JOINED, ATTACHED = "started", "joined", "attached"


def ensure_ray() -> str:
    """Join the Ray cluster of this job (RAY_ADDRESS, `ray job submit`), or start a local one.

    Returns how: STARTED (a local Ray of this process, which cannot grow), JOINED
    (a cluster by its address, which may autoscale), or ATTACHED (Ray was already
    initialised by the caller: a library user, the tests).
    """
    import ray

    if ray.is_initialized():
        return ATTACHED
    address = os.environ.get("RAY_ADDRESS") or None
    console.init_ray(address)
    return JOINED if address not in (None, "local") else STARTED


def pool_can_grow(connection: str) -> bool:
    """Whether the predictor pool should be elastic: on a cluster that may gain nodes or lose other jobs.

    A job that joined a cluster by its address, or one whose autoscaler publishes
    node types, gets an elastic pool. A local Ray (started here or by the caller)
    keeps the fixed pool it starts with: on 2 cores Ray Data's elastic pool took
    8 s longer over a 2,400-frame run than a fixed one of the same size, and a
    local Ray never gains a CPU.
    """
    return connection == JOINED or cluster.node_types() is not None


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

