"""Scoring a model that names every character on screen: thresholds, set metrics, screen-time error.

A multi-label model gives each character its own probability, ``sigmoid(logit / T)``.
A character is on screen when its probability reaches its threshold, chosen per
character on validation frames as the one of maximum F1 (a rare character and a
common one rarely want the same cut). The metrics compare predicted sets with the
true sets of composed frames (:mod:`simpsons_ray.train.compose`):

- per character precision, recall, F1 and support; micro F1 (every (frame,
  character) decision pooled) and macro F1 (the mean over characters with support);
- exact-set accuracy: frames whose predicted set is exactly the true one;
- "nobody": precision and recall of predicting an empty set;
- screen time: frames each character is predicted on against the truth.

A single-label model is scored by the same functions, its set being its top-1
(optionally only above a confidence): :func:`top1_sets`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from simpsons_ray.model.metrics import per_class_rows, precision_recall_f1

if TYPE_CHECKING:
    from simpsons_ray.model import calibration

DEFAULT_THRESHOLD = 0.5  # a character with no positive validation frame keeps this


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def binary_nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean over frames of the summed per-character binary cross-entropy of ``targets`` under sigmoid(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    t = np.asarray(targets, dtype=np.float64)
    # log(1 + e^z) - t z, computed stably.
    losses = np.logaddexp(0.0, z) - t * z
    return float(losses.sum(axis=1).mean()) if len(z) else 0.0


def choose_thresholds(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per character, the probability cut of maximum F1 on these (validation) frames.

    The cut is placed halfway between the lowest score kept and the highest one
    left out, so a frame scored exactly as a validation frame falls on the same side.
    A character with no positive frame keeps :data:`DEFAULT_THRESHOLD`.
    """
    return _per_character(scores, targets, _best_f1_keep)


def count_thresholds(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per character, the cut that names it on exactly as many of these (validation) frames as it is on.

    The cut lies halfway between the k-th and (k+1)-th highest scores, k the
    character's true frames, so its predicted screen time on these frames is its
    true screen time (ties aside). A character with no positive frame keeps
    :data:`DEFAULT_THRESHOLD`.
    """
    return _per_character(scores, targets, lambda ranked, truth: int(truth.sum()))


def _per_character(scores: np.ndarray, targets: np.ndarray, keep) -> np.ndarray:
    """Each character's cut, halfway between the ``keep(ranked scores, their truth)``-th highest score and the next."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets) > 0.5
    thresholds = np.full(scores.shape[1], DEFAULT_THRESHOLD)
    for c in range(scores.shape[1]):
        if not targets[:, c].any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        ranked = scores[order, c]
        kept = keep(ranked, targets[order, c])
        below = ranked[kept] if kept < len(ranked) else 0.0
        thresholds[c] = (ranked[kept - 1] + below) / 2
    return thresholds


def _best_f1_keep(ranked: np.ndarray, truth: np.ndarray) -> int:
    """How many of the highest scores to keep for the best F1, cutting only between distinct scores."""
    tp = np.cumsum(truth)
    kept = np.arange(1, len(ranked) + 1)
    last = np.r_[ranked[1:] != ranked[:-1], True]  # the last index of each run of equal scores
    f1 = np.where(last, 2 * tp / (kept + truth.sum()), -1.0)
    return int(np.argmax(f1)) + 1


def predicted_sets(scores: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """bool [frames, characters]: who is on screen."""
    return np.asarray(scores) >= np.asarray(thresholds)


def top1_sets(probabilities: np.ndarray, min_confidence: float = 0.0) -> np.ndarray:
    """A single-label model's sets: its top-1 character, when its probability reaches ``min_confidence``."""
    probabilities = np.asarray(probabilities)
    out = np.zeros(probabilities.shape, dtype=bool)
    if len(probabilities):
        best = probabilities.argmax(axis=1)
        rows = np.arange(len(best))
        out[rows, best] = probabilities[rows, best] >= min_confidence
    return out


def report(predicted: np.ndarray, targets: np.ndarray, classes: Sequence[str], seconds_per_frame: float = 1.0) -> dict[str, Any]:
    """Set metrics of ``predicted`` (bool) against ``targets`` (0/1), per character and overall."""
    pred = np.asarray(predicted, dtype=bool)
    true = np.asarray(targets) > 0.5
    tp = (pred & true).sum(axis=0).astype(np.float64)
    fp = (pred & ~true).sum(axis=0).astype(np.float64)
    fn = (~pred & true).sum(axis=0).astype(np.float64)
    precision, recall, f1 = precision_recall_f1(tp, fp, fn)
    support = true.sum(axis=0)
    present = support > 0
    micro_p, micro_r, micro_f1 = precision_recall_f1(tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True))
    nobody_true, nobody_pred = ~true.any(axis=1), ~pred.any(axis=1)
    nobody_p, nobody_r, nobody_f1 = precision_recall_f1(np.array([float((nobody_true & nobody_pred).sum())]),
                                        np.array([float((~nobody_true & nobody_pred).sum())]),
                                        np.array([float((nobody_true & ~nobody_pred).sum())]))
    predicted_frames, true_frames = pred.sum(axis=0), true.sum(axis=0)
    per_class = per_class_rows(classes, precision, recall, f1, support)
    for i, row in enumerate(per_class.values()):
        row.update(true_seconds=float(true_frames[i] * seconds_per_frame), predicted_seconds=float(predicted_frames[i] * seconds_per_frame))
    relative = np.abs(predicted_frames - true_frames)[present] / true_frames[present]
    return {
        "objective": "multilabel",
        "num_frames": int(len(true)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "micro_f1": float(micro_f1[0]),
        "micro_precision": float(micro_p[0]),
        "micro_recall": float(micro_r[0]),
        "exact_set_accuracy": float((pred == true).all(axis=1).mean()) if len(true) else 0.0,
        # Frames with nobody on screen: how often "nobody" is said when true, and is true when said.
        "nobody": {"precision": float(nobody_p[0]), "recall": float(nobody_r[0]), "f1": float(nobody_f1[0]),
                   "support": int(nobody_true.sum())},
        # Screen time: |predicted - true| / true per character, averaged over those on screen.
        "screen_time_error": float(relative.mean()) if len(relative) else 0.0,
        "per_class": per_class,
    }


def format_report(result: dict[str, Any]) -> str:
    """A fixed-width per-character table (with screen time against the truth) and the headline numbers."""
    width = max([len("character")] + [len(name) for name in result["per_class"]])
    lines = [f"{'character':<{width}}  precision  recall     f1  support  true_s  predicted_s"]
    for name, row in result["per_class"].items():
        lines.append(
            f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  {row['support']:7d}"
            f"  {row['true_seconds']:6.0f}  {row['predicted_seconds']:11.0f}"
        )
    nobody = result["nobody"]
    lines.append(
        f"{'(nobody)':<{width}}  {nobody['precision']:9.3f}  {nobody['recall']:6.3f}  {nobody['f1']:5.3f}  {nobody['support']:7d}"
    )
    lines.append(format_headline("", result).strip())
    return "\n".join(lines)


def format_headline(name: str, result: dict[str, Any]) -> str:
    prefix = f"{name}: " if name else ""
    return (
        f"{prefix}macro-F1 {result['macro_f1']:.4f}   micro-F1 {result['micro_f1']:.4f}   exact-set {result['exact_set_accuracy']:.4f}   "
        f"nobody P/R {result['nobody']['precision']:.3f}/{result['nobody']['recall']:.3f}   "
        f"screen-time error {result['screen_time_error']:.3f}   frames {result['num_frames']}"
    )


def reliability(scores: np.ndarray, targets: np.ndarray) -> "calibration.Reliability":
    """Every (frame, character) score against whether that character is there, in the bins of top-1 reliability."""
    from simpsons_ray.model import calibration

    return calibration.binned(np.asarray(scores, dtype=np.float64).ravel(), (np.asarray(targets) > 0.5).ravel())


def calibration_summary(logits: np.ndarray, targets: np.ndarray, temperature: float) -> dict[str, float]:
    """ECE (over every frame and character) and binary NLL, before (T = 1) and after temperature scaling."""
    from simpsons_ray.model import calibration

    return calibration.summary(logits, targets, temperature, sigmoid, binary_nll, reliability)


def score(logits: np.ndarray, targets: np.ndarray, classes: Sequence[str], temperature: float, thresholds: np.ndarray) -> dict[str, Any]:
    """The report of one split's composed frames, with calibration; ``accuracy`` is the exact-set accuracy."""
    result = report(predicted_sets(sigmoid(logits, temperature), thresholds), targets, classes)
    result["accuracy"] = result["exact_set_accuracy"]  # the column the model card shows for both objectives
    result["calibration"] = calibration_summary(logits, targets, temperature) if len(targets) else None
    return result
