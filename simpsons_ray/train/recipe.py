"""Training recipes: the optimizer, LR schedule, loss, batch mixing and weight averaging a run uses.

Two named recipes set every knob at once (``--recipe``); each knob also has its own
flag, so that one ingredient can be switched off and measured (``bench/bench_recipe.py``):

- ``notebook``: the original Keras notebook's (Adam, the LR divided by 10 after a flat
  validation epoch, rotation/shift/zoom/flip augmentation, plain cross-entropy).
- ``default``: AdamW with decoupled weight decay, a linear warm-up then a per-step
  cosine, label smoothing and torchvision's plain linear head. Only what measured
  better on the real Kaggle frames is in it; the other ingredients (TrivialAugmentWide
  or RandAugment, random erasing, mixup/cutmix, an exponential moving average of the
  weights, horizontal-flip test-time augmentation, SGD) are a flag away, and
  bench/RESULTS.md gives what each did.

Everything here is plain PyTorch and runs without Ray.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("plateau", "cosine")

# What ``--recipe`` changes from the default recipe (whose values are TrainConfig's defaults,
# chosen on the validation split of the real Kaggle frames: bench/RESULTS.md, "Recipe").
# EMA, flip TTA, TrivialAugmentWide, a smaller batch and a higher LR measured no better
# there, so they stay off; each has its flag.
RECIPE_OVERRIDES: dict[str, dict[str, Any]] = {
    # The original Keras notebook's.
    "notebook": {
        "optimizer": "adam",
        "lr": 1e-3,
        "finetune_lr": 1e-4,
        "weight_decay": 0.0,
        "lr_schedule": "plateau",
        "warmup_epochs": 0.0,
        "label_smoothing": 0.0,
        "head_hidden": 512,  # the notebook's Dense(512) + Dropout(0.5) head
        "dropout": 0.5,
    },
}


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam (L2 folded into the gradient, as Keras did), AdamW (decoupled decay) or SGD with Nesterov momentum.

    AdamW and SGD put no decay on BatchNorm scales and biases (1-D tensors), as timm's
    and torchvision's recipes do: shrinking them only fights the normalisation.
    """
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if name == "sgd":
        # torchvision's ResNet recipe: momentum 0.9 (here Nesterov's, as timm's default).
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def cosine_lr(base_lr: float, progress: float, total: float, warmup: float) -> float:
    """The LR after ``progress`` of ``total`` epochs: linear warm-up over ``warmup`` epochs, then cosine to 0."""
    if warmup > 0 and progress < warmup:
        return base_lr * max(progress, 1e-3 * warmup) / warmup
    span = max(total - warmup, 1e-9)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(max(progress - warmup, 0.0) / span, 1.0)))


class LrSchedule:
    """A phase's LR: "cosine" is set before every step; "plateau" divides it after flat validation epochs.

    "plateau" (the notebook's) divides the LR by ``factor`` after ``patience`` epochs
    without a lower validation loss, so when it fires depends on one noisy epoch.
    "cosine" follows :func:`cosine_lr` step by step, the same LR at every point of
    every run whatever validation does, so two runs can be compared epoch for epoch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, base_lr: float, epochs: int,
                 warmup_epochs: float = 0.0, patience: int = 1, factor: float = 0.1):
        if kind not in LR_SCHEDULES:
            raise ValueError(f"unknown LR schedule {kind!r}")
        self.optimizer, self.kind, self.base_lr, self.epochs, self.warmup = optimizer, kind, base_lr, epochs, warmup_epochs
        self.plateau = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience)
            if kind == "plateau" else None
        )
        self.set_progress(0.0)

    def set_progress(self, epochs_done: float) -> None:
        """Called before each step with the fractional epochs done in this phase."""
        if self.kind == "cosine":
            lr = cosine_lr(self.base_lr, epochs_done, self.epochs, self.warmup)
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def end_epoch(self, val_loss: float) -> None:
        if self.plateau is not None:
            self.plateau.step(val_loss)

    def state_dict(self) -> dict:
        return self.plateau.state_dict() if self.plateau is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.plateau is not None and state:
            self.plateau.load_state_dict(state)


class BatchMix:
    """Mixup or CutMix (one of the two per batch) on a normalised NCHW batch; returns soft targets.

    torchvision's own ``v2.MixUp``/``v2.CutMix``; a batch without mixing still gets
    one-hot targets, so the loss has one form. Targets always sum to 1.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        from torchvision.transforms import v2

        ops = []
        if mixup_alpha > 0:
            ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.num_classes = num_classes
        self._mix = v2.RandomChoice(ops) if ops else None

    @property
    def enabled(self) -> bool:
        return self._mix is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mix is None or len(y) < 2:
            return x, nn.functional.one_hot(y, self.num_classes).to(x.dtype)
        return self._mix(x, y)


class WeightEma(AveragedModel):
    """An exponential moving average of the weights and BatchNorm statistics (torchvision's reference, with warm-up).

    The decay ramps up as ``(1 + n) / (10 + n)`` over the first updates (timm's and
    TF's warm-up), so that a short run's average is not dominated by its random
    initial weights: at 0.99 and ~60 steps an epoch, the average spans the last
    ~1.5 epochs once warm.
    """

    def __init__(self, model: nn.Module, decay: float):
        def ema(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor | int) -> torch.Tensor:
            d = torch.clamp(torch.as_tensor((1.0 + num_averaged) / (10.0 + num_averaged)), max=decay).to(averaged.dtype)
            return averaged * d + current * (1.0 - d)

        super().__init__(model, avg_fn=ema, use_buffers=True)
        self.decay = decay


def flip_tta(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits averaged over the image and its mirror (horizontal-flip test-time augmentation)."""
    return (model(x) + model(torch.flip(x, dims=[3]))) / 2
