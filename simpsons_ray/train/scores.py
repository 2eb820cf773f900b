"""A trained model's figures on a held-out split, the same for both objectives where they can be.

Held-out splits (validation, test) are pictures as they are; a multi-label model's
are also frames composed of them (0-3 characters, or nobody) and pictures of
strangers (characters it trained to leave unnamed). Its report on a split:

- at the top: the composed frames' set metrics (:func:`simpsons_ray.model.multilabel.report`:
  macro-F1, "nobody", screen-time error), with ``own_top1_macro_f1``, its own top-1
  read as a set, for comparison; ``all_frames_macro_f1`` over every frame of the split
  (what chose the epoch, on validation) and ``calibration`` over them all (what the
  temperature was fitted to);
- ``pictures``: the whole pictures, one named character each: top-1 accuracy and
  macro-F1 (as a single-label model's), how often ``characters`` names exactly that
  character, and the calibration of the top-1 score;
- ``strangers``: how often a stranger's picture is given a trained character's name.

A single-label model's report is its top-1 on the pictures (accuracy, macro-F1,
confusion matrix, calibration).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from simpsons_ray.model import calibration, metrics, multilabel
from simpsons_ray.train.compose import STRANGER
from simpsons_ray.train.mixing import COMPOSED, WHOLE
from simpsons_ray.train.selection import choose_thresholds, complete_truth


def ray_batches(dataset, batch_size: int = 128) -> Iterator[dict[str, torch.Tensor]]:
    """A decoded Ray dataset's batches as tensors, in the driver (image, and label, target, kind where present)."""
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        # A copy: Ray's arrays are read-only.
        yield {k: torch.tensor(batch[k]) for k in ("image", "label", "target", "kind") if k in batch}


def score(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str], temperature: float) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class report, confusion matrix and calibration of one split's logits (a softmax's)."""
    num_classes = len(classes)
    predicted = logits.argmax(axis=1) if len(labels) else np.zeros(0, dtype=np.int64)
    matrix = metrics.confusion_matrix(labels, predicted, num_classes)
    result = metrics.report(matrix, classes)
    result["confusion_matrix"] = matrix.tolist()
    result["calibration"] = calibration.summary(logits, labels, temperature) if len(labels) else None
    return result


def multilabel_results(scored: dict[str, dict[str, np.ndarray]], classes: list[str],
                       rule: str = "count") -> tuple[float, np.ndarray, dict[str, Any]]:
    """A multi-label model's temperature and thresholds, from the validation frames only, and every split's report.

    ``scored`` maps a split to its ``logits`` with ``target`` (and ``kind``, ``label``:
    :func:`simpsons_ray.train.mixing.validation_frames`); the test split is scored
    with what validation chose, and chooses nothing.
    """
    validation = scored["validation"]
    logits, targets = validation["logits"], validation["target"]
    temperature = calibration.fit_temperature(logits, targets, loss=multilabel.binary_nll)
    complete = complete_truth(validation)
    thresholds = choose_thresholds(multilabel.sigmoid(logits[complete], temperature), targets[complete], rule)
    return temperature, thresholds, {name: split_report(s, classes, temperature, thresholds) for name, s in scored.items()}


def split_report(scored: dict[str, np.ndarray], classes: Sequence[str], temperature: float, thresholds: np.ndarray) -> dict[str, Any]:
    """A multi-label model's report on one split: composed frames at the top, then ``pictures`` and ``strangers``."""
    logits, targets = scored["logits"], scored["target"]
    kinds = scored.get("kind", np.full(len(logits), COMPOSED))
    labels = scored.get("label", np.full(len(logits), STRANGER))
    composed = kinds == COMPOSED
    result = multilabel.score(logits[composed], targets[composed], classes, temperature, thresholds)
    top1 = multilabel.top1_sets(multilabel.sigmoid(logits[composed], temperature))
    result["own_top1_macro_f1"] = multilabel.report(top1, targets[composed], classes)["macro_f1"]
    named = multilabel.predicted_sets(multilabel.sigmoid(logits, temperature), thresholds)
    result["all_frames_macro_f1"] = multilabel.report(named, targets, classes)["macro_f1"]
    # Over every frame of the split, as validation's were when the temperature was fitted to them.
    result["calibration"] = multilabel.calibration_summary(logits, targets, temperature) if len(targets) else None
    pictures = (kinds == WHOLE) & (labels != STRANGER)
    result["pictures"] = picture_report(logits[pictures], labels[pictures], classes, temperature, thresholds)
    strangers = (kinds == WHOLE) & (labels == STRANGER)
    result["strangers"] = {"false_name_rate": float(named[strangers].any(axis=1).mean()) if strangers.any() else None,
                           "num_images": int(strangers.sum())}
    return result


def picture_report(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str], temperature: float,
                   thresholds: np.ndarray) -> dict[str, Any]:
    """A multi-label model on pictures of one named character each: its top-1, its ``characters``, its top-1's calibration."""
    if not len(labels):
        return {"num_images": 0}
    result = score(logits, labels, classes, temperature)
    del result["calibration"]  # a softmax's; a sigmoid model's is below
    scores = multilabel.sigmoid(logits, temperature)
    named = multilabel.predicted_sets(scores, thresholds)
    rows = np.arange(len(labels))
    result["named_recall"] = float(named[rows, labels].mean())  # its character is among those named
    result["named_exactly"] = float((named[rows, labels] & (named.sum(axis=1) == 1)).mean())  # and nobody else
    result["named_nobody"] = float((~named.any(axis=1)).mean())
    result["calibration"] = top1_calibration(logits, labels, temperature)
    return result


def top1_calibration(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    """ECE of a sigmoid model's top-1 score (the ``confidence`` column) against its top-1 being the picture's character."""
    correct = logits.argmax(axis=1) == labels
    before = multilabel.sigmoid(logits.max(axis=1))
    after = multilabel.sigmoid(logits.max(axis=1), temperature)
    return {"temperature": temperature, "ece_before": calibration.binned(before, correct).ece,
            "ece_after": calibration.binned(after, correct).ece, "num_images": int(len(labels))}


def format_headline(name: str, result: dict[str, Any]) -> str:
    """One line of a split's figures, either objective."""
    if result.get("objective") != "multilabel":
        cal = result.get("calibration") or {}
        ece = f"   ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f} (T={cal['temperature']:.3f})" if cal else ""
        return f"{name}: accuracy {result['accuracy']:.4f}   macro-F1 {result['macro_f1']:.4f}   images {result['num_images']}{ece}"
    line = multilabel.format_headline(f"{name}, composed frames", result)
    pictures = result.get("pictures") or {}
    if pictures.get("num_images"):
        cal = pictures["calibration"]
        line += (f"\n{name}, pictures: top-1 accuracy {pictures['accuracy']:.4f}   macro-F1 {pictures['macro_f1']:.4f}   "
                 f"named exactly {pictures['named_exactly']:.4f}   top-1 ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}   "
                 f"images {pictures['num_images']}")
    strangers = result.get("strangers") or {}
    if strangers.get("num_images"):
        line += f"\n{name}, strangers: false-name rate {strangers['false_name_rate']:.4f}   images {strangers['num_images']}"
    return line
