"""Which epoch a run keeps, and with which thresholds: chosen on validation, by the figure users read.

Users read who is on screen, so the kept epoch is the one of best validation
figure, not of lowest validation loss (on a short cosine run the loss can be
lowest at the warm-up epoch, where the model still names almost nobody right):

- a multi-label model: the macro-F1 of its ``characters`` on the validation frames
  (whole pictures, scenes composed of several characters or of nobody), each
  character at the threshold its rule chooses on those same frames;
- a single-label model: the top-1 accuracy on the validation pictures.

Thresholds (multi-label) are chosen per character on the validation frames whose truth
is whole: the composed frames (everyone in them is known) and the strangers' pictures
(none of the named characters is theirs). A picture as it is names one character and
says nothing of the others, so it does not choose a threshold; it still counts in the
figure that chooses the epoch. The two rules:

- ``count``: the cut that names the character on as many validation frames as it is
  on, so its screen time comes out right on them (the default: screen time is what
  users read, and F1 at these cuts measured within a point of the F1 rule's);
- ``f1``: the cut of maximum F1, which favours recall and over-counts the weaker
  characters' screen time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simpsons_ray.model import calibration, multilabel
from simpsons_ray.train.compose import STRANGER
from simpsons_ray.train.mixing import COMPOSED

THRESHOLD_RULES = ("count", "f1")


def complete_truth(scored: dict[str, np.ndarray]) -> np.ndarray:
    """A mask of the validation frames whose targets say who is there and who is not: composed frames, and strangers' pictures."""
    kinds = scored.get("kind")
    if kinds is None:
        return np.ones(len(scored["target"]), dtype=bool)
    return (kinds == COMPOSED) | (scored.get("label", np.zeros(len(kinds))) == STRANGER)


def choose_thresholds(scores: np.ndarray, targets: np.ndarray, rule: str) -> np.ndarray:
    """Per character, the score it needs to be named, chosen on these (validation) frames by ``rule``."""
    if rule == "f1":
        return multilabel.choose_thresholds(scores, targets)
    if rule == "count":
        return multilabel.count_thresholds(scores, targets)
    raise ValueError(f"unknown threshold rule {rule!r}")


@dataclass(frozen=True)
class Validation:
    """One epoch's validation: the loss shown in the progress line, and the figure that chooses the epoch."""

    loss: float
    accuracy: float  # a single-label model's top-1; a multi-label model's exact-set accuracy at its thresholds
    score: float  # what chooses the epoch: top-1 accuracy, or macro-F1 of the characters


def validate(scored: dict[str, np.ndarray], objective: str, threshold_rule: str = "count") -> Validation:
    """The figures of validation's ``scored`` frames (``logits`` with ``label``, or ``target`` for a multi-label model)."""
    logits = scored.get("logits", np.zeros((0, 0), np.float32))
    if not len(logits):
        return Validation(float("nan"), 0.0, 0.0)
    if objective == "single":
        labels = scored["label"].astype(np.int64)
        accuracy = float((logits.argmax(1) == labels).mean())
        return Validation(calibration.nll(logits, labels), accuracy, accuracy)
    targets = scored["target"]
    scores = multilabel.sigmoid(logits)
    complete = complete_truth(scored)
    sets = multilabel.predicted_sets(scores, choose_thresholds(scores[complete], targets[complete], threshold_rule))
    report = multilabel.report(sets, targets, [str(i) for i in range(targets.shape[1])])
    return Validation(multilabel.binary_nll(logits, targets), report["exact_set_accuracy"], report["macro_f1"])
