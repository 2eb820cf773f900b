"""A trained model on disk or S3, and loading it to run as it was trained.

A model artifact is a directory (local or ``s3://``)::

    model.pt                 state dict (loaded with weights_only=True: no code runs)
    config.json              arch, head sizes, preprocessing, how to run it (temperature, thresholds), training flags,
                             lineage (the models it was trained from, newest first)
    classes.json             class names in output order
    metrics.json, per_character.csv or confusion_matrix.csv/png, curves.png, reliability.png   (written by training)
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError
from simpsons_ray.model.network import build_model
from simpsons_ray.model.preprocess import PreprocessConfig

WEIGHTS_FILE = "model.pt"


CONFIG_FILE = "config.json"


CLASSES_FILE = "classes.json"


ARTIFACT_FORMAT = 1


def weights_id(state_bytes: bytes, arch: str) -> str:
    """A stable id of the weights: same bytes, same id, on any machine."""
    return f"{arch}-{hashlib.sha256(state_bytes).hexdigest()[:12]}"


def state_dict_bytes(model: nn.Module) -> bytes:
    module = getattr(model, "module", model)  # unwrap DDP
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buffer)
    return buffer.getvalue()


def save_artifact(
    model_dir: str,
    model: nn.Module | bytes,
    arch: str,
    classes: list[str],
    preprocess: PreprocessConfig,
    head_hidden: int = 512,
    dropout: float = 0.5,
    training: dict[str, Any] | None = None,
    inference: dict[str, Any] | None = None,
    lineage: list[dict[str, Any]] | None = None,
) -> str:
    """Write weights, config.json and classes.json; returns the model id.

    ``inference`` holds how the model is run: ``temperature`` (logits are divided by
    it before the softmax) and ``tta_flip`` (average over the mirror image).
    ``lineage`` is :attr:`Artifact.lineage`.
    """
    weights = model if isinstance(model, bytes) else state_dict_bytes(model)
    model_id = weights_id(weights, arch)
    config = {
        "format": ARTIFACT_FORMAT,
        "model_id": model_id,
        "arch": arch,
        "num_classes": len(classes),
        "head_hidden": head_hidden,
        "dropout": dropout,
        **preprocess.to_dict(),
        "temperature": 1.0,
        "tta_flip": False,
        **(inference or {}),
        "training": training or {},
        "lineage": lineage or [],
    }
    storage.write_bytes(storage.join(model_dir, WEIGHTS_FILE), weights)
    storage.write_json(storage.join(model_dir, CLASSES_FILE), list(classes))
    # config.json last: its presence marks a complete artifact.
    storage.write_json(storage.join(model_dir, CONFIG_FILE), config)
    return model_id


@dataclass
class Artifact:
    """A loaded model with everything needed to run it as it was trained."""

    model: nn.Module
    config: dict[str, Any]
    classes: list[str]
    model_id: str

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_model_config(self.config)

    @property
    def temperature(self) -> float:
        """Divide the logits by this before the softmax (1.0 for artifacts older than calibration)."""
        return float(self.config.get("temperature", 1.0))

    @property
    def tta_flip(self) -> bool:
        return bool(self.config.get("tta_flip", False))

    @property
    def objective(self) -> str:
        """"single" (softmax: one character per picture) or "multilabel" (a sigmoid per character); older artifacts are "single"."""
        return str(self.config.get("objective", "single"))

    @property
    def thresholds(self) -> list[float] | None:
        """A multi-label model's per-character thresholds (classes order), chosen on validation; None for "single"."""
        values = self.config.get("thresholds")
        return [float(v) for v in values] if values is not None else None

    @property
    def lineage(self) -> list[dict[str, Any]]:
        """The models this one was trained from (``train --init-from``), its parent first, then the parent's own.

        Each: ``model_id`` and ``model_uri`` of that model, the ``classes_added`` to its
        head, and its ``classes_without_data`` (kept in the head, with no picture in that
        run's data). Empty for a model trained from ImageNet or from scratch.
        """
        return list(self.config.get("lineage", []))


def read_artifact_config(model_dir: str, flag: str = "--model") -> tuple[dict[str, Any], list[str]]:
    """config.json and classes.json, with one clear error if ``model_dir`` isn't an artifact (``flag``: the flag that named it)."""
    hint = f"point {flag} at the --output directory of `simpsons-ray train`"
    if not storage.exists(model_dir):
        raise UserError(f"Model directory {model_dir} does not exist: {hint}.")
    missing = [f for f in (CONFIG_FILE, CLASSES_FILE, WEIGHTS_FILE) if not storage.is_file(storage.join(model_dir, f))]
    if missing:
        raise UserError(f"{model_dir} is not a simpsons-ray model (no {', '.join(missing)}): {hint}.")
    try:
        config = storage.read_json(storage.join(model_dir, CONFIG_FILE))
        classes = storage.read_json(storage.join(model_dir, CLASSES_FILE))
        needed = ("arch", "num_classes", "image_size", "mean", "std")
        absent = [k for k in needed if k not in config]
        if absent:
            raise ValueError(f"config.json lacks {', '.join(absent)}")
        if len(classes) != config["num_classes"]:
            raise ValueError(f"{len(classes)} classes in classes.json but num_classes={config['num_classes']}")
    except ValueError as exc:
        raise UserError(f"{model_dir} is not a valid simpsons-ray model: {exc}.") from None
    return config, classes


def load_artifact(model_dir: str, device: str | torch.device = "cpu") -> Artifact:
    """Load a model artifact for inference (eval mode). Never executes code from it."""
    config, classes = read_artifact_config(model_dir)
    weights = storage.read_bytes(storage.join(model_dir, WEIGHTS_FILE))
    model = build_model(config["arch"], config["num_classes"], config.get("head_hidden", 512), config.get("dropout", 0.5))
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:
        raise UserError(f"{model_dir}/{WEIGHTS_FILE} does not hold {config['arch']} weights: {exc}.") from None
    model.eval().to(device)
    return Artifact(model, config, list(classes), weights_id(weights, config["arch"]))
