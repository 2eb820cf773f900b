"""What a multi-label model trains and is validated on: whole pictures, scenes of several, and composed frames.

A frame of the show is mostly a whole scene with one or two characters in it, and
sometimes nobody; the Kaggle pictures are whole scenes of one named character
(others may stand in them, unnamed). A training batch of N decoded pictures
becomes N frames, each one of three kinds (:class:`Mix` sets the shares):

- **whole**: the picture as it is. Its character is there (target 1); the others
  are not known to be absent, so their "absent" loss has the small weight
  ``other_weight``. A softmax cross-entropy over the logits (weight ``whole_ce``)
  also asks that the named character be the most likely one, as the single-label
  model does. A stranger's picture (a character too rare to name, :data:`STRANGER`)
  has every character absent, at full weight: the model learns to name nobody there.
- **scene**: two or three whole pictures side by side (each a centre crop squeezed
  into its panel) or one inset in another: their characters are there, the others
  weighted as above.
- **composed**: 0-3 characters cut to the dataset author's boxes, pasted on a real
  background (:mod:`simpsons_ray.train.compose`); everything is known, so every
  character's loss has full weight. Strangers' cuts stand in these frames too,
  never as targets.

Reviewed frames of nobody (``ROOT/_nobody/``, ``nobody`` in the batch) are labelled
:data:`STRANGER` too: as they are, every character is absent at full weight. They are
backgrounds of composed frames, whole, and never pasted into one as a cut-out.

Every frame carries its multi-hot ``target``, a per-character loss ``weight`` and a
``ce_label`` (the named character of a whole picture, else -1). NumPy and PIL only,
run in the training workers' data iterator (``train.data.AugmentingCollate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from simpsons_ray.train import compose
from simpsons_ray.train.compose import STRANGER

WHOLE, SCENE, COMPOSED = 0, 1, 2
INSET_SHARE = 0.4  # of two-picture scenes: one picture inset in the other rather than side by side


@dataclass(frozen=True)
class Mix:
    """Shares of the three kinds of frame (the rest are composed), and the loss weights of what is not known."""

    # Chosen on validation (bench/RESULTS.md, "One model"): pictures as they are bring the top-1
    # near the softmax's; scenes of several pictures and composed frames (the rest, 0.3) keep
    # crowds and "nobody" (a tenth of scenes instead of pictures: nobody recall 0.67 -> 0.75).
    whole: float = 0.6
    scene: float = 0.1
    other_weight: float = 0.1
    whole_ce: float = 1.0

    @property
    def shares(self) -> np.ndarray:
        shares = np.array([self.whole, self.scene, max(0.0, 1.0 - self.whole - self.scene)], dtype=np.float64)
        return shares / shares.sum()


@dataclass
class Frames:
    """Frames of one batch and what their loss knows of each."""

    images: np.ndarray  # uint8 [N, S, S, 3]
    targets: np.ndarray  # float32 [N, classes]
    weights: np.ndarray  # float32 [N, classes]
    ce_labels: np.ndarray  # int64 [N]: the named character of a whole picture, else -1
    kinds: np.ndarray  # int64 [N]: WHOLE, SCENE or COMPOSED


def scene(wholes: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Two or three whole pictures side by side (each a centre crop, squeezed into its panel), or one inset in another."""
    size = wholes[0].shape[0]
    if len(wholes) == 2 and rng.random() < INSET_SHARE:
        frame = wholes[0].copy()
        side = int(size * rng.uniform(0.35, 0.55))
        x, y = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        frame[y : y + side, x : x + side] = np.asarray(Image.fromarray(wholes[1]).resize((side, side), Image.Resampling.BILINEAR))
        return frame
    edges = np.linspace(0, size, len(wholes) + 1).astype(int)
    frame = np.empty_like(wholes[0])
    for j, picture in enumerate(wholes):
        width = int(edges[j + 1] - edges[j])
        keep = int(size * rng.uniform(width / size, 1.0))  # a centre crop this wide, squeezed into the panel
        left = (size - keep) // 2
        panel = Image.fromarray(picture[:, left : left + keep]).resize((width, size), Image.Resampling.BILINEAR)
        frame[:, edges[j] : edges[j + 1]] = np.asarray(panel)
    return frame


def training_frames(batch: dict[str, np.ndarray], num_classes: int, rng: np.random.Generator, mix: Mix) -> Frames:
    """One frame per picture of a decoded batch (``whole``, ``image`` cells, ``aspect``, ``label``, backgrounds)."""
    labels = np.asarray(batch["label"], dtype=np.int64)
    n = len(labels)
    kinds = rng.choice(3, size=n, p=mix.shares)
    size = batch["whole"].shape[1]
    frames = Frames(np.empty((n, size, size, 3), np.uint8), np.zeros((n, num_classes), np.float32),
                    np.ones((n, num_classes), np.float32), np.full(n, -1, np.int64), kinds)
    for i in np.flatnonzero(kinds == WHOLE):
        frames.images[i] = batch["whole"][i]
        _name(frames, i, [labels[i]], mix)
        if labels[i] != STRANGER:
            frames.ce_labels[i] = labels[i]
    for i in np.flatnonzero(kinds == SCENE):
        others = [int(o) for o in rng.choice(n, size=min(n, 3), replace=False) if o != i][: int(rng.integers(1, 3))]
        members = [int(i)] + others
        frames.images[i] = scene([batch["whole"][m] for m in members], rng)
        _name(frames, i, [labels[m] for m in members], mix)
    composed = np.flatnonzero(kinds == COMPOSED)
    if len(composed):
        backgrounds = np.asarray(batch["background"])[np.asarray(batch["has_background"], dtype=bool)]
        cells = ~np.asarray(batch.get("nobody", np.zeros(n, dtype=bool)), dtype=bool)  # a frame of nobody has no one to cut out
        made = compose.compose(np.asarray(batch["image"])[cells], np.asarray(batch["aspect"])[cells], labels[cells], backgrounds,
                               num_classes, rng, len(composed))
        frames.images[composed], frames.targets[composed] = made.images, made.targets
    return frames


def _name(frames: Frames, i: int | np.integer, labels: list[int], mix: Mix) -> None:
    """Frame ``i`` shows these pictures' characters; of the others nothing is known, unless every picture is a stranger's."""
    named = [k for k in labels if k != STRANGER]
    if not named:
        return  # strangers only: nobody the model names is there, at full weight
    frames.weights[i] = mix.other_weight
    for k in named:
        frames.targets[i, k] = 1.0
        frames.weights[i, k] = 1.0


def validation_frames(batch: dict[str, np.ndarray], num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """A Ray Data ``map_batches`` stage: each validation picture as it is, and the batch's composed frames; the same on every run.

    Whole pictures score what most frames of the show are; composed frames score
    crowds and "nobody", as ``evaluate --composites`` does (of the named characters
    only, on the backgrounds of the batch). Targets treat a whole picture as showing
    its character alone.
    """
    labels = np.asarray(batch["label"], dtype=np.int64)
    known = labels != STRANGER
    rng = np.random.default_rng(compose.batch_seed(seed, labels))
    backgrounds = np.asarray(batch["background"])[np.asarray(batch["has_background"], dtype=bool)]
    made = compose.compose(batch["image"][known], batch["aspect"][known], labels[known], backgrounds, num_classes, rng,
                           int(known.sum()), compose.EVAL_COUNT_WEIGHTS) if known.any() else None
    whole_targets = np.zeros((len(labels), num_classes), np.float32)
    whole_targets[np.flatnonzero(known), labels[known]] = 1.0
    images = [batch["whole"]] + ([made.images] if made is not None else [])
    targets = [whole_targets] + ([made.targets] if made is not None else [])
    kinds = [np.full(len(labels), WHOLE)] + ([np.full(len(made.images), COMPOSED)] if made is not None else [])
    return {"image": np.concatenate(images), "target": np.concatenate(targets),
            "label": np.concatenate([labels] + ([np.full(len(made.images), -1)] if made is not None else [])),
            "kind": np.concatenate(kinds).astype(np.int64)}
