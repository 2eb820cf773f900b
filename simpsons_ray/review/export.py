"""``simpsons-ray review export``: pick the frames a person should look at, and write them for Label Studio or as folders.

    simpsons-ray review export --labels out/labels --model out/model --output review/ --limit 500
    simpsons-ray review export --labels s3://b/labels --model s3://b/model --output s3://b/review/ \\
        --pick character:ned_flanders --format folders --limit 200

The labels are read a few columns at a time (candidates.py); each picked frame is
read back from its ``source`` through the bounded reader of the thumbnails
(labels.thumbnails), a few dozen at a time, and written as a JPEG. A frame whose
source can no longer be read is counted, named in a warning and left out; when
none can be read, nothing is written.
"""

from __future__ import annotations

import io
import logging
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

import numpy as np
import pandas as pd
from PIL import Image

from simpsons_ray.core import storage
from simpsons_ray.core.clock import now_iso
from simpsons_ray.core.errors import UserError
from simpsons_ray.labels.thumbnails import fetch_sources
from simpsons_ray.media.images import ImageDecodeError, decode_rgb
from simpsons_ray.media.sources import split_source
from simpsons_ray.model.artifact import WEIGHTS_FILE, read_artifact_config, weights_id
from simpsons_ray.query.reading import open_labels
from simpsons_ray.review import folders, labelstudio
from simpsons_ray.review.candidates import check_answers, pick_frames
from simpsons_ray.review.manifest import FORMATS, KIND, MANIFEST_FILE, NOBODY, VERSION, ExportedFrame, check_classes, check_replaceable, frame_names
from simpsons_ray.review.picks import Decision, Pick

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 200
# Frames of one shot a second apart look alike; a reviewer's time is better spent on another moment.
DEFAULT_MIN_GAP_S = 1.0
JPEG_QUALITY = 90
# Video frames come back at up to this side: a 1080p episode's frames whole, big enough to draw a box on.
VIDEO_MAX_SIDE = 1920
# Sources read at once: each video is opened once per batch, and a batch of 1080p frames is ~200 MB decoded.
READ_BATCH = 32


@dataclass(frozen=True)
class ExportConfig:
    """One ``review export`` run: which labels and model, what to pick and how many, where and in which format."""

    labels_uri: str
    model_uri: str
    output_uri: str
    limit: int = DEFAULT_LIMIT
    pick: str = "uncertain"  # uncertain, random or character:NAME (picks.Pick)
    format: str = "labelstudio"  # one of manifest.FORMATS
    seed: int = 0  # random: the same seed picks the same frames
    min_gap_s: float = DEFAULT_MIN_GAP_S  # two picked frames of one episode at least this far apart
    image_url_prefix: str | None = None  # labelstudio: tasks show PREFIX + images/<name>.jpg instead of Label Studio's local files
    overwrite: bool = False  # replace an earlier export in output_uri

    def __post_init__(self) -> None:
        Pick.parse(self.pick)
        if self.format not in FORMATS:
            raise UserError(f"Unknown --format {self.format!r}: use one of {', '.join(FORMATS)}.")
        if int(self.limit) < 1:
            raise UserError(f"--limit must be a positive number of frames, got {self.limit}.")
        if not float(self.min_gap_s) >= 0:
            raise UserError(f"--min-gap-s must be 0 or more seconds, got {self.min_gap_s}.")
        if self.image_url_prefix is not None and self.format != "labelstudio":
            raise UserError("--image-url-prefix applies to --format labelstudio only.")


@dataclass(frozen=True)
class ExportResult:
    output_uri: str
    format: str
    frames: list[ExportedFrame]
    unreadable: list[str] = field(default_factory=list)  # sources of picked frames that could not be read


def model_decision(model_uri: str) -> tuple[Decision, str]:
    """How the model at ``model_uri`` decides, and its id; one sentence when it is not a model artifact."""
    config, classes = read_artifact_config(model_uri)
    check_classes(classes, model_uri)
    objective = config.get("objective", "single")
    if objective not in ("single", "multilabel"):
        raise UserError(f"{model_uri} has objective {objective!r} in its config.json: review exports know \"single\" and \"multilabel\".")
    thresholds = config.get("thresholds") if objective == "multilabel" else []
    if (not isinstance(thresholds, list) or (objective == "multilabel" and len(thresholds) != len(classes))
            or not all(isinstance(t, (int, float)) and 0.0 <= t <= 1.0 for t in thresholds)):
        raise UserError(f"{model_uri} is a multi-label model without a threshold between 0 and 1 for each of its {len(classes)} "
                        "characters in its config.json: save the model with its thresholds.")
    model_id = config.get("model_id") or weights_id(storage.read_bytes(storage.join(model_uri, WEIGHTS_FILE)), config["arch"])
    return Decision(tuple(classes), objective == "multilabel", tuple(float(t) for t in thresholds)), str(model_id)


def _exported_frames(picked: pd.DataFrame, file_of: Callable[[str, tuple[str, ...]], str]) -> list[ExportedFrame]:
    """The picks as exported frames: unique names, and each picture's file in the export from ``file_of(name, answer)``."""
    names = frame_names(picked["episode"].tolist(), picked["frame"].tolist())
    out = []
    for name, row in zip(names, picked.itertuples(index=False)):
        answer = tuple(row.answer)
        timestamp = None if pd.isna(row.timestamp_s) else float(row.timestamp_s)
        score = None if pd.isna(row.score) else round(float(row.score), 6)  # a float32 score, without its float64 tail
        out.append(ExportedFrame(name, file_of(name, answer), str(row.episode), int(row.frame), timestamp, str(row.source),
                                 answer, score, str(row.model_id)))
    return out


def _jpeg(picture: "bytes | Image.Image", source: str, problems: list[str]) -> bytes | None:
    """A picture as a JPEG; None, and why in ``problems``, for bytes that are no picture."""
    try:
        image = picture if isinstance(picture, Image.Image) else decode_rgb(picture)
    except ImageDecodeError as exc:
        problems.append(f"cannot decode {source}: {exc}")
        return None
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def write_pictures(frames: list[ExportedFrame], output_uri: str, replace: bool) -> tuple[list[ExportedFrame], list[str], list[str]]:
    """Read each frame's source and write its JPEG: (the frames written, in order; the sources that could not be read; why).

    The folder is replaced (``replace``) only just before the first picture is
    written: when no source can be read, nothing was touched.
    """
    by_source = sorted(range(len(frames)), key=lambda i: split_source(frames[i].source))  # a video's frames in one batch
    written: set[int] = set()
    problems: list[str] = []
    for start in range(0, len(by_source), READ_BATCH):
        batch = by_source[start:start + READ_BATCH]
        pictures = fetch_sources([frames[i].source for i in batch], warn=problems.append, video_max_side=VIDEO_MAX_SIDE)
        jpegs = {i: _jpeg(picture, frames[i].source, problems) for i in batch if (picture := pictures.get(frames[i].source)) is not None}
        encoded = {i: data for i, data in jpegs.items() if data is not None}
        ready = [i for i in batch if i in encoded]
        if ready and replace and not written:
            storage.delete(output_uri)
        storage.in_threads(lambda i: storage.write_bytes(storage.join(output_uri, frames[i].file), encoded[i]), ready)
        written.update(ready)
    return [f for i, f in enumerate(frames) if i in written], [f.source for i, f in enumerate(frames) if i not in written], problems


def run_export(config: ExportConfig, stdout: TextIO | None = None) -> ExportResult:
    """The ``review export`` subcommand: pick, read, write the pictures, then the format's files and the manifest last."""
    stdout = stdout or sys.stdout
    decision, model_id = model_decision(config.model_uri)
    replace = check_replaceable(config.output_uri, MANIFEST_FILE, "review export", config.overwrite)
    # A reviewer sees one frame: the answer shown, and a character:NAME pick, are the frame's own (before pooling over its
    # shot), as the uncertainty that ranks it is.
    labels = open_labels(config.labels_uri, per_frame=True)
    pick = Pick.parse(config.pick)
    picked = pick_frames(labels, decision, pick, int(config.limit), int(config.seed), float(config.min_gap_s))
    check_answers(picked, decision, model_id, config.labels_uri, config.model_uri)
    if config.format == "labelstudio":
        frames = _exported_frames(picked, lambda name, answer: f"{labelstudio.IMAGES_DIR}/{name}.jpg")
    else:
        frames = _exported_frames(picked, lambda name, answer: f"{folders.folder_of(answer)}/{name}.jpg")
    written, unreadable, problems = write_pictures(frames, config.output_uri, replace)
    if not written:
        why = problems[0].rstrip(".") if problems else f"{unreadable[0]} is not a picture"
        raise UserError(f"None of the {len(frames)} picked frames could be read from its source ({why}): "
                        f"nothing was written to {config.output_uri}; check that the labels' sources are still there.")
    if unreadable:
        log.warning("review export: %d of %d picked frames could not be read and were left out: %s%s (%s)", len(unreadable), len(frames),
                    ", ".join(unreadable[:5]), " ..." if len(unreadable) > 5 else "", "; ".join(problems[:3]))
    export_id = uuid.uuid4().hex
    _write_format(config, written, decision, export_id)
    manifest = _manifest(config, decision, model_id, pick, export_id, written, unreadable)
    storage.write_json(storage.join(config.output_uri, MANIFEST_FILE), manifest)  # last: its presence marks a finished export
    kept = {f.name for f in written}
    shots = {(f.episode, s) for f, s in zip(frames, picked["shot"]) if f.name in kept and not np.isnan(s)}
    stdout.write(f"exported {len(written)} frames of {len({f.episode for f in written})} episodes ({pick} picks, {len(shots)} shots) "
                 f"as {config.format} to {config.output_uri}" + (f"; {len(unreadable)} could not be read" if unreadable else "") + "\n")
    return ExportResult(config.output_uri, config.format, written, unreadable)


def _write_format(config: ExportConfig, frames: list[ExportedFrame], decision: Decision, export_id: str) -> None:
    if config.format == "labelstudio":
        tasks = [labelstudio.task(f, labelstudio.image_url(f.file, config.image_url_prefix), export_id) for f in frames]
        storage.write_json(storage.join(config.output_uri, labelstudio.TASKS_FILE), tasks)
        config_xml = labelstudio.labeling_config(list(decision.classes))
        storage.write_bytes(storage.join(config.output_uri, labelstudio.CONFIG_FILE), config_xml.encode())
    else:
        storage.write_bytes(storage.join(config.output_uri, folders.FRAMES_FILE), folders.frames_csv(frames))


def _manifest(config: ExportConfig, decision: Decision, model_id: str, pick: Pick, export_id: str,
              frames: list[ExportedFrame], unreadable: list[str]) -> dict[str, Any]:
    return {
        "kind": KIND, "version": VERSION, "export_id": export_id, "format": config.format,
        "model_id": model_id, "model_uri": storage.absolute(config.model_uri),
        "objective": "multilabel" if decision.multilabel else "single", "classes": list(decision.classes), "nobody": NOBODY,
        "pick": str(pick), "limit": int(config.limit), "seed": int(config.seed), "min_gap_s": float(config.min_gap_s),
        "labels_uri": storage.absolute(config.labels_uri), "image_url_prefix": config.image_url_prefix,
        "created": now_iso(), "frames": len(frames), "unreadable": unreadable,
    }
