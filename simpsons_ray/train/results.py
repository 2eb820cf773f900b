"""A trained model's report card: its scores on validation and test, its calibration, and the artifact that keeps them.

Training scores the kept weights twice after the last epoch: on the validation split
(which also chose the best epoch and fits the temperature and thresholds, so its
numbers are optimistic) and on the test split (never used for any decision, so its
numbers are the ones to quote). Both land in ``metrics.json`` under their own key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from simpsons_ray.core import storage
from simpsons_ray.model import calibration, metrics, multilabel
from simpsons_ray.model.artifact import save_artifact
from simpsons_ray.model.network import build_model
from simpsons_ray.train import pictures
from simpsons_ray.train.config import plan_phases
from simpsons_ray.train.state import TrainState
from simpsons_ray.train.steps import predict_logits


def multilabel_results(scored: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str]) -> tuple[float, np.ndarray, dict[str, Any]]:
    """A multi-label model's temperature and thresholds, from the validation frames only, and every split's report.

    ``scored`` maps a split to its (logits, multi-hot targets); the test split is
    scored with what validation chose, and chooses nothing.
    """
    logits, targets = scored["validation"]
    temperature = calibration.fit_temperature(logits, targets, loss=multilabel.binary_nll)
    thresholds = multilabel.choose_thresholds(multilabel.sigmoid(logits, temperature), targets)
    results = {name: multilabel.score(lg, tg, classes, temperature, thresholds) for name, (lg, tg) in scored.items()}
    return temperature, thresholds, results


def _write_artifact(config, classes, state: TrainState, val_ds, test_ds, skipped, dropped, wall_s: float) -> dict[str, Any]:
    """Score the kept weights on validation and test, fit the temperature on validation, write the artifact."""
    model = build_model(config.arch, len(classes), config.head_hidden, config.dropout)
    kept = state.best_model if state.best_model is not None else state.model
    assert kept is not None, "a finished run has weights"
    model.load_state_dict(kept)
    cpu = torch.device("cpu")
    scored = {"validation": predict_logits(model, ray_batches(val_ds), cpu, config.preprocess, config.tta_flip)}
    if test_ds is not None:
        scored["test"] = predict_logits(model, ray_batches(test_ds), cpu, config.preprocess, config.tta_flip)
    multi = config.objective == "multilabel"
    inference = {"tta_flip": config.tta_flip, "objective": config.objective}
    if multi:
        temperature, thresholds, results = multilabel_results(scored, classes)
        inference["thresholds"] = [float(t) for t in thresholds]
    else:
        temperature = calibration.fit_temperature(*scored["validation"])
        results = {name: score(logits, labels, classes, temperature) for name, (logits, labels) in scored.items()}
    inference["temperature"] = temperature

    training_flags = config.to_dict() | {"phases": [dataclasses.asdict(p) for p in plan_phases(config)]}
    model_id = save_artifact(
        config.output_uri, model, config.arch, classes, config.preprocess, config.head_hidden, config.dropout,
        training_flags, inference,
    )
    train_rates = [row["images_per_s"] for row in state.history]
    summary = {
        "model_id": model_id,
        "best_epoch": state.best_epoch + 1,
        "epochs_run": state.epoch,
        "validation": results["validation"],  # chose the best epoch and the temperature: optimistic
        "test": results.get("test"),  # never used for a decision: the number to quote
        "history": state.history,
        "train_images_per_s_mean": float(np.mean(train_rates)) if train_rates else None,
        "wall_time_s": wall_s,
        "skipped_images": skipped,
        "dropped_classes": dropped,
    }
    out = config.output_uri
    storage.write_json(storage.join(out, "metrics.json"), summary)
    shown = "test" if "test" in results else "validation"
    if multi:
        write_multilabel_pictures(out, classes, state.history, scored, temperature, results[shown])
        print(multilabel.format_report(results[shown]))
        for name, result in results.items():
            print(multilabel.format_headline(name, result))
    else:
        write_pictures(out, classes, state.history, scored, temperature)
        print(metrics.format_report(results[shown]))
        for name, result in results.items():
            print(format_headline(name, result))
    print(f"model {model_id} (best epoch {state.best_epoch + 1}) written to {out}")
    return summary


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
    shown = "test" if "test" in scored else "validation"
    logits, labels = scored[shown]
    matrix = metrics.confusion_matrix(labels, logits.argmax(axis=1), len(classes))
    storage.write_bytes(storage.join(model_dir, "confusion_matrix.csv"), metrics.matrix_csv(matrix, classes).encode())
    pictures.confusion_matrix(matrix, classes, storage.join(model_dir, "confusion_matrix.png"), title=f"{shown} split")
    pictures.training_curves(history, storage.join(model_dir, "curves.png"))
    _reliability_picture(model_dir, scored, temperature, calibration.softmax, calibration.reliability)


def write_multilabel_pictures(model_dir: str, classes: list[str], history: list[dict],
                              scored: dict[str, tuple[np.ndarray, np.ndarray]], temperature: float, shown: dict[str, Any]) -> None:
    """A multi-label model's: per_character.csv (the shown split's report and thresholds), curves.png, reliability.png."""
    import pandas as pd

    from simpsons_ray.model import multilabel

    table = pd.DataFrame.from_dict(shown["per_class"], orient="index").rename_axis("character").reset_index()
    storage.write_bytes(storage.join(model_dir, "per_character.csv"), table.to_csv(index=False, float_format="%.4f").encode())
    pictures.training_curves(history, storage.join(model_dir, "curves.png"))
    _reliability_picture(model_dir, scored, temperature, multilabel.sigmoid, multilabel.reliability)


def _reliability_picture(model_dir: str, scored: dict[str, tuple[np.ndarray, np.ndarray]], temperature: float,
                         probabilities, reliability) -> None:
    """reliability.png: every split before (T = 1) and after the temperature, with the objective's probabilities."""

    curves = {}
    for name, (logits, truth) in scored.items():
        curves[f"{name}, T=1"] = reliability(probabilities(logits), truth)
        curves[f"{name}, T={temperature:.2f}"] = reliability(probabilities(logits, temperature), truth)
    pictures.reliability_diagram(curves, storage.join(model_dir, "reliability.png"))
