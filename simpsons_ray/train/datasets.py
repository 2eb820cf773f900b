"""Kaggle "Simpsons Characters Data" layouts -> (uri, label) tables; class filter; split.

Two layouts, both local or ``s3://``:

- training: ``ROOT/<character>/<name>.jpg`` (label = folder name). The Kaggle zip
  nests a full duplicate copy (``simpsons_dataset/simpsons_dataset/<character>/``);
  files deeper than ``<character>/<file>`` are ignored, so the copy neither becomes
  a class nor doubles the data. A root that holds nothing but one such folder is
  descended into.
- test: one flat folder of ``<character>_<N>.jpg`` (label = name minus ``_<N>``).

A folder whose name starts with ``_`` is never a character. ``ROOT/_nobody/`` holds
reviewed frames that show no character (:data:`NOBODY`): training lists them with
:func:`list_root_images`, under that label; :func:`list_labelled_images` leaves them out.
Several roots are pooled by :func:`pool_roots`.
"""

from __future__ import annotations

import logging
import re
import zlib
from dataclasses import dataclass
from typing import Collection, Sequence

import numpy as np
import pandas as pd

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError
from simpsons_ray.media.images import is_image_name

log = logging.getLogger(__name__)

_FLAT_NAME = re.compile(r"^(?P<label>.+?)_\d+$")
NOBODY = "_nobody"  # ROOT/_nobody/: frames that show no character; the label they are listed under, never a class


def _layout_error(uri: str) -> UserError:
    return UserError(
        f"No class folders with images under {uri}: expected ROOT/<character>/*.jpg "
        "(Kaggle training layout) or a flat folder of <character>_<N>.jpg (Kaggle test layout)."
    )


def list_labelled_images(root_uri: str) -> pd.DataFrame:
    """All pictures of characters under ``root_uri`` as a table of ``uri``, ``label``, sorted by uri."""
    images = list_root_images(root_uri)
    pictures = images[images["label"] != NOBODY].reset_index(drop=True)
    if pictures.empty:
        raise _layout_error(root_uri)
    return pictures


def list_root_images(root_uri: str) -> pd.DataFrame:
    """All images under ``root_uri`` as a table of ``uri``, ``label``, sorted by uri: characters' pictures and ``_nobody`` frames."""
    if not storage.exists(root_uri):
        raise UserError(f"Data path {root_uri} does not exist: give a local folder or an s3:// prefix.")
    entries = [e for e in storage.list_files(root_uri) if is_image_name(e.relpath)]
    in_folders = [e for e in entries if e.relpath.count("/") == 1]
    flat = [e for e in entries if "/" not in e.relpath]

    if in_folders:
        folders = [(e.uri, e.relpath.split("/", 1)[0]) for e in in_folders]
        # A folder named _something is the data's own (reviewed frames of nobody, a scratch copy), never a character.
        rows = [(uri, label) for uri, label in folders if not label.startswith("_") or label == NOBODY]
        deeper = len(entries) - len(in_folders) - len(flat)
        if deeper:
            log.info("ignored %d images nested deeper than <character>/<file> (e.g. the Kaggle duplicate copy)", deeper)
    elif flat:
        rows = []
        for e in flat:
            stem = e.relpath.rsplit(".", 1)[0]
            match = _FLAT_NAME.match(stem)
            if match and not match.group("label").startswith("_"):
                rows.append((e.uri, match.group("label")))
        if not rows:
            raise _layout_error(root_uri)
    else:
        subdirs = [name for name, is_dir in storage.list_dir(root_uri) if is_dir]
        if len(subdirs) == 1:  # the outer folder of the Kaggle zip
            return list_root_images(storage.join(root_uri, subdirs[0]))
        raise _layout_error(root_uri)
    if not rows:
        raise _layout_error(root_uri)
    return pd.DataFrame(rows, columns=["uri", "label"]).sort_values("uri", ignore_index=True)


def pool_roots(root_uris: Sequence[str]) -> pd.DataFrame:
    """Every root's images (:func:`list_root_images`) in one table, with ``root``: the index of the root each came from."""
    repeated = sorted({uri for uri in root_uris if list(root_uris).count(uri) > 1})
    if repeated:
        raise UserError(f"--data {repeated[0]} is given twice: give each root once.")
    tables = [list_root_images(uri).assign(root=i) for i, uri in enumerate(root_uris)]
    return pd.concat(tables, ignore_index=True).sort_values("uri", ignore_index=True)


def filter_classes(images: pd.DataFrame, min_images: int, keep: Collection[str] = ()) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop characters with fewer than ``min_images`` images, but those in ``keep``; returns (kept, dropped counts)."""
    counts = images["label"].value_counts()
    rare = counts[(counts < min_images) & ~counts.index.isin(list(keep))]
    dropped = {str(k): int(v) for k, v in rare.sort_index().items()}
    kept = images[~images["label"].isin(list(dropped))].reset_index(drop=True)
    if kept.empty:
        raise UserError(
            f"--min-images-per-class {min_images} drops every character (the largest has {int(counts.max())} images): lower it."
        )
    return kept, dropped


def _class_rng(seed: int, label: str) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process, and every worker and
    # every rerun must draw the same split.
    return np.random.default_rng([seed, zlib.crc32(label.encode())])


def cap_per_class(images: pd.DataFrame, max_images: int | None, seed: int) -> pd.DataFrame:
    """Keep a seeded random ``max_images`` per class (for quick runs); None keeps all."""
    if not max_images:
        return images
    parts = []
    for label, group in images.groupby("label", sort=True):
        order = _class_rng(seed + 1, str(label)).permutation(len(group))
        parts.append(group.iloc[np.sort(order[:max_images])])
    return pd.concat(parts, ignore_index=True)


@dataclass(frozen=True)
class Split:
    train: pd.DataFrame
    val: pd.DataFrame  # early stopping, best epoch, LR schedule, calibration
    test: pd.DataFrame  # reported only, never used for a decision
    classes: list[str]


def _held_out_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(test, val) images of a class of ``n``: every non-empty share gets one, training keeps one."""
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if test_fraction > 0 and n >= 3:
        n_test = max(n_test, 1)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_test = min(n_test, max(n - 2, 0))  # leave one for validation and one for training
    n_val = min(n_val, max(n - n_test - 1, 0))
    return n_test, n_val


def stratified_split(images: pd.DataFrame, val_fraction: float, seed: int, test_fraction: float = 0.0,
                     strangers: frozenset[str] = frozenset(), classes: Sequence[str] = ()) -> Split:
    """Deterministic, stratified, disjoint train / validation / test split.

    Each class keeps ``test_fraction`` of its images for test and ``val_fraction``
    for validation. Depends only on the set of uris, the seed and the fractions,
    never on listing order, so every worker and every rerun draws the same split.
    The test images are drawn first, so they stay the same whatever
    ``val_fraction`` is. Adds ``label_index`` (position in the sorted class list).

    The characters named in ``strangers`` are split the same way but are no class:
    their ``label_index`` is -1 (``compose.STRANGER``), and ``classes`` leaves them out.
    Each character's split depends on its own pictures only, so adding strangers
    moves no other picture between splits.

    ``classes`` is an order to keep (a model's that the run starts from): those
    characters first, in that order, whether the images have them or not; the
    images' other characters after them, sorted.
    """
    if val_fraction + test_fraction >= 1:
        raise UserError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} leave nothing to train on.")
    found = set(images["label"].unique().tolist()) - set(strangers)
    classes = list(classes) + sorted(found - set(classes))
    index = {name: i for i, name in enumerate(classes)}
    parts: dict[str, list[pd.DataFrame]] = {"train": [], "val": [], "test": []}
    for label, group in images.sort_values("uri").groupby("label", sort=True):
        order = _class_rng(seed, str(label)).permutation(len(group))
        n_test, n_val = _held_out_counts(len(group), val_fraction, test_fraction)
        parts["test"].append(group.iloc[order[:n_test]])
        parts["val"].append(group.iloc[order[n_test : n_test + n_val]])
        parts["train"].append(group.iloc[order[n_test + n_val :]])

    def finish(frames: list[pd.DataFrame]) -> pd.DataFrame:
        frame = pd.concat(frames, ignore_index=True)
        frame = frame.assign(label_index=frame["label"].map(index).fillna(-1).astype("int64"))
        return frame.sort_values("uri", ignore_index=True)

    return Split(finish(parts["train"]), finish(parts["val"]), finish(parts["test"]), classes)
