"""A trained model's report card: its scores on a split, with calibration, and the files that show them.

Training scores the saved model twice after the last epoch: on the validation split
(which also chose the best epoch and fits the temperature, so its numbers are
optimistic) and on the test split (never used for any decision, so its numbers are
the ones to quote). Both land in ``metrics.json`` under their own key.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from simpsons_ray import calibration, metrics, storage


def ray_batches(dataset, batch_size: int = 128) -> Iterator[dict[str, torch.Tensor]]:
    """A decoded Ray dataset's {"image", "label"} batches (composed frames: {"image", "target"}) as tensors, in the driver."""
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        # A copy: Ray's arrays are read-only.
        yield {k: torch.tensor(batch[k]) for k in ("image", "label", "target") if k in batch}


def score(logits: np.ndarray, labels: np.ndarray, classes: Sequence[str], temperature: float) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class report, confusion matrix and calibration of one split's logits."""
    num_classes = len(classes)
    predicted = logits.argmax(axis=1) if len(labels) else np.zeros(0, dtype=np.int64)
    matrix = metrics.confusion_matrix(labels, predicted, num_classes)
    result = metrics.report(matrix, classes)
    result["confusion_matrix"] = matrix.tolist()
    result["calibration"] = calibration.summary(logits, labels, temperature) if len(labels) else None
    return result


def format_headline(name: str, result: dict[str, Any]) -> str:
    cal = result.get("calibration") or {}
    ece = f"   ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f} (T={cal['temperature']:.3f})" if cal else ""
    return f"{name}: accuracy {result['accuracy']:.4f}   macro-F1 {result['macro_f1']:.4f}   images {result['num_images']}{ece}"


def write_pictures(model_dir: str, classes: list[str], history: list[dict], scored: dict[str, tuple[np.ndarray, np.ndarray]],
                   temperature: float) -> None:
    """confusion_matrix.csv/png (test split, or validation without one), curves.png, reliability.png."""
    from simpsons_ray import plots

    shown = "test" if "test" in scored else "validation"
    logits, labels = scored[shown]
    matrix = metrics.confusion_matrix(labels, logits.argmax(axis=1), len(classes))
    storage.write_bytes(storage.join(model_dir, "confusion_matrix.csv"), metrics.matrix_csv(matrix, classes).encode())
    plots.confusion_matrix(matrix, classes, storage.join(model_dir, "confusion_matrix.png"), title=f"{shown} split")
    plots.training_curves(history, storage.join(model_dir, "curves.png"))
    _reliability_picture(model_dir, scored, temperature, calibration.softmax, calibration.reliability)


def write_multilabel_pictures(model_dir: str, classes: list[str], history: list[dict],
                              scored: dict[str, tuple[np.ndarray, np.ndarray]], temperature: float, shown: dict[str, Any]) -> None:
    """A multi-label model's: per_character.csv (the shown split's report and thresholds), curves.png, reliability.png."""
    import pandas as pd

    from simpsons_ray import multilabel, plots

    table = pd.DataFrame.from_dict(shown["per_class"], orient="index").rename_axis("character").reset_index()
    storage.write_bytes(storage.join(model_dir, "per_character.csv"), table.to_csv(index=False, float_format="%.4f").encode())
    plots.training_curves(history, storage.join(model_dir, "curves.png"))
    _reliability_picture(model_dir, scored, temperature, multilabel.sigmoid, multilabel.reliability)


def _reliability_picture(model_dir: str, scored: dict[str, tuple[np.ndarray, np.ndarray]], temperature: float,
                         probabilities, reliability) -> None:
    """reliability.png: every split before (T = 1) and after the temperature, with the objective's probabilities."""
    from simpsons_ray import plots

    curves = {}
    for name, (logits, truth) in scored.items():
        curves[f"{name}, T=1"] = reliability(probabilities(logits), truth)
        curves[f"{name}, T={temperature:.2f}"] = reliability(probabilities(logits, temperature), truth)
    plots.reliability_diagram(curves, storage.join(model_dir, "reliability.png"))
