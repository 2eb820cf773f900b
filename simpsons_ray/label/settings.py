"""What shapes an episode's labels: the model (its weights' id, thresholds), top-k and how frames get their times.

Two runs whose settings agree write the same rows; each episode's marker keeps the
settings that shaped it, so a rerun with other settings is refused rather than mixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError
from simpsons_ray.label.config import LabelConfig
from simpsons_ray.label.episodes import VIDEO
from simpsons_ray.label.pooling import PoolSettings
from simpsons_ray.media.video import DEFAULT_SAMPLE_FPS
from simpsons_ray.model.artifact import WEIGHTS_FILE, weights_id

# Marker keys that older markers lack, with the value those runs used.
_LEGACY_SETTINGS: dict[str, Any] = {"first_frame_number": 0, "pooling": {"method": "none"}}


@dataclass(frozen=True)
class LabelSettings:
    """What makes two runs' labels the same; each marker keeps the part that shaped its episode."""

    model_id: str
    top_k: int
    min_confidence: float | None  # the score every character needs; None: a multi-label model's own thresholds
    fps: float | None = None  # frame dumps: timestamp_s = (frame - first_frame_number) / fps
    first_frame_number: int = 0
    sample_fps: float | None = DEFAULT_SAMPLE_FPS  # videos: frames kept per second; None: all
    thresholds: tuple[float, ...] | None = None  # a multi-label model's per-character thresholds, classes order
    multilabel: bool = False  # the model's objective (model_id already tells models apart: not kept in markers)
    pool: PoolSettings = field(default_factory=PoolSettings)  # how frame scores become the answer (pooling.py)

    def __post_init__(self) -> None:
        if self.min_confidence is None and self.thresholds is None:
            raise ValueError("LabelSettings needs min_confidence or a multi-label model's thresholds")

    def for_episode(self, kind: str) -> dict[str, Any]:
        """The settings that shape the labels of this kind of episode (a video has no --fps, a dump no sampling).

        The model's thresholds are kept only while they are the ones in use: model_id
        hashes the weights alone, and thresholds chosen again for the same weights
        change who is on screen. A given --min-confidence replaces them, so they
        shape nothing then, and a single-label model's markers stay as they were.
        """
        settings: dict[str, Any] = {"model_id": self.model_id, "top_k": self.top_k, "min_confidence": self.min_confidence,
                                    "pooling": self.pool.to_dict()}
        if self.min_confidence is None:
            settings["thresholds"] = list(self.thresholds or ())
        if kind == VIDEO:
            settings["sample_fps"] = self.sample_fps
        else:
            settings.update(fps=self.fps, first_frame_number=self.first_frame_number)
        return settings

    def differences(self, marker: dict[str, Any], kind: str) -> list[str]:
        return [
            f"{k} {marker.get(k, _LEGACY_SETTINGS.get(k))!r} (now {v!r})"
            for k, v in self.for_episode(kind).items()
            if marker.get(k, _LEGACY_SETTINGS.get(k)) != v
        ]

    def character_thresholds(self, num_classes: int) -> np.ndarray:
        """The score each character needs to be on screen, in classes order: --min-confidence when given, else the model's own.

        float64, so a float32 score is compared exactly, as a reader comparing
        it with the same number does.
        """
        if self.min_confidence is not None:
            return np.full(num_classes, self.min_confidence, np.float64)
        return np.asarray(self.thresholds, np.float64)

    def timestamps(self, frame: np.ndarray, container_s: np.ndarray) -> pa.Array:
        """timestamp_s: the container's time for video frames, else (frame - first) / fps, else null."""
        if self.fps:
            dump_s = (frame - self.first_frame_number) / self.fps
        else:
            dump_s = np.full(len(frame), np.nan)
        seconds = np.where(np.isnan(container_s), dump_s, container_s)
        return pa.array(seconds, pa.float64(), from_pandas=True)  # NaN -> null


def _thresholds(config: LabelConfig, model_config: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """LabelSettings' min_confidence and thresholds: a given --min-confidence, else the model's own.

    A single-label model keeps 0.0 (every top-1) as its default, the value markers
    written before multi-label models hold, so their episodes still count as done.
    """
    objective = model_config.get("objective", "single")  # model.Artifact.objective, read without loading the weights
    if objective not in ("single", "multilabel"):
        raise UserError(f"{config.model_uri} has objective {objective!r} in its config.json: "
                        "this version labels with \"single\" and \"multilabel\" models only.")
    if config.min_confidence is not None:
        return {"min_confidence": float(config.min_confidence)}
    if objective == "single":
        return {"min_confidence": 0.0}
    thresholds = model_config.get("thresholds")
    if (not isinstance(thresholds, list) or len(thresholds) != len(classes)
            or not all(isinstance(t, (int, float)) and 0.0 <= t <= 1.0 for t in thresholds)):
        raise UserError(
            f"{config.model_uri} is a multi-label model without a threshold between 0 and 1 for each of its {len(classes)} "
            "characters in its config.json: pass --min-confidence, or save the model with its thresholds."
        )
    return {"min_confidence": None, "thresholds": tuple(float(t) for t in thresholds)}


def _model_id(model_uri: str, model_config: dict[str, Any]) -> str:
    """The artifact's id of its weights; hashed from model.pt when an older config lacks it."""
    if model_config.get("model_id"):
        return str(model_config["model_id"])
    return _weights_id(model_uri, model_config)


def _weights_id(model_uri: str, model_config: dict[str, Any]) -> str:
    return weights_id(storage.read_bytes(storage.join(model_uri, WEIGHTS_FILE)), model_config["arch"])


def check_weights(model_uri: str, model_config: dict[str, Any], model_id: str) -> None:
    """Fail before any work when model.pt is not the weights config.json names (every row carries that id)."""
    actual = _weights_id(model_uri, model_config)
    if actual != model_id:
        raise UserError(
            f"{model_uri}/model.pt is {actual} but its config.json says {model_id}: "
            "the weights changed after the artifact was saved; save the model again."
        )


def settings_for(config: LabelConfig, model_config: dict[str, Any], classes: list[str]) -> LabelSettings:
    """The settings a labeling run with ``config`` writes its rows with, for this model."""
    return LabelSettings(
        model_id=_model_id(config.model_uri, model_config),
        top_k=min(config.top_k, len(classes)),
        fps=float(config.fps) if config.fps else None,
        first_frame_number=int(config.first_frame_number),
        sample_fps=float(config.sample_fps) if config.sample_fps else None,
        multilabel=model_config.get("objective", "single") == "multilabel",
        pool=PoolSettings(method=config.pool, window_s=float(config.pool_window_s)),
        **_thresholds(config, model_config, classes),
    )
