"""``simpsons-ray review import``: the reviewed frames of an export as a training set that ``simpsons-ray train`` reads.

    simpsons-ray review import --from review/ --annotations project-1-at-2026-12-08.json --output data/reviewed
    simpsons-ray review import --from review-folders/ --output data/reviewed     # a folders export, sorted by hand

What it writes, in the layout of the Kaggle training folders (train.datasets)::

    DATA_DIR/<character>/<episode>-<frame>.jpg   a frame the reviewers say shows that character
    DATA_DIR/_nobody/<episode>-<frame>.jpg       a frame they say shows nobody
    DATA_DIR/annotation.csv                      path,x1,y1,x2,y2,character: the boxes drawn, in pixels of the picture
    DATA_DIR/review.csv                          file, characters, source, episode, frame, reviewer, export_id,
                                                 model_answer, changed: one row per picture written
    DATA_DIR/skipped.csv                         file, source, episode, frame, reason: every frame left out

A picture in ``<character>/`` is a picture of that character: training crops it
to its box where there is one, else takes it whole. A frame with several
characters is therefore written once per character that has a box (each copy with
its own box), or, with no box at all, once under its first character;
``review.csv`` lists everyone in it either way. A character boxed twice in one
frame keeps its largest box (training reads one box per picture).

Nothing is written until every review is read and every picture found: bad input
ends in one sentence with DATA_DIR untouched.
"""

from __future__ import annotations

import io
import sys
from collections import Counter
from dataclasses import dataclass
from typing import TextIO

import pandas as pd
from PIL import Image

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError
from simpsons_ray.review import folders, labelstudio
from simpsons_ray.review.manifest import NOBODY, NOBODY_FOLDER, Manifest, check_replaceable, read_manifest
from simpsons_ray.review.reviews import Review, Skip

ANNOTATION_FILE = "annotation.csv"  # the name training looks for beside the class folders (train.compose)
REVIEW_FILE = "review.csv"  # written last: its presence marks a finished import
SKIPPED_FILE = "skipped.csv"
REVIEW_COLUMNS = ["file", "characters", "source", "episode", "frame", "reviewer", "export_id", "model_answer", "changed"]
SKIPPED_COLUMNS = ["file", "source", "episode", "frame", "reason"]
ANNOTATION_COLUMNS = ["path", "x1", "y1", "x2", "y2", "character"]


@dataclass(frozen=True)
class ImportConfig:
    """One ``review import`` run: the export, Label Studio's JSON of it (labelstudio format), and the training folder to write."""

    export_uri: str
    output_uri: str
    annotations_uri: str | None = None
    overwrite: bool = False  # replace an earlier import in output_uri


@dataclass(frozen=True)
class ImportResult:
    output_uri: str
    reviews: list[Review]
    skipped: list[Skip]
    pictures: dict[str, int]  # pictures written per folder
    boxes: int


def read_reviews(config: ImportConfig) -> tuple[Manifest, list[Review | Skip]]:
    """The export's manifest, and each of its frames' answer or why it is left out."""
    manifest = read_manifest(config.export_uri)
    if manifest.format == "labelstudio":
        if config.annotations_uri is None:
            raise UserError(f"{config.export_uri} is a Label Studio export: add --annotations FILE, the JSON of Label Studio's Export -> JSON.")
        frames = labelstudio.read_frames(config.export_uri)
        decided = labelstudio.read_reviews(manifest, frames, config.annotations_uri) if frames else []
    else:
        if config.annotations_uri is not None:
            raise UserError(f"{config.export_uri} is a folders export: its folders are the reviews; leave out --annotations.")
        frames = folders.read_frames(config.export_uri)
        decided = folders.read_reviews(manifest, frames)
    if not frames:
        raise UserError(f"The review export at {config.export_uri} holds no frames: export again with frames to review.")
    return manifest, decided


def _read_pictures(export_uri: str, reviews: list[Review]) -> dict[str, tuple[bytes, tuple[int, int]]]:
    """Each reviewed picture's bytes and size; one sentence when any is gone or is no picture."""
    def read(review: Review) -> tuple[bytes, tuple[int, int]] | None:
        uri = storage.join(export_uri, review.file)
        try:
            data = storage.read_bytes(uri)
            return data, Image.open(io.BytesIO(data)).size
        except (OSError, ValueError, Image.DecompressionBombError):
            return None

    found = dict(zip([r.file for r in reviews], storage.in_threads(read, reviews)))
    missing = [file for file, picture in found.items() if picture is None]
    if missing:
        raise UserError(f"{len(missing)} reviewed pictures no longer exist in {export_uri} or are not pictures ({', '.join(missing[:3])}"
                        f"{' ...' if len(missing) > 3 else ''}): put the export back as it was written, then import again.")
    return {file: picture for file, picture in found.items() if picture is not None}


def _copies(review: Review, size: tuple[int, int]) -> list[tuple[str, tuple[int, int, int, int] | None, str]]:
    """Where a reviewed frame goes: (folder, its box there or None, the character the box is of)."""
    if not review.characters:
        return [(NOBODY_FOLDER, None, "")]
    boxes: dict[str, tuple[int, int, int, int]] = {}
    for box in review.boxes:
        pixels = box.pixels(*size)
        area = (pixels[2] - pixels[0]) * (pixels[3] - pixels[1]) if pixels else 0
        kept = boxes.get(box.character)
        if pixels and (kept is None or area > (kept[2] - kept[0]) * (kept[3] - kept[1])):
            boxes[box.character] = pixels
    boxed = [c for c in review.characters if c in boxes]
    targets = boxed if len(review.characters) > 1 and boxed else [review.characters[0]]
    return [(c, boxes.get(c), c) for c in targets]


def _tables(manifest: Manifest, reviews: list[Review], pictures: dict[str, tuple[bytes, tuple[int, int]]]):
    """The files to write (path -> bytes), annotation.csv's rows, review.csv's rows."""
    files: dict[str, bytes] = {}
    boxes, rows = [], []
    for review in reviews:
        data, size = pictures[review.file]
        frame = review.frame
        for folder, box, character in _copies(review, size):
            path = f"{folder}/{frame.name}.jpg"
            files[path] = data
            if box is not None:
                boxes.append((path, *box, character))
            rows.append((path, ";".join(review.characters) or NOBODY, frame.source, frame.episode, frame.frame, review.reviewer,
                         manifest.export_id, ";".join(frame.answer) or NOBODY, review.changed))
    return files, pd.DataFrame(boxes, columns=ANNOTATION_COLUMNS), pd.DataFrame(rows, columns=REVIEW_COLUMNS)


def _csv(table: pd.DataFrame) -> bytes:
    return table.to_csv(index=False).encode()


def run_import(config: ImportConfig, stdout: TextIO | None = None) -> ImportResult:
    """The ``review import`` subcommand: read and check everything, then write the training set, review.csv last."""
    stdout = stdout or sys.stdout
    if storage.absolute(config.output_uri).rstrip("/") == storage.absolute(config.export_uri).rstrip("/"):
        raise UserError(f"--output {config.output_uri} is the export itself: write the training set to a folder of its own.")
    replace = check_replaceable(config.output_uri, REVIEW_FILE, "review import", config.overwrite)
    manifest, decided = read_reviews(config)
    reviews = [d for d in decided if isinstance(d, Review)]
    skipped = [d for d in decided if isinstance(d, Skip)]
    why = Counter(s.reason for s in skipped)
    reasons = ", ".join(f"{n} {reason}" for reason, n in why.most_common())
    if not reviews:
        raise UserError(f"None of the {len(decided)} frames of {config.export_uri} has a clear review ({reasons}): "
                        f"nothing was written; review them, then import again.")
    files, boxes, rows = _tables(manifest, reviews, _read_pictures(config.export_uri, reviews))
    left_out = pd.DataFrame([(s.frame.file, s.frame.source, s.frame.episode, s.frame.frame, s.reason) for s in skipped], columns=SKIPPED_COLUMNS)
    if replace:
        storage.delete(config.output_uri)
    storage.in_threads(lambda path: storage.write_bytes(storage.join(config.output_uri, path), files[path]), list(files))
    storage.write_bytes(storage.join(config.output_uri, ANNOTATION_FILE), _csv(boxes))
    storage.write_bytes(storage.join(config.output_uri, SKIPPED_FILE), _csv(left_out))
    storage.write_bytes(storage.join(config.output_uri, REVIEW_FILE), _csv(rows))
    per_folder = Counter(path.split("/", 1)[0] for path in files)
    changed = sum(r.changed for r in reviews)
    stdout.write(
        f"imported {len(reviews)} reviewed frames of {config.export_uri} into {config.output_uri}: "
        + ", ".join(f"{n} {folder}" for folder, n in sorted(per_folder.items()))
        + f" ({len(files)} pictures, {len(boxes)} boxes); the reviewers changed the model's answer on {changed}"
        + (f"; left out {len(skipped)} (see {SKIPPED_FILE}): {reasons}" if skipped else "") + "\n")
    return ImportResult(config.output_uri, reviews, skipped, dict(per_folder), len(boxes))
