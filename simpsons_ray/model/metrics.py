"""Classification metrics: accuracy, macro-F1, per-class report, confusion matrix."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with true classes as rows and predicted classes as columns."""
    true = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(true * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def precision_recall_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 from counts; 0 where undefined (nothing predicted, or nothing true)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return precision, recall, f1


def per_class_rows(classes: Sequence[str], precision: np.ndarray, recall: np.ndarray, f1: np.ndarray,
                   support: np.ndarray) -> dict[str, dict[str, Any]]:
    """{character: {precision, recall, f1, support}}, plain floats and ints (for JSON)."""
    return {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(classes)
    }


def report(matrix: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support from a confusion matrix.

    Macro-F1 averages over classes that have support, so a class absent from the
    evaluated set does not drag the average to zero.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    total = matrix.sum()
    tp = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision, recall, f1 = precision_recall_f1(tp, predicted - tp, support - tp)
    present = support > 0
    per_class = per_class_rows(classes, precision, recall, f1, support)
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "num_images": int(total),
        "per_class": per_class,
    }


def format_report(result: dict[str, Any]) -> str:
    """A fixed-width per-class table followed by the headline numbers."""
    width = max([len("character")] + [len(name) for name in result["per_class"]])
    lines = [f"{'character':<{width}}  precision  recall     f1  support"]
    for name, row in result["per_class"].items():
        lines.append(f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  {row['support']:7d}")
    lines.append(
        f"accuracy {result['accuracy']:.4f}   macro-F1 {result['macro_f1']:.4f}   images {result['num_images']}"
    )
    return "\n".join(lines)


def matrix_csv(matrix: np.ndarray, classes: Sequence[str]) -> str:
    """The confusion matrix as CSV: header of predicted classes, one row per true class."""
    header = "true\\predicted," + ",".join(classes)
    rows = [f"{name}," + ",".join(str(int(v)) for v in matrix[i]) for i, name in enumerate(classes)]
    return "\n".join([header, *rows]) + "\n"
