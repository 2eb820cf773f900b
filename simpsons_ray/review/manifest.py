"""What an export is: its manifest (``export.json``), the frames it holds, their file names, and the folders it may replace.

Both formats write ``export.json`` beside the pictures::

    {"kind": "simpsons-ray review export", "version": 1, "export_id": "<32 hex>",
     "format": "labelstudio" | "folders", "model_id": ..., "model_uri": ..., "objective": "single" | "multilabel",
     "classes": [...], "nobody": "nobody", "pick": "uncertain", "limit": 500, "seed": 0, "min_gap_s": 1.0,
     "labels_uri": ..., "created": "<ISO 8601>", "frames": 498, "unreadable": [<sources>]}

``export_id`` is new for every export; every Label Studio task carries it, so an
import can tell this export's reviews from another project's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError
from simpsons_ray.train import datasets

MANIFEST_FILE = "export.json"
KIND = "simpsons-ray review export"
VERSION = 1
FORMATS = ("labelstudio", "folders")
# The choice, and the folder, of a frame with no character on screen.
NOBODY = "nobody"
# Where an import files a frame the reviewer marked as showing nobody: the folder train reads as frames of nobody.
NOBODY_FOLDER = datasets.NOBODY


@dataclass(frozen=True)
class ExportedFrame:
    """One picture of an export: where it lies in the export folder, where it came from, and what the model said."""

    name: str  # file name without extension, unique in the export: "<episode>-<frame>"
    file: str  # path below the export folder, forward slashes: "images/<name>.jpg" or "<folder>/<name>.jpg"
    episode: str
    frame: int
    timestamp_s: float | None
    source: str
    answer: tuple[str, ...]  # the model's characters, best first; () = nobody
    score: float | None
    model_id: str


@dataclass(frozen=True)
class Manifest:
    """``export.json`` as read back."""

    uri: str  # the export folder
    export_id: str
    format: str
    classes: tuple[str, ...]
    model_id: str
    fields: dict[str, Any]

    @property
    def choices(self) -> tuple[str, ...]:
        """What a reviewer may answer: each class, and nobody."""
        return (*self.classes, NOBODY)


def frame_names(episodes: list[str], frames: list[int]) -> list[str]:
    """``<episode>-<frame>`` for each frame, kept to letters, digits, ``.``, ``_`` and ``-``, and unique.

    Episode ids may hold spaces, brackets and non-ASCII letters (labels.ids): fine
    in a folder name, awkward in a URL and in a CSV a person edits; two ids that
    differ only there get ``-2``, ``-3``... rather than one picture overwriting another.
    """
    taken: set[str] = set()
    names = []
    for episode, frame in zip(episodes, frames):
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{episode}-{frame}").strip("._-") or "frame"
        name, n = stem, 1
        while name in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name)
        names.append(name)
    return names


def check_classes(classes: list[str], model_uri: str) -> None:
    """Refuse a model whose class names cannot be a choice and a folder name beside ``nobody``."""
    for name in classes:
        if name == NOBODY:
            raise UserError(f"{model_uri} has a character named {NOBODY!r}, the choice a review export keeps for frames with "
                            "no character on screen: rename that class and train again.")
        if not name or name in (".", "..") or name.startswith(("_", ".")) or re.search(r"[/\\\x00-\x1f]", name):
            raise UserError(f"{model_uri} has a character named {name!r}, which cannot name a folder: "
                            "rename that class and train again.")


def read_manifest(export_uri: str) -> Manifest:
    """The manifest of an export folder, with one sentence when ``export_uri`` is not one."""
    hint = "pass the --output of `simpsons-ray review export`"
    if not storage.is_dir(export_uri):
        raise UserError(f"No review export at {export_uri}: the folder does not exist; {hint}.")
    uri = storage.join(export_uri, MANIFEST_FILE)
    if not storage.is_file(uri):
        raise UserError(f"{export_uri} is not a review export (it has no {MANIFEST_FILE}): {hint}.")
    try:
        fields = storage.read_json(uri)
        if not isinstance(fields, dict) or fields.get("kind") != KIND:
            raise ValueError(f"its {MANIFEST_FILE} is not a simpsons-ray review export's")
        classes = fields["classes"]
        if fields.get("format") not in FORMATS or not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"its {MANIFEST_FILE} names no format or classes")
        return Manifest(export_uri, str(fields["export_id"]), fields["format"], tuple(classes), str(fields.get("model_id", "")), fields)
    except (ValueError, KeyError) as exc:
        raise UserError(f"{export_uri} is not a review export: {str(exc).splitlines()[0] if str(exc) else exc!r}; {hint}.") from None


def check_replaceable(uri: str, marker: str, what: str, overwrite: bool) -> bool:
    """Whether ``uri`` holds files to delete before writing; refuses a folder that holds files unless it is an earlier ``what``.

    ``marker`` is the file the earlier run wrote last: only a folder holding it is
    replaced with ``--overwrite``, so a mistyped path never deletes someone's files.
    """
    if storage.is_file(uri):
        raise UserError(f"{uri} is a file: give a folder for the {what}.")
    if not storage.list_files(uri):
        return False
    if not overwrite:
        raise UserError(f"{uri} already holds files: pass --overwrite to replace an earlier {what}, or choose an empty folder.")
    if not storage.is_file(storage.join(uri, marker)):
        raise UserError(f"{uri} holds files that are not an earlier {what} (no {marker}): --overwrite replaces only that; "
                        "choose an empty folder.")
    return True
