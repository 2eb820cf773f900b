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
    whole_ce: float = 0.0  # multi-label: weight of a softmax cross-entropy on whole pictures (batches with ``ce_label``)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    preprocess: PreprocessConfig,
    recipe: StepRecipe | None = None,
) -> EpochStats:
    """One pass over ``batches`` ({"image": uint8 NHWC, "label": int64}); BN of frozen stages stays frozen.

    Batches with a multi-hot ``target`` (a multi-label model's frames) train a
    sigmoid per character with binary cross-entropy, summed over characters and
    weighted by ``weight`` where the batch has one (what a whole picture does not
    say is weighted low: :mod:`simpsons_ray.train.mixing`); whole pictures also
    add a softmax cross-entropy on their ``ce_label`` (``recipe.whole_ce``). Batch
    mixing is a softmax ingredient and does not apply there.
    """
    recipe = recipe or StepRecipe()
    model.train()
    freeze_frozen_batchnorm(model)
    stats = EpochStats()
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        if recipe.schedule is not None:
            recipe.schedule.set_progress(recipe.epochs_done + step / max(recipe.steps_per_epoch, 1))
        x = _to_input(batch["image"], device, preprocess)
        y = batch["label"].to(device, non_blocking=True)
        mixed = None
        if "target" not in batch and recipe.mix is not None and recipe.mix.enabled:
            x, mixed = recipe.mix(x, y)  # soft targets, each row sums to 1
        with _autocast(device):
            logits = model(x)
        loss = _loss(logits.float(), batch, y, mixed, recipe, device)
        optimizer.zero_grad(set_to_none=True)
        (loss / len(y)).backward()
        optimizer.step()
        if recipe.ema is not None:
            recipe.ema.update_parameters(getattr(model, "module", model))  # unwrap DDP
        # .item() is a CPU-GPU sync point; once per step is cheap next to the step.
        stats.loss_sum += loss.item()
        stats.correct += _correct(logits, batch, y, mixed, device)
        stats.count += len(y)
    stats.seconds = time.perf_counter() - start
    return stats


def _loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], y: torch.Tensor, mixed: torch.Tensor | None,
          recipe: StepRecipe, device: torch.device) -> torch.Tensor:
    """The batch's summed loss: binary cross-entropy per character (weighted), plus the whole pictures' softmax; or the softmax."""
    if "target" not in batch:
        loss_fn = nn.CrossEntropyLoss(reduction="sum", label_smoothing=recipe.label_smoothing)
        return loss_fn(logits, mixed if mixed is not None else y)
    target = batch["target"].to(device, non_blocking=True)
    per_character = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if "weight" in batch:
        per_character = per_character * batch["weight"].to(device, non_blocking=True)
    loss = per_character.sum()
    if recipe.whole_ce > 0 and "ce_label" in batch:
        named = batch["ce_label"].to(device, non_blocking=True)
        if bool((named >= 0).any()):
            softmax = nn.CrossEntropyLoss(reduction="sum", label_smoothing=recipe.label_smoothing, ignore_index=-1)
            loss = loss + recipe.whole_ce * softmax(logits, named)
    return loss


def _correct(logits: torch.Tensor, batch: dict[str, torch.Tensor], y: torch.Tensor, mixed: torch.Tensor | None,
             device: torch.device) -> int:
    """Frames right: a softmax's top-1, or a sigmoid set equal to the target at 0.5 (a rough figure, for the progress line)."""
    if "target" in batch:
        target = batch["target"].to(device)
        return int(((logits > 0) == (target > 0.5)).all(1).sum().item())
    truth = mixed.argmax(1) if mixed is not None else y
    return int((logits.argmax(1) == truth).sum().item())


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
def predict(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    preprocess: PreprocessConfig,
    tta_flip: bool = False,
) -> dict[str, np.ndarray]:
    """``logits`` (float32 [N, classes]) of every frame of ``batches``, with the batches' other columns (label, target, kind)."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        with _autocast(device):
            logits = _forward(model, _to_input(batch["image"], device, preprocess), tta_flip).float().cpu()
        parts.setdefault("logits", []).append(logits.numpy())
        for key, value in batch.items():
            if key != "image":
                parts.setdefault(key, []).append(value.cpu().numpy())
    return {key: np.concatenate(values) for key, values in parts.items()}


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
    scored = predict(model, batches, device, preprocess, tta_flip)
    if "logits" not in scored:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    if "target" in scored:
        return scored["logits"], scored["target"].astype(np.float32)
    return scored["logits"], scored["label"].astype(np.int64)


class EarlyStopping:
    """Tracks the best validation figure (higher is better); says when ``patience`` epochs brought no gain."""

    def __init__(self, patience: int, best: float = -math.inf, bad_epochs: int = 0):
        self.patience, self.best, self.bad_epochs = patience, best, bad_epochs

    def step(self, score: float) -> bool:
        """Record an epoch's figure; True if it is the best so far."""
        if score > self.best + 1e-9:
            self.best, self.bad_epochs = score, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience
