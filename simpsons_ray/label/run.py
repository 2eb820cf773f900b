"""Label whole episodes: frame dumps and video files -> Ray Data -> predictor actors -> Parquet, exactly once.

Run it on one CPU, one GPU or a cluster with the same command::

    simpsons-ray label --model model/ --frames episodes/ --output labels/
    simpsons-ray label --model s3://b/model --frames s3://b/episodes --output s3://b/labels --gpu --num-workers 4 --batch-size 256
    ray job submit --working-dir . -- python jobs/label.py --model ... --frames ... --output ... --gpu

This module runs one labeling job, step by step: it checks the inputs, works out
which episodes are still to do (``todo``), takes their leases (``leases``), clears
what an interrupted run left, runs the pipeline (``pipeline``) and writes the run
summary.

Exactly once: an episode becomes visible when its finished file is moved into
``OUTPUT/episode=<id>/`` and then marked done in ``OUTPUT/_progress/<id>.json``.
A rerun skips marked episodes (no inference when all are done) and first removes
whatever an interrupted run left of the others, so every frame ends up in exactly
one row.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from simpsons_ray.core import storage
from simpsons_ray.core.clock import now_iso, run_stamp
from simpsons_ray.label import episodes as episodes_lib
from simpsons_ray.label.config import LabelConfig, validate
from simpsons_ray.label.leases import LeaseKeeper
from simpsons_ray.label.pipeline import Progress, run_pipeline
from simpsons_ray.label.resources import STARTED, check_resources, ensure_ray, pool_can_grow
from simpsons_ray.label.settings import LabelSettings, check_weights, settings_for
from simpsons_ray.label.todo import split_done
from simpsons_ray.labels import schema
from simpsons_ray.labels.layout import OutputLayout
from simpsons_ray.model.artifact import read_artifact_config
from simpsons_ray.model.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    """One labeling run: what it was asked, the model it labels with, and what became of its episodes."""

    config: LabelConfig
    model_config: dict[str, Any]
    classes: list[str]
    settings: LabelSettings
    episodes: list[episodes_lib.Episode]
    layout: OutputLayout
    run_id: str = field(default_factory=lambda: f"{run_stamp()}-{uuid.uuid4().hex[:6]}")
    started_at: str = field(default_factory=now_iso)
    t0: float = field(default_factory=time.monotonic)
    todo: list[episodes_lib.Episode] = field(default_factory=list)
    skipped: list[episodes_lib.Episode] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    elsewhere: dict[str, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_model_config(self.model_config)


def label(config: LabelConfig) -> dict[str, Any]:
    """Label every episode under ``config.frames_uri`` that is not done yet; returns the run summary."""
    started_at, t0 = now_iso(), time.monotonic()  # the wall time counts the checks and listing too
    job = _prepare(config)
    job.started_at, job.t0 = started_at, t0
    job.todo, job.skipped, job.stale = split_done(job.layout, job.episodes, job.settings, config.overwrite)
    leases = LeaseKeeper(config.output_uri, job.run_id)
    # Episodes another live job is labelling are its to finish: skipped here.
    held, job.elsewhere = leases.acquire(e.episode_id for e in job.todo)
    with leases:  # renews the leases while the job runs, and gives back what is left at the end
        _keep_held(job, set(held), leases)
        grow = _start_ray(job) if job.todo else False
        _clear_leftovers(job, leases)
        progress, empty = _label_todo(job, leases, grow)
    summary = _summary(job, progress, empty, leases)
    storage.write_json(job.layout.run_summary(job.run_id), summary)
    _say_done(job, summary, empty)
    return summary


def _prepare(config: LabelConfig) -> _Job:
    """Every check that needs no Ray: the flags, the model, the episodes, the output."""
    validate(config)
    model_config, classes = read_artifact_config(config.model_uri)  # UserError if not a model
    settings = settings_for(config, model_config, classes)
    refused: list[str] = []  # names whose id is outside the alphabet of labels.ids: listed, never written
    episodes = episodes_lib.list_episodes(config.frames_uri, config.episodes, refused)
    if config.fps and all(e.kind == episodes_lib.VIDEO for e in episodes):
        logger.warning("label: --fps is for frame dumps; a video's timestamps come from the video itself, so it is ignored")
    storage.check_writable(config.output_uri, "labels output")
    return _Job(config, model_config, classes, settings, episodes, OutputLayout(config.output_uri), refused=refused)


def _keep_held(job: _Job, held: set[str], leases: LeaseKeeper) -> None:
    """Keep the episodes whose leases this job got; those another job committed since the first look count as done."""
    job.todo, done_meanwhile, _ = split_done(job.layout, [e for e in job.todo if e.episode_id in held], job.settings,
                                             job.config.overwrite)
    leases.release(e.episode_id for e in done_meanwhile)
    job.skipped += done_meanwhile
    logger.info(
        "label: %d episode(s) under %s, %d already labelled by %s, %d held by other running jobs, %d to do",
        len(job.episodes), job.config.frames_uri, len(job.skipped), job.settings.model_id, len(job.elsewhere), len(job.todo),
    )
    if job.elsewhere:
        logger.info("label: skipped, being labelled by another job: %s",
                    episodes_lib.preview([f"{e} ({holder})" for e, holder in sorted(job.elsewhere.items())]))


def _start_ray(job: _Job) -> bool:
    """Join or start Ray, wait for GPUs if asked; whether the predictor pool may grow."""
    check_weights(job.config.model_uri, job.model_config, job.settings.model_id)
    connection = ensure_ray()
    check_resources(job.config, can_autoscale=connection != STARTED)
    return pool_can_grow(connection)


def _clear_leftovers(job: _Job, leases: LeaseKeeper) -> None:
    """What killed or failed runs left: their temporary files and open S3 uploads, and the rows or errors of episodes
    they never marked done (only episodes this job holds: a live job's files are its own). Removed before any new row."""
    dead = job.layout.remove_dead_runs(leases.live_jobs() | {job.run_id})
    if dead:
        logger.info("label: removed the temporary files of %d run(s) that did not finish: %s", len(dead), episodes_lib.preview(dead))
    job.layout.remove_partial_writes({e.episode_id for e in job.todo})
    for episode in job.todo:
        job.layout.remove_episode(episode.episode_id)


def _label_todo(job: _Job, leases: LeaseKeeper, grow: bool) -> tuple[Progress, list[str]]:
    """Run the pipeline over the episodes to do; its temporary files go whatever happens."""
    progress = Progress(len(job.todo))
    if not job.todo:
        return progress, []
    try:
        empty = run_pipeline(job.config, job.layout, job.run_id, job.todo, job.classes, job.preprocess, job.settings,
                             progress, leases, grow)
    finally:
        storage.abort_uploads(job.layout.tmp_run_dir(job.run_id))
        storage.delete(job.layout.tmp_run_dir(job.run_id))
    return progress, empty


def _summary(job: _Job, progress: Progress, empty: list[str], leases: LeaseKeeper) -> dict[str, Any]:
    wall = time.monotonic() - job.t0
    return {
        "run_id": job.run_id,
        "model_id": job.settings.model_id,
        "frames_labelled": progress.frames,
        "errors": progress.errors,
        "episodes": len(job.episodes),
        "episodes_labelled": progress.episodes_done,
        "episodes_skipped": len(job.skipped),
        "episodes_held_elsewhere": sorted(job.elsewhere),
        "episodes_stale": job.stale,
        "episodes_lost_lease": sorted(leases.lost),
        "episodes_refused": job.refused,
        "empty_episodes": empty,
        "wall_time_s": round(wall, 3),
        # From the start of the run (Ray start-up included) to the first labelled batch.
        "first_batch_s": round(progress.first_batch_at - job.t0, 3) if progress.first_batch_at else None,
        "frames_per_s": round(progress.frames / wall, 2) if wall > 0 else 0.0,
        "started_at": job.started_at,
        "finished_at": now_iso(),
        "output": job.config.output_uri,
        "config": asdict(job.config),
    }


def _say_done(job: _Job, summary: dict[str, Any], empty: list[str]) -> None:
    logger.info(
        "label: done in %.1f s: %d frames labelled (%.1f frames/s), %d errors, %d episodes labelled, %d skipped as done; "
        "model %s; labels in %s, summary in %s",
        summary["wall_time_s"], summary["frames_labelled"], summary["frames_per_s"], summary["errors"], summary["episodes_labelled"],
        summary["episodes_skipped"], job.settings.model_id, job.config.output_uri, job.layout.run_summary(job.run_id),
    )
    if empty:
        logger.info("label: no frames in episode(s) %s (see %s)", ", ".join(empty), storage.join(job.config.output_uri, schema.ERRORS_DIR))
    if job.stale:
        logger.warning("label: the frames or video of %d labelled episode(s) changed since they were labelled, and their labels "
                       "were kept: %s; pass --overwrite --episodes %s to relabel them", len(job.stale), episodes_lib.preview(job.stale),
                       " ".join(job.stale[:20]))
