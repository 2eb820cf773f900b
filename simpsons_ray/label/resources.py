"""What the labeling job runs on: its Ray, the GPUs it waits for, and the size of its predictor pool.

Ray Data runs every stage where this module says: read tasks, decode tasks and
predictor actors each reserve CPUs (or a GPU) so that they run side by side on a
small machine and spread over a cluster's nodes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from simpsons_ray.core import cluster, console
from simpsons_ray.core.errors import UserError
from simpsons_ray.label.config import LabelConfig

logger = logging.getLogger("simpsons_ray.label")


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
        gpus = cluster_gpus if free_gpus is None else int(free_gpus)
        initial = max(1, min(limit or gpus, gpus))
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
