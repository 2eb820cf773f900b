"""The training step and evaluation in plain PyTorch: they run on a CPU without Ray, and Ray Train's workers call them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import nn

from simpsons_ray.model.network import freeze_frozen_batchnorm
from simpsons_ray.model.preprocess import PreprocessConfig, normalize
from simpsons_ray.train.recipe import BatchMix, LrSchedule, WeightEma, flip_tta


def _autocast(device: torch.device):
    # bf16 needs no loss scaling, unlike fp16; on CPU autocast would only slow us down.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _to_input(images: torch.Tensor, device: torch.device, preprocess: PreprocessConfig) -> torch.Tensor:
    # Batches travel as uint8 NHWC (4x smaller than float) and are normalised on the
    # device that runs the model.
    x = normalize(images.to(device, non_blocking=True), preprocess)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _forward(model: nn.Module, x: torch.Tensor, tta_flip: bool) -> torch.Tensor:
    return flip_tta(model, x) if tta_flip else model(x)


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


@dataclass
class StepRecipe:
    """The recipe's per-step parts; with none of them, a step is plain Adam-style cross-entropy."""

    label_smoothing: float = 0.0
    mix: BatchMix | None = None
    ema: WeightEma | None = None
    schedule: LrSchedule | None = None
    epochs_done: int = 0  # in this phase, for the schedule's progress
    steps_per_epoch: int = 0


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    preprocess: PreprocessConfig,
    recipe: StepRecipe | None = None,
) -> EpochStats:
    """One pass over ``batches`` ({"image": uint8 NHWC, "label": int64}); BN of frozen stages stays frozen.

    Batches with a multi-hot ``target`` (composed frames) train a sigmoid per
    character with binary cross-entropy, summed over characters (label smoothing
    and batch mixing are softmax ingredients and do not apply).
    """
    recipe = recipe or StepRecipe()
    model.train()
    freeze_frozen_batchnorm(model)
    loss_fn = nn.CrossEntropyLoss(reduction="sum", label_smoothing=recipe.label_smoothing)
    binary_loss = nn.BCEWithLogitsLoss(reduction="sum")
    stats = EpochStats()
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        if recipe.schedule is not None:
            recipe.schedule.set_progress(recipe.epochs_done + step / max(recipe.steps_per_epoch, 1))
        x = _to_input(batch["image"], device, preprocess)
        y = batch["label"].to(device, non_blocking=True)
        target = y
        multi = "target" in batch
        if multi:
            target = batch["target"].to(device, non_blocking=True)
        elif recipe.mix is not None and recipe.mix.enabled:
            x, target = recipe.mix(x, y)  # soft targets, each row sums to 1
        with _autocast(device):
            logits = model(x)
            loss = binary_loss(logits.float(), target) if multi else loss_fn(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        (loss / len(y)).backward()
        optimizer.step()
        if recipe.ema is not None:
            recipe.ema.update_parameters(getattr(model, "module", model))  # unwrap DDP
        # .item() is a CPU-GPU sync point; once per step is cheap next to the step.
        stats.loss_sum += loss.item()
        if multi:
            stats.correct += int(((logits > 0) == (target > 0.5)).all(1).sum().item())  # the exact set, at 0.5
        else:
            truth = target.argmax(1) if target.ndim == 2 else y
            stats.correct += int((logits.argmax(1) == truth).sum().item())
        stats.count += len(y)
    stats.seconds = time.perf_counter() - start
    return stats


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    preprocess: PreprocessConfig,
    num_classes: int,
    tta_flip: bool = False,
) -> tuple[EpochStats, np.ndarray]:
    """Loss (plain cross-entropy, i.e. NLL), accuracy and confusion matrix over ``batches``.

    Composed frames (batches with a multi-hot ``target``) give the binary NLL and
    the exact-set accuracy at 0.5, and no confusion matrix.
    """
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    binary_loss = nn.BCEWithLogitsLoss(reduction="sum")
    stats = EpochStats()
    matrix = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for batch in batches:
        x = _to_input(batch["image"], device, preprocess)
        with _autocast(device):
            logits = _forward(model, x, tta_flip).float()
        if "target" in batch:
            target = batch["target"].to(device)
            stats.loss_sum += binary_loss(logits, target).item()
            stats.correct += int(((logits > 0) == (target > 0.5)).all(1).sum().item())
            stats.count += len(target)
            continue
        y = batch["label"].to(device)
        stats.loss_sum += loss_fn(logits, y).item()
        pred = logits.argmax(1)
        stats.correct += int((pred == y).sum().item())
        stats.count += len(y)
        matrix += torch.bincount((y * num_classes + pred).cpu(), minlength=num_classes * num_classes)
    return stats, matrix.view(num_classes, num_classes).numpy()


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    preprocess: PreprocessConfig,
    tta_flip: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(logits float32 [N, classes], labels int64 [N]) over ``batches``, for metrics and calibration.

    For composed frames (batches with ``target``) the second array is their multi-hot targets, float32 [N, classes].
    """
    model.eval()
    logits, labels = [], []
    multi = False
    for batch in batches:
        with _autocast(device):
            logits.append(_forward(model, _to_input(batch["image"], device, preprocess), tta_flip).float().cpu())
        multi = "target" in batch
        labels.append((batch["target"] if multi else batch["label"]).cpu())
    if not logits:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    truth = torch.cat(labels).numpy()
    return torch.cat(logits).numpy(), truth.astype(np.float32) if multi else truth.astype(np.int64)


class EarlyStopping:
    """Tracks the best validation loss; says when ``patience`` epochs brought no gain."""

    def __init__(self, patience: int, best: float = math.inf, bad_epochs: int = 0):
        self.patience, self.best, self.bad_epochs = patience, best, bad_epochs

    def step(self, val_loss: float) -> bool:
        """Record an epoch; True if it is the best so far."""
        if val_loss < self.best - 1e-6:
            self.best, self.bad_epochs = val_loss, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience
