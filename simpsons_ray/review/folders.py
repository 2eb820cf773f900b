"""The folders side of a review: one folder per answer, a person moves pictures between them, and the moves read back.

An export folder in this format::

    <character>/<episode>-<frame>.jpg   each picture under the model's answer (a multi-label model's top character)
    nobody/<episode>-<frame>.jpg        the frames where the model sees no character
    frames.csv                          file, source, episode, frame, timestamp_s, answer, score, model_id of every picture
    export.json                         the manifest (manifest.py)

A person corrects the model by moving a picture to the right folder (``nobody``
included), copies it into a second folder for a frame with two characters,
and deletes it to leave it out. CVAT and FiftyOne read such folders as an image
classification dataset, so the sorting can be done there too.
"""

from __future__ import annotations

import io
import logging
import posixpath

import pandas as pd

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError
from simpsons_ray.media.images import is_image_name
from simpsons_ray.query.reading import suggestions
from simpsons_ray.review.manifest import MANIFEST_FILE, NOBODY, ExportedFrame, Manifest
from simpsons_ray.review.reviews import REMOVED, Answer, Review, Skip, decide

log = logging.getLogger(__name__)

FRAMES_FILE = "frames.csv"
FRAMES_COLUMNS = ["file", "source", "episode", "frame", "timestamp_s", "answer", "score", "model_id"]


def folder_of(answer: tuple[str, ...]) -> str:
    """The folder a picture is filed under: the model's first (best) character, or nobody."""
    return answer[0] if answer else NOBODY


def frames_csv(frames: list[ExportedFrame]) -> bytes:
    """frames.csv: one row per picture; ``answer`` is the model's characters joined by ``;``, or nobody."""
    rows = [(f.file, f.source, f.episode, f.frame, f.timestamp_s, ";".join(f.answer) or NOBODY, f.score, f.model_id) for f in frames]
    return pd.DataFrame(rows, columns=FRAMES_COLUMNS).to_csv(index=False).encode()


def read_frames(export_uri: str) -> list[ExportedFrame]:
    """The frames an export wrote, from its frames.csv."""
    uri = storage.join(export_uri, FRAMES_FILE)
    if not storage.is_file(uri):
        raise UserError(f"{export_uri} has no {FRAMES_FILE}: it is not a finished folders export; export again.")
    try:
        table = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype={"episode": str, "answer": str, "model_id": str, "source": str})
        missing = [c for c in FRAMES_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"it has no column {', '.join(missing)}")
        table["frame"] = pd.to_numeric(table["frame"], errors="raise")
    except (ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"{uri} is not the {FRAMES_FILE} the export wrote ({str(exc).splitlines()[0]}): put it back as it was.") from None
    frames = []
    for row in table.itertuples(index=False):
        answer = () if row.answer == NOBODY or pd.isna(row.answer) else tuple(str(row.answer).split(";"))
        name = posixpath.basename(row.file).rsplit(".", 1)[0]
        frames.append(ExportedFrame(name, row.file, row.episode, int(row.frame), None if pd.isna(row.timestamp_s) else float(row.timestamp_s),
                                    row.source, answer, None if pd.isna(row.score) else float(row.score), row.model_id))
    return frames


def _pictures(manifest: Manifest) -> dict[str, list[str]]:
    """Each picture file name and the folders it now lies in; a folder that is no choice of the export is refused."""
    found: dict[str, list[str]] = {}
    elsewhere = []
    for entry in storage.list_files(manifest.uri):
        if entry.relpath in (FRAMES_FILE, MANIFEST_FILE):
            continue
        parts = entry.relpath.split("/")
        if len(parts) != 2 or not is_image_name(parts[1]):
            elsewhere.append(entry.relpath)
            continue
        if parts[0] not in manifest.choices:
            raise UserError(f"Folder {parts[0]!r} in {manifest.uri} is not a character of the export{suggestions(parts[0], manifest.choices)}: "
                            f"move its pictures into the folder of a character the model knows, or into {NOBODY}.")
        found.setdefault(parts[1], []).append(parts[0])
    if elsewhere:
        log.warning("review import: ignored %d files outside the character folders of %s: %s", len(elsewhere), manifest.uri,
                    ", ".join(elsewhere[:5]))
    return found


def read_reviews(manifest: Manifest, frames: list[ExportedFrame]) -> list[Review | Skip]:
    """Each exported frame's answer from the folders its picture lies in now; a deleted picture is left out."""
    found = _pictures(manifest)
    known = {posixpath.basename(f.file) for f in frames}
    strangers = sorted(set(found) - known)
    if strangers:
        log.warning("review import: ignored %d pictures that %s did not export: %s", len(strangers), manifest.uri, ", ".join(strangers[:5]))
    out: list[Review | Skip] = []
    for frame in frames:
        name = posixpath.basename(frame.file)
        folders = found.get(name)
        if not folders:
            out.append(Skip(frame, REMOVED))
            continue
        original = posixpath.dirname(frame.file)
        folders = sorted(folders, key=lambda folder: (folder != original, folder))  # the model's pick first, if kept
        # A picture is filed under one character: left there, it keeps that one, whatever else the model said.
        out.append(decide(frame, [Answer(tuple(folders))], manifest.choices, file=f"{folders[0]}/{name}", shown=frame.answer[:1]))
    return out
