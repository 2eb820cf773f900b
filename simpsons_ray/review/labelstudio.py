"""The Label Studio side of a review: the labeling config and tasks an export writes, and the JSON export read back.

An export folder for Label Studio::

    images/<episode>-<frame>.jpg   the picked frames
    tasks.json                     the tasks to import: one per picture, the model's answer as a prediction
    labeling_config.xml            the project's config: a multiple choice of the model's characters and nobody,
                                   and rectangles of the same characters
    export.json                    the manifest (manifest.py)

A task::

    {"data": {"image": "/data/local-files/?d=images/s01e01-120.jpg", "source": "...", "episode": "s01e01",
              "frame": 120, "timestamp_s": 5.0, "export_id": "..."},
     "predictions": [{"model_version": "<model_id>", "score": 0.53,
                      "result": [{"from_name": "characters", "to_name": "image", "type": "choices",
                                  "value": {"choices": ["homer_simpson"]}}]}]}

Label Studio's Export -> JSON gives the tasks back with their ``data`` as imported
and an ``annotations`` list; each annotation's ``result`` holds the choices and the
rectangles (x, y, width, height in percent of the picture), ``was_cancelled`` a skip.
"""

from __future__ import annotations

import urllib.parse
from typing import Any
from xml.sax.saxutils import quoteattr

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError, first_line
from simpsons_ray.review.manifest import NOBODY, ExportedFrame, Manifest
from simpsons_ray.review.reviews import NOT_FOUND, Answer, Box, Review, Skip, decide

TASKS_FILE = "tasks.json"
CONFIG_FILE = "labeling_config.xml"
IMAGES_DIR = "images"
CHOICES, BOXES, IMAGE = "characters", "boxes", "image"
# Label Studio serves a file below LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT at this URL (its local-files storage).
LOCAL_FILES_URL = "/data/local-files/?d="


def labeling_config(classes: list[str]) -> str:
    """The project's labeling config: who is in the picture (several, or nobody), and a box around each of them."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in [*classes, NOBODY])
    labels = "\n".join(f"    <Label value={quoteattr(c)}/>" for c in classes)
    return (
        "<View>\n"
        f'  <Header value="Who is in this frame? Tick every character, or {NOBODY}; draw a box around each if you can."/>\n'
        f'  <Image name="{IMAGE}" value="$image" zoom="true"/>\n'
        f'  <Choices name="{CHOICES}" toName="{IMAGE}" choice="multiple" showInLine="true">\n{choices}\n  </Choices>\n'
        f'  <RectangleLabels name="{BOXES}" toName="{IMAGE}">\n{labels}\n  </RectangleLabels>\n'
        "</View>\n"
    )


def image_url(file: str, prefix: str | None) -> str:
    """The URL a task shows its picture by: Label Studio's local files, or ``prefix`` + the file's path in the export."""
    if prefix is None:
        return LOCAL_FILES_URL + file
    return prefix + file if prefix.endswith(("/", "=")) else f"{prefix}/{file}"


def task(frame: ExportedFrame, url: str, export_id: str) -> dict[str, Any]:
    """One Label Studio task: the frame and where it came from, and the model's answer as a prediction to correct."""
    data = {"image": url, "source": frame.source, "episode": frame.episode, "frame": frame.frame,
            "timestamp_s": frame.timestamp_s, "export_id": export_id}
    result = [{"from_name": CHOICES, "to_name": IMAGE, "type": "choices", "value": {"choices": list(frame.answer) or [NOBODY]}}]
    return {"data": data, "predictions": [{"model_version": frame.model_id, "score": frame.score, "result": result}]}


def _picture_file(url: object) -> str | None:
    """``images/<name>.jpg`` from a task's image URL, however it was served."""
    if not isinstance(url, str):
        return None
    at = url.rfind(IMAGES_DIR + "/")
    return urllib.parse.unquote(url[at:].split("&", 1)[0]) if at >= 0 else None


def read_frames(export_uri: str) -> list[ExportedFrame]:
    """The frames an export wrote, from its tasks.json."""
    uri = storage.join(export_uri, TASKS_FILE)
    if not storage.is_file(uri):
        raise UserError(f"{export_uri} has no {TASKS_FILE}: it is not a finished Label Studio export; export again.")
    frames = []
    for t in storage.read_json(uri):
        data, prediction = t["data"], t["predictions"][0]
        file = _picture_file(data["image"]) or ""
        answer = tuple(c for c in prediction["result"][0]["value"]["choices"] if c != NOBODY)
        frames.append(ExportedFrame(file.rsplit("/", 1)[-1].rsplit(".", 1)[0], file, data["episode"], data["frame"],
                                    data["timestamp_s"], data["source"], answer, prediction["score"], prediction["model_version"]))
    return frames


def _load(annotations_uri: str) -> list[dict[str, Any]]:
    hint = "give the file Label Studio's Export -> JSON wrote"
    if not storage.is_file(annotations_uri):
        raise UserError(f"No annotations file at {annotations_uri}: {hint}.")
    try:
        tasks = storage.read_json(annotations_uri)
    except ValueError as exc:
        raise UserError(f"{annotations_uri} is not JSON ({first_line(exc)}): {hint}.") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("data"), dict) for t in tasks):
        raise UserError(f"{annotations_uri} is not a Label Studio JSON export (a list of tasks, each with its data): {hint}.")
    if not tasks:
        raise UserError(f"{annotations_uri} holds no tasks: import tasks.json into Label Studio, review, then export again.")
    if not all(isinstance(t.get("annotations"), list) for t in tasks):
        raise UserError(f"{annotations_uri} has tasks without an annotations list: {hint} (not JSON-MIN, CSV or our tasks.json).")
    return tasks


def _answer(annotation: dict[str, Any], annotations_uri: str) -> Answer:
    """One annotation as an Answer; a result of another project's config is refused."""
    choices: list[str] = []
    boxes: list[Box] = []
    for item in annotation.get("result") or []:
        kind, value = (item.get("from_name"), item.get("to_name"), item.get("type")), item.get("value") or {}
        if kind == (CHOICES, IMAGE, "choices"):
            choices += [str(c) for c in value.get("choices", [])]
        elif kind == (BOXES, IMAGE, "rectanglelabels"):
            try:
                boxes += [Box(str(c), float(value["x"]), float(value["y"]), float(value["width"]), float(value["height"]),
                              float(value.get("rotation") or 0.0)) for c in value.get("rectanglelabels", [])]
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{annotations_uri} has a rectangle without a number for each of x, y, width and height: "
                                "export the project again with Label Studio's Export -> JSON.") from None
        else:
            raise UserError(f"{annotations_uri} holds {kind[2]} results from {kind[0]!r} to {kind[1]!r}, which this export's "
                            f"labeling config does not have: it is another project's export; import that project's own.")
    who = annotation.get("completed_by")
    reviewer = str(who.get("email") or who.get("id", "")) if isinstance(who, dict) else str(who if who is not None else "")
    return Answer(tuple(choices), tuple(boxes), reviewer, bool(annotation.get("was_cancelled")))


def read_reviews(manifest: Manifest, frames: list[ExportedFrame], annotations_uri: str) -> list[Review | Skip]:
    """Each exported frame's answer or why it is left out, from Label Studio's JSON export of this export's tasks."""
    tasks = _load(annotations_uri)
    by_file = {f.file: f for f in frames}
    answers: dict[str, list[Answer]] = {}
    for t in tasks:
        data = t["data"]
        if data.get("export_id") != manifest.export_id:
            raise UserError(f"{annotations_uri} holds tasks of another export (export_id {data.get('export_id')!r}, not "
                            f"{manifest.export_id!r} of {manifest.uri}): import it with the export it came from.")
        file = _picture_file(data.get("image"))
        if file not in by_file:
            raise UserError(f"{annotations_uri} has a task for {data.get('image')!r}, a picture {manifest.uri} did not export: "
                            "import it with the export it came from.")
        answers.setdefault(file, []).extend(_answer(a, annotations_uri) for a in t["annotations"])
    return [decide(f, answers[f.file], manifest.choices) if f.file in answers else Skip(f, NOT_FOUND) for f in frames]
