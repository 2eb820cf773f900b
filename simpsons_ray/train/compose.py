"""Frames with 0, 1, 2 or 3 characters, composed on the fly from single-character pictures.

The Kaggle pictures each show one character, but an episode's frames show several,
or nobody. A multi-label model (one sigmoid per character) learns from frames put
together here:

- **cells**: each picture's character, cropped to the dataset author's bounding box
  (``annotation.csv``) where there is one, else the whole picture;
- **backgrounds**: the largest part of a boxed picture that lies wholly outside its
  box (the strip left, right, above or below it), resized to the frame: a real frame
  of the show with that picture's character cut away, so "nobody" frames are real
  backgrounds. Other characters may still stand in such a strip (the box marks only
  one); that noise is the data's. A reviewed frame of nobody (``ROOT/_nobody/``) is
  a background whole, and never a cell.

A frame draws how many characters it holds (``COUNT_WEIGHTS``), takes that many
cells of different characters, scales each to a random height with its aspect
ratio kept, and pastes them side by side, each in its own slot, on a background.
Its target is multi-hot: 1 for every character pasted in.

Where no picture has a box (plain class folders), backgrounds are flat colours with
noise: training still works, but "nobody" is then learnt from frames unlike the
show's (``train`` says so).

Everything is NumPy and PIL, cheap next to a training step: it runs on the training
workers, in the data iterator's prefetch thread (``training_data.AugmentingCollate``).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError

log = logging.getLogger(__name__)

ANNOTATION_FILE = "annotation.csv"
# P(0, 1, 2, 3 characters in a frame). Mostly one or two, as in the show; a fifth
# of the frames show nobody, so the model learns to say so.
COUNT_WEIGHTS = (0.2, 0.35, 0.3, 0.15)
EVAL_COUNT_WEIGHTS = (0.25, 0.25, 0.25, 0.25)  # evaluation composites: 0-3 characters, uniform
MIN_HEIGHT, MAX_HEIGHT = 0.5, 1.0  # a pasted character's height, as a share of the frame's
# A background strip must keep this share of its picture, and this many pixels a side.
MIN_BACKGROUND_AREA = 0.15
MIN_BACKGROUND_SIDE = 16
# A box smaller than this share of its picture is not trusted: some of the author's
# boxes mark a face, a sign or nothing at all while the character stands elsewhere,
# and the strip beside such a box would be a "nobody" background with the character in it.
MIN_BOX_AREA = 0.06
NO_BOX = (np.nan, np.nan, np.nan, np.nan)
# The label of a picture of a character the model does not name (one of those too rare to
# train, --min-images-per-class): it trains the model to name nobody for them.
STRANGER = -1


# ------------------------------------------------------------------------- boxes
def picture_key(uri: str) -> str:
    """``<character>/<file>``: how a picture is matched to its annotation row, wherever the folder lives."""
    parts = str(uri).replace("\\", "/").rstrip("/").split("/")
    return "/".join(parts[-2:])


def default_boxes_uri(data_uri: str) -> str | None:
    """``annotation.csv`` in the data folder or its parent (the Kaggle layout keeps it beside ``characters/``), if there."""
    root = data_uri.rstrip("/")
    candidates = [storage.join(root, ANNOTATION_FILE)]
    if "/" in root.split("://", 1)[-1]:
        candidates.append(storage.join(root.rsplit("/", 1)[0], ANNOTATION_FILE))
    return next((c for c in candidates if storage.is_file(c)), None)


def read_boxes(uri: str) -> pd.DataFrame:
    """annotation.csv (``path,x1,y1,x2,y2,character``) as ``key, x1, y1, x2, y2`` in pixels of the pictures.

    The original Kaggle file has no header; this project's copy has one. Both read.
    Rows with an empty or inverted box are dropped.
    """
    if not storage.is_file(uri):
        raise UserError(f"--boxes {uri} does not exist: give the annotation.csv of the training pictures, or 'none'.")
    import io

    text = storage.read_bytes(uri).decode("utf-8", errors="replace")
    first = text.split("\n", 1)[0].lower()
    names = ["path", "x1", "y1", "x2", "y2", "character"]
    try:
        table = pd.read_csv(io.StringIO(text), header=0 if first.startswith("path") else None, names=names)
        for c in ("x1", "y1", "x2", "y2"):
            table[c] = pd.to_numeric(table[c], errors="raise").astype(np.float64)
    except (ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"{uri} is not a box file (path,x1,y1,x2,y2,character per line): {str(exc).splitlines()[0]}.") from None
    table = table[(table["x2"] > table["x1"]) & (table["y2"] > table["y1"])]
    table = table.assign(key=table["path"].map(picture_key))
    return table.drop_duplicates("key")[["key", "x1", "y1", "x2", "y2"]].reset_index(drop=True)


def attach_boxes(images: pd.DataFrame, boxes: pd.DataFrame | None) -> pd.DataFrame:
    """``images`` (with ``uri``) plus a ``box`` column: (x1, y1, x2, y2) or NaNs where the picture has none."""
    if boxes is None or boxes.empty:
        return images.assign(box=[NO_BOX] * len(images))
    by_key = {k: (x1, y1, x2, y2) for k, x1, y1, x2, y2 in boxes.itertuples(index=False)}
    return images.assign(box=[by_key.get(picture_key(u), NO_BOX) for u in images["uri"]])


def background_region(width: int, height: int, box) -> tuple[int, int, int, int] | None:
    """The largest strip of a ``width`` x ``height`` picture wholly outside ``box``, as (x1, y1, x2, y2); None if too small.

    The strips are the part left of the box, right of it, above it and below it,
    each the picture's full height or width: none of them overlaps the box.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if not np.isfinite([x1, y1, x2, y2]).all():
        return None
    x1, x2 = (int(np.clip(v, 0, width)) for v in (np.floor(x1), np.ceil(x2)))
    y1, y2 = (int(np.clip(v, 0, height)) for v in (np.floor(y1), np.ceil(y2)))
    strips = [(0, 0, x1, height), (x2, 0, width, height), (0, 0, width, y1), (0, y2, width, height)]
    strips = [s for s in strips if s[2] - s[0] >= MIN_BACKGROUND_SIDE and s[3] - s[1] >= MIN_BACKGROUND_SIDE]
    if not strips:
        return None
    best = max(strips, key=lambda s: (s[2] - s[0]) * (s[3] - s[1]))
    if (best[2] - best[0]) * (best[3] - best[1]) < MIN_BACKGROUND_AREA * width * height:
        return None
    return best


def cut(img: Image.Image, box, size: int) -> tuple[np.ndarray, float, np.ndarray | None]:
    """One decoded picture -> (its cell at ``size`` x ``size``, the cell's width/height, its background or None).

    Without a box the cell is the whole picture. A box is clipped to the picture; one
    that falls outside it, or covers less than ``MIN_BOX_AREA`` of it, leaves the
    whole picture as the cell and gives no background.
    """
    width, height = img.size
    region = None
    crop = (0, 0, width, height)
    x1, y1, x2, y2 = (float(v) for v in box)
    if np.isfinite([x1, y1, x2, y2]).all():
        clipped = (max(0, int(x1)), max(0, int(y1)), min(width, int(np.ceil(x2))), min(height, int(np.ceil(y2))))
        area = (clipped[2] - clipped[0]) * (clipped[3] - clipped[1])
        if clipped[2] - clipped[0] >= 2 and clipped[3] - clipped[1] >= 2 and area >= MIN_BOX_AREA * width * height:
            crop = clipped
            region = background_region(width, height, box)
    cell_img = img.crop(crop) if crop != (0, 0, width, height) else img
    aspect = (crop[2] - crop[0]) / (crop[3] - crop[1])
    cell = np.asarray(cell_img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    background = np.asarray(img.crop(region).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8) if region else None
    return cell, float(aspect), background


# ------------------------------------------------------------------------ frames
@dataclass
class Composite:
    """Composed frames, their multi-hot targets, and where each character went (for tests and evaluation)."""

    images: np.ndarray  # uint8 [N, S, S, 3]
    targets: np.ndarray  # float32 [N, classes]
    placed: list[list[tuple[int, tuple[int, int, int, int]]]]  # per frame: (class, (x1, y1, x2, y2))
    backgrounds: np.ndarray  # int64 [N]: the background used (index into the given ones), -1 for a flat one


def _flat_background(size: int, rng: np.random.Generator) -> np.ndarray:
    colour = rng.integers(0, 256, 3)
    noise = rng.normal(0, 12, (size, size, 3))
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


def _paste(frame: np.ndarray, cell: np.ndarray, aspect: float, slot: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Scale ``cell`` to a random height (aspect kept, within its slot) and paste it; returns where."""
    size = frame.shape[0]
    left, right = slot
    h = rng.uniform(MIN_HEIGHT, MAX_HEIGHT) * size
    w = h * aspect
    if w > right - left:
        w, h = right - left, (right - left) / aspect
    h, w = max(2, min(size, int(round(h)))), max(2, min(right - left, int(round(w))))
    x = left + int(rng.integers(0, right - left - w + 1))
    y = int(rng.integers(0, size - h + 1))
    frame[y : y + h, x : x + w] = np.asarray(Image.fromarray(cell).resize((w, h), Image.Resampling.BILINEAR))
    return x, y, x + w, y + h


def compose(
    cells: np.ndarray,
    aspects: np.ndarray,
    labels: np.ndarray,
    backgrounds: np.ndarray,
    num_classes: int,
    rng: np.random.Generator,
    count: int | None = None,
    weights: tuple[float, ...] = COUNT_WEIGHTS,
) -> Composite:
    """``count`` frames (default: as many as cells) of 0-3 characters of different classes on the given backgrounds.

    Cells are dealt in a random order, so each is used before any is used twice;
    a frame never holds two cells of one class. A frame with nobody is a background
    alone. Without backgrounds, flat colours stand in. Cells labelled :data:`STRANGER`
    are characters the model does not name: they stand in frames, never in targets.
    With no cells (an empty ``[0, S, S, 3]`` array) every frame shows nobody.
    """
    cells, labels = np.asarray(cells), np.asarray(labels, dtype=np.int64)
    n, size = len(cells), int(cells.shape[1]) if cells.ndim == 4 else 0
    count = n if count is None else count
    if size == 0 and count:
        raise ValueError("no cells to compose frames from")
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    targets = np.zeros((count, num_classes), dtype=np.float32)
    placed: list[list[tuple[int, tuple[int, int, int, int]]]] = []
    used = np.full(count, -1, dtype=np.int64)
    probabilities = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    deck, position = rng.permutation(n), 0
    distinct = len(np.unique(labels))  # a frame holds at most this many characters
    for i in range(count):
        if len(backgrounds):
            used[i] = int(rng.integers(0, len(backgrounds)))
            images[i] = backgrounds[used[i]]
        else:
            images[i] = _flat_background(size, rng)
        wanted = min(int(rng.choice(len(probabilities), p=probabilities)), distinct)
        chosen: list[int] = []
        tries = 0
        while len(chosen) < wanted and tries < 2 * n + 4:
            if position == n:
                deck, position = rng.permutation(n), 0
            candidate = int(deck[position])
            position += 1
            tries += 1
            if labels[candidate] not in {labels[c] for c in chosen}:
                chosen.append(candidate)
        slots = np.linspace(0, size, len(chosen) + 1).astype(int)
        where = []
        for j, c in enumerate(chosen):
            box = _paste(images[i], cells[c], float(aspects[c]), (int(slots[j]), int(slots[j + 1])), rng)
            if labels[c] >= 0:  # a cell labelled STRANGER is someone the model does not name: pasted, never a target
                targets[i, labels[c]] = 1.0
            where.append((int(labels[c]), box))
        placed.append(where)
    return Composite(images, targets, placed, used)


def batch_seed(seed: int, labels: np.ndarray) -> int:
    """A seed fixed by a batch's contents: the same validation batch composes the same frames on every epoch and worker."""
    return zlib.crc32(np.ascontiguousarray(labels, dtype=np.int64).tobytes(), seed & 0xFFFFFFFF)


def compose_batch(batch: dict[str, np.ndarray], num_classes: int, rng: np.random.Generator,
                  weights: tuple[float, ...] = COUNT_WEIGHTS) -> Composite:
    """Frames from one decoded batch (``image`` cells, ``aspect``, ``label``, ``background``, ``has_background``)."""
    backgrounds = np.asarray(batch["background"])[np.asarray(batch["has_background"], dtype=bool)]
    return compose(batch["image"], batch["aspect"], batch["label"], backgrounds, num_classes, rng, weights=weights)


