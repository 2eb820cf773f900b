"""Label whole episodes: frame dumps and video files -> Ray Data -> predictor actors -> Parquet, exactly once.

Run it on one CPU, one GPU or a cluster with the same command::

    simpsons-ray label --model model/ --frames episodes/ --output labels/
    simpsons-ray label --model s3://b/model --frames s3://b/episodes --output s3://b/labels --gpu --num-workers 4 --batch-size 256
    ray job submit --working-dir . -- python jobs/label.py --model ... --frames ... --output ... --gpu

This module runs one labeling job: it checks the inputs, works out which
episodes are still to do, clears what an interrupted run left, runs the
pipeline and writes the run summary. The rest has its own home:

    frames.py, video.py   what an episode is: a folder or archive of frames, or a video file
    ingest.py             read and decode tasks (no torch)
    predictor.py          the model, loaded once per actor
    pipeline.py           the Ray Dataset and the sizes of its stages
    commit.py, layout.py  how an episode's rows land, and where

Exactly once: an episode becomes visible when its finished file is moved into
``OUTPUT/episode=<id>/`` and then marked done in ``OUTPUT/_progress/<id>.json``.
A rerun skips marked episodes (no inference when all are done) and first removes
whatever an interrupted run left of the others, so every frame ends up in exactly
one row.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from simpsons_ray import frames as frames_lib
from simpsons_ray import schema, storage, video
from simpsons_ray.commit import LabelSettings
from simpsons_ray.errors import UserError
from simpsons_ray.layout import OutputLayout
from simpsons_ray.leases import LeaseKeeper
from simpsons_ray.model import read_artifact_config
from simpsons_ray.pipeline import (
    DECODE_CHOICES,
    STARTED,
    WAIT_FOR_GPUS_S,
    Progress,
    check_resources,
    ensure_ray,
    pool_can_grow,
    run_pipeline,
)
from simpsons_ray.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelConfig:
    """Everything one labeling run needs; the CLI builds it from its flags."""

    model_uri: str
    frames_uri: str  # frame dumps and video files (frames.py)
    output_uri: str
    fps: float | None = None  # frame dumps: timestamp_s = (frame - first_frame_number) / fps; null without it
    first_frame_number: int = 0  # the number of a dump's first frame (ffmpeg's image2 muxer starts at 1)
    sample_fps: float | None = video.DEFAULT_SAMPLE_FPS  # videos: frames kept per second of video; None: every frame
    episodes: tuple[str, ...] = ()  # empty: every episode under frames_uri
    batch_size: int = 64  # frames per forward pass
    num_workers: int | None = None  # the most predictor actors; None: as many as the cluster holds (see pipeline.predictor_pool)
    use_gpu: bool = False
    wait_for_gpus: float = WAIT_FOR_GPUS_S  # --gpu on a cluster with none yet: seconds to wait for its autoscaler
    # The score a character needs to be on screen: it replaces a multi-label model's own
    # per-character thresholds; None: those thresholds, and 0.0 for a single-label model.
    min_confidence: float | None = None
    top_k: int = 3
    overwrite: bool = False  # relabel episodes already done
    decode: str = "auto"  # where frames are decoded: "tasks" (PIL, CPU tasks), "predictor", or "auto" (see pipeline.decode_in_predictor)
    seconds_per_read_task: float = video.SECONDS_PER_READ_TASK  # a video is decoded in time ranges this long


def label(config: LabelConfig) -> dict[str, Any]:
    """Label every episode under ``config.frames_uri`` that is not done yet; returns the run summary."""
    started_at, t0 = _now(), time.monotonic()
    _validate(config)
    model_config, classes = read_artifact_config(config.model_uri)  # UserError if not a model
    preprocess = PreprocessConfig.from_model_config(model_config)
    settings = LabelSettings(
        model_id=_model_id(config.model_uri, model_config),
        top_k=min(config.top_k, len(classes)),
        fps=float(config.fps) if config.fps else None,
        first_frame_number=int(config.first_frame_number),
        sample_fps=float(config.sample_fps) if config.sample_fps else None,
        **_thresholds(config, model_config, classes),
    )
    episodes = frames_lib.list_episodes(config.frames_uri, config.episodes)
    if config.fps and all(e.kind == frames_lib.VIDEO for e in episodes):
        logger.warning("label: --fps is for frame dumps; a video's timestamps come from the video itself, so it is ignored")
    storage.check_writable(config.output_uri, "labels output")
    layout = OutputLayout(config.output_uri)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]

    todo, skipped, stale = _split_done(layout, episodes, settings, config.overwrite)
    leases = LeaseKeeper(config.output_uri, run_id)
    # Episodes another live job is labelling are its to finish: skipped here.
    held, elsewhere = leases.acquire(e.episode_id for e in todo)
    with leases:  # renews the leases while the job runs, and gives back what is left at the end
        # Between our look at the markers and our leases, another job may have committed some.
        mine = set(held)
        todo, done_meanwhile, _ = _split_done(layout, [e for e in todo if e.episode_id in mine], settings, config.overwrite)
        leases.release(e.episode_id for e in done_meanwhile)
        skipped += done_meanwhile
        logger.info(
            "label: %d episode(s) under %s, %d already labelled by %s, %d held by other running jobs, %d to do",
            len(episodes), config.frames_uri, len(skipped), settings.model_id, len(elsewhere), len(todo),
        )
        if elsewhere:
            logger.info("label: skipped, being labelled by another job: %s", frames_lib.preview([f"{e} ({job})" for e, job in sorted(elsewhere.items())]))
        grow = False
        if todo:
            _check_weights(config.model_uri, model_config, settings.model_id)
            connection = ensure_ray()
            check_resources(config, can_autoscale=connection != STARTED)
            grow = pool_can_grow(connection)
        # What killed or failed runs left: their temporary files and open S3 uploads,
        # and the rows or errors of episodes they never marked done (only episodes
        # this job holds: a live job's files are its own). Removed before any new row.
        dead = layout.remove_dead_runs(leases.live_jobs() | {run_id})
        if dead:
            logger.info("label: removed the temporary files of %d run(s) that did not finish: %s", len(dead), frames_lib.preview(dead))
        layout.remove_partial_writes({e.episode_id for e in todo})
        for episode in todo:
            layout.remove_episode(episode.episode_id)

        progress = Progress(len(todo))
        empty: list[str] = []
        if todo:
            try:
                empty = run_pipeline(config, layout, run_id, todo, classes, preprocess, settings, progress, leases, grow)
            finally:
                storage.abort_uploads(layout.tmp_run_dir(run_id))
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
        "episodes_held_elsewhere": sorted(elsewhere),
        "episodes_stale": stale,
        "episodes_lost_lease": sorted(leases.lost),
        "empty_episodes": empty,
        "wall_time_s": round(wall, 3),
        # From the start of the run (Ray start-up included) to the first labelled batch.
        "first_batch_s": round(progress.first_batch_at - t0, 3) if progress.first_batch_at else None,
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
    if stale:
        logger.warning("label: the frames or video of %d labelled episode(s) changed since they were labelled, and their labels "
                       "were kept: %s; pass --overwrite --episodes %s to relabel them", len(stale), frames_lib.preview(stale), " ".join(stale[:20]))
    return summary


def _validate(config: LabelConfig) -> None:
    if config.batch_size <= 0 or (config.num_workers is not None and config.num_workers <= 0) or config.top_k <= 0:
        raise UserError("--batch-size, --num-workers and --top-k must be positive integers.")
    if config.decode not in DECODE_CHOICES:
        raise UserError(f"--decode {config.decode} is not one of {', '.join(DECODE_CHOICES)}.")
    if config.min_confidence is not None and not 0.0 <= config.min_confidence <= 1.0:
        raise UserError(f"--min-confidence {config.min_confidence} is not a probability: give a value between 0 and 1.")
    if config.fps is not None and config.fps <= 0:
        raise UserError(f"--fps {config.fps} must be a positive number of frames per second.")
    if config.sample_fps is not None and config.sample_fps <= 0:
        raise UserError(f"--sample-fps {config.sample_fps} must be a positive number of frames per second, or 'all'.")
    if config.first_frame_number < 0:
        raise UserError(f"--first-frame-number {config.first_frame_number} must be 0 or more.")
    if config.wait_for_gpus < 0:
        raise UserError(f"--wait-for-gpus {config.wait_for_gpus} must be 0 or more seconds.")
    if config.seconds_per_read_task <= 0:
        raise UserError("seconds_per_read_task must be positive.")


def _thresholds(config: LabelConfig, model_config: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """LabelSettings' min_confidence and thresholds: a given --min-confidence, else the model's own.

    A single-label model keeps 0.0 (every top-1) as its default, the value markers
    written before multi-label models hold, so their episodes still count as done.
    """
    objective = model_config.get("objective", "single")  # model.Artifact.objective, read without loading the weights
    if objective not in ("single", "multilabel"):
        raise UserError(f"{config.model_uri} has objective {objective!r} in its config.json: "
                        "this version labels with \"single\" and \"multilabel\" models only.")
    if config.min_confidence is not None:
        return {"min_confidence": float(config.min_confidence)}
    if objective == "single":
        return {"min_confidence": 0.0}
    thresholds = model_config.get("thresholds")
    if (not isinstance(thresholds, list) or len(thresholds) != len(classes)
            or not all(isinstance(t, (int, float)) and 0.0 <= t <= 1.0 for t in thresholds)):
        raise UserError(
            f"{config.model_uri} is a multi-label model without a threshold between 0 and 1 for each of its {len(classes)} "
            "characters in its config.json: pass --min-confidence, or save the model with its thresholds."
        )
    return {"min_confidence": None, "thresholds": tuple(float(t) for t in thresholds)}


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
) -> tuple[list[frames_lib.Episode], list[frames_lib.Episode], list[str]]:
    """(episodes to label, episodes already labelled with these settings, ids of those whose source changed since).

    An episode whose frames or video changed since it was labelled is reported,
    and relabelled only with ``overwrite``.
    """
    if overwrite:
        return list(episodes), [], []
    markers = dict(zip((e.episode_id for e in episodes), storage.in_threads(lambda e: _read_marker(layout, e), episodes)))
    todo, done, clashes = [], [], []
    for episode in episodes:
        marker = markers[episode.episode_id]
        if marker is None:
            todo.append(episode)
            continue
        diff = settings.differences(marker, episode.kind)
        if diff:
            clashes.append(f"{episode.episode_id} ({', '.join(diff)})")
        else:
            done.append(episode)
    if clashes:
        raise UserError(
            f"{layout.output_uri} already holds labels made with other settings for episode(s) {'; '.join(clashes[:3])}"
            f"{' and more' if len(clashes) > 3 else ''}: pass --overwrite to relabel them, or choose another --output."
        )
    # Markers written before fingerprints existed have none: nothing to compare.
    fingerprinted = [e for e in done if markers[e.episode_id].get("source_fingerprint")]
    now = dict(zip((e.episode_id for e in fingerprinted), storage.in_threads(frames_lib.fingerprint, fingerprinted)))
    stale = sorted(e.episode_id for e in fingerprinted if now[e.episode_id] != markers[e.episode_id]["source_fingerprint"])
    return todo, done, stale


def _read_marker(layout: OutputLayout, episode: frames_lib.Episode) -> dict[str, Any] | None:
    try:
        return storage.read_json(layout.marker(episode.episode_id))
    except FileNotFoundError:
        return None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
