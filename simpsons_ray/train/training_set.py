"""What a run trains on: the pictures of every ``--data`` root pooled, their boxes, frames of nobody, and the split.

Characters are the union of the roots'. Each root's pictures take their boxes from
that root's own ``annotation.csv`` (in it or in its parent; ``--boxes CSV`` gives one
file for every root instead), so two roots' ``<character>/<file>`` never borrow each
other's boxes. A run that starts from a model (``--init-from``) keeps its characters
first, in its order (:func:`simpsons_ray.train.datasets.stratified_split`), and never
drops or estranges one of them for being rare.

``ROOT/_nobody/`` frames train a multi-label model as frames where it names nobody:
labelled like strangers (every character absent, at full weight; scored with the
strangers on validation and test) and backgrounds of composed frames. A single-label
model has no way to say nobody: it leaves them out, with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from simpsons_ray.core.errors import UserError
from simpsons_ray.train import compose, datasets
from simpsons_ray.train.config import TrainConfig

log = logging.getLogger("simpsons_ray.train")


@dataclass(frozen=True)
class TrainingSet:
    split: datasets.Split
    dropped: dict[str, int]  # characters left out, or trained as strangers, for being rare
    added: list[str] = field(default_factory=list)  # characters a parent model did not have: appended to its head
    without_data: list[str] = field(default_factory=list)  # a parent model's characters with no picture here: kept in the head
    nobody: int = 0  # frames of nobody (ROOT/_nobody/) trained on


def build_training_set(config: TrainConfig, parent_classes: Sequence[str] = ()) -> TrainingSet:
    """List, pool, filter, cap and split the roots' images, in ``parent_classes``' order; says what it did."""
    pooled = datasets.pool_roots(config.data_uris)
    is_nobody = pooled["label"] == datasets.NOBODY
    everyone, nobody = pooled[~is_nobody].reset_index(drop=True), pooled[is_nobody].reset_index(drop=True)
    if everyone.empty:
        raise UserError(f"No pictures of characters under {_roots(config)}, only frames of nobody: give a root with "
                        "ROOT/<character>/*.jpg too.")
    images, dropped, strangers = _known_and_strangers(config, everyone, frozenset(parent_classes))
    images = datasets.cap_per_class(images, config.max_images_per_class, config.seed)
    nobody = _nobody_frames(config, nobody)
    if len(nobody):
        images = pd.concat([images, nobody], ignore_index=True)
        strangers |= {datasets.NOBODY}
    if config.objective == "multilabel":
        images = _with_boxes(config, images).assign(nobody=lambda t: t["label"] == datasets.NOBODY)
    split = datasets.stratified_split(images, config.val_fraction, config.seed, config.test_fraction, frozenset(strangers),
                                      list(parent_classes))
    if len(split.classes) < 2:
        raise UserError(f"Only one character ({split.classes[0]}) under {_roots(config)}: training needs at least two.")
    found = set(images["label"])
    added = list(split.classes[len(parent_classes):]) if parent_classes else []
    without_data = [c for c in parent_classes if c not in found]
    _say_classes(added, without_data)
    named_strangers = len(strangers - {datasets.NOBODY})
    print(f"{len(split.train)} training, {len(split.val)} validation and {len(split.test)} test images "
          f"of {len(split.classes)} characters" + (f" and {named_strangers} strangers" if named_strangers else "")
          + (f", including {len(nobody)} frames of nobody" if len(nobody) else ""))
    return TrainingSet(split, dropped, added, without_data, len(nobody))


def _roots(config: TrainConfig) -> str:
    return ", ".join(config.data_uris)


def _known_and_strangers(config: TrainConfig, everyone: pd.DataFrame, keep: frozenset[str]) -> tuple[pd.DataFrame, dict[str, int], set[str]]:
    """The pictures trained on, the characters too rare to name, and those of them that train as strangers."""
    images, dropped = datasets.filter_classes(everyone, config.min_images_per_class, keep)
    strangers = set(dropped) if config.objective == "multilabel" and config.strangers else set()
    if strangers:
        images = everyone
        print(f"{len(dropped)} character(s) with fewer than {config.min_images_per_class} images train as strangers, whom the "
              "model names as nobody: " + ", ".join(f"{k} ({v})" for k, v in dropped.items()))
    elif dropped:
        print(f"dropped {len(dropped)} character(s) with fewer than {config.min_images_per_class} images: "
              + ", ".join(f"{k} ({v})" for k, v in dropped.items()))
    return images, dropped, strangers


def _nobody_frames(config: TrainConfig, nobody: pd.DataFrame) -> pd.DataFrame:
    """The ``_nobody`` frames a run trains on: a multi-label model's (capped like a character's), none for a single-label one."""
    if nobody.empty:
        return nobody
    if config.objective != "multilabel":
        log.warning("train: left out %d frame(s) of nobody (%s/): a single-label model names one character per picture "
                    "(--objective multilabel trains on them)", len(nobody), datasets.NOBODY)
        return nobody.iloc[:0]
    print(f"{len(nobody)} frame(s) of nobody ({datasets.NOBODY}/) train as frames where the model names nobody, "
          "and as backgrounds of composed frames")
    return datasets.cap_per_class(nobody, config.max_images_per_class, config.seed)


def _say_classes(added: list[str], without_data: list[str]) -> None:
    if added:
        print(f"{len(added)} character(s) the --init-from model does not have are appended to its head: {', '.join(added)}")
    if without_data:
        print(f"{len(without_data)} character(s) of the --init-from model have no picture here and stay in its head, "
              f"learning only where they are absent: {', '.join(without_data)}")


def _with_boxes(config: TrainConfig, images: pd.DataFrame) -> pd.DataFrame:
    """``images`` with each root's boxes attached (``box``), and a line that says how many have one."""
    shared = _read_boxes(config.boxes) if config.boxes not in ("", "none") else None
    parts = []
    for root, group in images.groupby("root", sort=True):
        boxes = shared if config.boxes else _read_boxes(compose.default_boxes_uri(config.data_uris[int(root)]))
        parts.append(compose.attach_boxes(group, boxes))
    images = pd.concat(parts).sort_index()
    boxed = int(np.isfinite(np.stack(images["box"].to_numpy())[:, 0]).sum())
    if boxed:
        print(f"{boxed} of {len(images)} pictures have a box: their characters are cut to it, and the rest of the "
              "picture is a background for composed frames")
    elif images["label"].eq(datasets.NOBODY).any():
        print("no boxes for these pictures (annotation.csv): whole pictures are pasted into composed frames, on the frames "
              "of nobody; give --boxes for more backgrounds")
    else:
        print("no boxes for these pictures (annotation.csv): whole pictures are pasted into composed frames, and frames "
              "with nobody are flat colours, unlike the show's; give --boxes for real backgrounds")
    return images


def _read_boxes(uri: str | None) -> pd.DataFrame | None:
    return compose.read_boxes(uri) if uri else None
