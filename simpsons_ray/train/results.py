"""The artifact a run leaves: its kept weights scored on validation and test, calibrated, with the pictures that show them.

Training scores the kept weights twice after the last epoch: on the validation split
(which also chose the best epoch and fits the temperature and thresholds, so its
numbers are optimistic) and on the test split (never used for any decision, so its
numbers are the ones to quote). Both land in ``metrics.json`` under their own key;
:mod:`simpsons_ray.train.scores` says what each report holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from simpsons_ray.core import storage
from simpsons_ray.model import calibration, metrics, multilabel
from simpsons_ray.model.artifact import save_artifact
from simpsons_ray.model.network import build_model
from simpsons_ray.train import pictures
from simpsons_ray.train.config import Phase
from simpsons_ray.train.scores import format_headline, multilabel_results, ray_batches, score
from simpsons_ray.train.state import TrainState
from simpsons_ray.train.steps import predict

# The figure that chose the kept epoch (simpsons_ray.train.selection), as the artifact and metrics.json say it.
SELECTED_BY = {"multilabel": "validation macro-F1 of the characters named", "single": "validation top-1 accuracy"}


@dataclass(frozen=True)
class RunPlan:
    """What the driver decided before training, that the artifact records."""

    classes: list[str]  # in the head's order
    phases: list[Phase]
    dropped: dict[str, int]  # characters left out, or trained as strangers, for being rare
    lineage: list[dict[str, Any]] = field(default_factory=list)  # Artifact.lineage: empty without --init-from


def write_artifact(config, plan: RunPlan, state: TrainState, val_ds, test_ds, skipped, wall_s: float) -> dict[str, Any]:
    """Score the kept weights on validation and test, fit the temperature (and thresholds) on validation, write the artifact."""
    classes = plan.classes
    model = build_model(config.arch, len(classes), config.head_hidden, config.dropout)
    kept = state.best_model if state.best_model is not None else state.model
    assert kept is not None, "a finished run has weights"
    model.load_state_dict(kept)
    cpu = torch.device("cpu")
    splits = {"validation": val_ds} | ({"test": test_ds} if test_ds is not None else {})
    scored = {name: predict(model, ray_batches(ds), cpu, config.preprocess, config.tta_flip) for name, ds in splits.items()}
    inference: dict[str, Any] = {"tta_flip": config.tta_flip, "objective": config.objective}
    if config.objective == "multilabel":
        temperature, thresholds, results = multilabel_results(scored, classes, config.threshold_rule)
        inference |= {"thresholds": [float(t) for t in thresholds], "threshold_rule": config.threshold_rule}
    else:
        temperature = calibration.fit_temperature(scored["validation"]["logits"], scored["validation"]["label"])
        results = {name: score(s["logits"], s["label"], classes, temperature) for name, s in scored.items()}
    inference |= {"temperature": temperature, "selected_by": SELECTED_BY[config.objective]}
    training_flags = config.to_dict() | {"phases": [dataclasses.asdict(p) for p in plan.phases]}
    model_id = save_artifact(config.output_uri, model, config.arch, classes, config.preprocess, config.head_hidden, config.dropout,
                             training_flags, inference, plan.lineage)
    summary = _summary(model_id, state, results, wall_s, skipped, plan.dropped)
    storage.write_json(storage.join(config.output_uri, "metrics.json"), summary)
    _show(config, classes, state, scored, temperature, results)
    print(f"model {model_id} (best epoch {state.best_epoch + 1}, by {SELECTED_BY[config.objective]}) written to {config.output_uri}")
    return summary


def _summary(model_id: str, state: TrainState, results: dict[str, Any], wall_s: float, skipped, dropped) -> dict[str, Any]:
    train_rates = [row["images_per_s"] for row in state.history]
    return {
        "model_id": model_id,
        "best_epoch": state.best_epoch + 1,
        "best_val_score": state.best_score,
        "epochs_run": state.epoch,
        "validation": results["validation"],  # chose the best epoch, the temperature and thresholds: optimistic
        "test": results.get("test"),  # never used for a decision: the number to quote
        "history": state.history,
        "train_images_per_s_mean": float(np.mean(train_rates)) if train_rates else None,
        "wall_time_s": wall_s,
        "skipped_images": skipped,
        "dropped_classes": dropped,
    }


def _show(config, classes: list[str], state: TrainState, scored: dict[str, dict[str, np.ndarray]], temperature: float,
          results: dict[str, Any]) -> None:
    """The pictures beside the artifact, and the report of the split to quote (test, else validation) on the terminal."""
    out = config.output_uri
    shown = "test" if "test" in results else "validation"
    if config.objective == "multilabel":
        write_multilabel_pictures(out, state.history, {n: (s["logits"], s["target"]) for n, s in scored.items()}, temperature,
                                  results[shown])
        print(multilabel.format_report(results[shown]))
    else:
        write_pictures(out, classes, state.history, {n: (s["logits"], s["label"]) for n, s in scored.items()}, temperature)
        print(metrics.format_report(results[shown]))
    for name, result in results.items():
        print(format_headline(name, result))


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


def write_multilabel_pictures(model_dir: str, history: list[dict], scored: dict[str, tuple[np.ndarray, np.ndarray]],
                              temperature: float, shown: dict[str, Any]) -> None:
    """A multi-label model's: per_character.csv (the shown split's report), curves.png, reliability.png."""
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
