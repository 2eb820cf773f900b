"""Two-phase ResNet fine-tuning: small CPU-runnable steps, wrapped by Ray Train.

Run it (the same flags everywhere; see the README for the full list)::

    # laptop: local Ray, 2 CPU workers, generated or local data
    simpsons-ray train --data ./simpsons_dataset --output ./model --arch resnet18 \
        --image-size 64 --weights none --num-workers 2
    # one GPU box / a cluster (4 GPU workers, data and model in S3)
    ray job submit --working-dir . -- python jobs/train.py \
        --data s3://bucket/simpsons_dataset --output s3://bucket/models/r50 --num-workers 4 --gpu

Phase 1 trains the head on a frozen backbone (``--frozen-epochs`` at ``--lr``);
phase 2 also trains the ``--unfreeze`` stages (``--finetune-epochs`` at
``--finetune-lr``). With ``--weights none`` there is nothing to keep frozen: phase 1
is skipped and phase 2 trains the whole network at ``--lr``.

``train_one_epoch`` and ``evaluate`` are plain PyTorch; the Ray-specific lines are
in ``train_loop_per_worker`` (marked ``# Ray:``) and ``train``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from simpsons_ray import calibration, cluster, compose, console, datasets, metrics, multilabel, scoring, storage, training_data
from simpsons_ray.errors import UserError, storage_failure
from simpsons_ray.model import (
    build_model,
    freeze_frozen_batchnorm,
    load_backbone_weights,
    save_artifact,
    set_trainable,
    trainable_parameters,
)
from simpsons_ray.preprocess import AUGMENT_POLICIES, AugmentConfig, PreprocessConfig, normalize
from simpsons_ray.recipe import (
    LR_SCHEDULES,
    OPTIMIZERS,
    RECIPES,
    BatchMix,
    LrSchedule,
    WeightEma,
    flip_tta,
    make_optimizer,
)

log = logging.getLogger(__name__)

CHECKPOINT_RUN_NAME = "_train"  # OUTPUT/_train/: Ray Train's checkpoints and run record
STATE_FILE = "state.pt"


_DEFAULT = RECIPES["default"]

# "multilabel": a sigmoid per character, trained on composed frames of 0-3 characters
# (simpsons_ray.compose); "single": a softmax over characters, one per picture.
OBJECTIVES = ("multilabel", "single")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved in the artifact's config.json.

    The recipe knobs' defaults are the "default" recipe's; :meth:`for_recipe` gives
    another recipe's, with single knobs overridden on top.
    """

    data_uri: str = ""
    output_uri: str = ""
    objective: str = "multilabel"  # one of OBJECTIVES
    boxes: str = ""  # multilabel: annotation.csv; "": the one beside --data, if any; "none": no boxes
    arch: str = "resnet50"
    weights: str = "imagenet"
    image_size: int = 224
    num_workers: int = 2
    use_gpu: bool = False
    batch_size: int = 32  # per worker
    frozen_epochs: int = 5
    finetune_epochs: int = 10
    unfreeze: tuple[str, ...] = ("layer4",)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    min_images_per_class: int = 0
    max_images_per_class: int | None = None
    patience: int = 3  # epochs without a val-loss improvement before a phase stops
    max_failures: int = 2
    # The recipe (see simpsons_ray.recipe).
    recipe: str = "default"
    optimizer: str = _DEFAULT["optimizer"]
    lr: float = _DEFAULT["lr"]
    finetune_lr: float = _DEFAULT["finetune_lr"]
    weight_decay: float = _DEFAULT["weight_decay"]
    lr_schedule: str = _DEFAULT["lr_schedule"]
    warmup_epochs: float = _DEFAULT["warmup_epochs"]
    lr_patience: int = 1  # plateau: flat epochs before the LR is divided
    lr_factor: float = 0.1
    label_smoothing: float = _DEFAULT["label_smoothing"]
    head_hidden: int = _DEFAULT["head_hidden"]  # 0: a linear head
    dropout: float = _DEFAULT["dropout"]
    mixup_alpha: float = _DEFAULT["mixup_alpha"]
    cutmix_alpha: float = _DEFAULT["cutmix_alpha"]
    ema_decay: float = _DEFAULT["ema_decay"]
    tta_flip: bool = _DEFAULT["tta_flip"]
    augment: AugmentConfig = AugmentConfig(policy=_DEFAULT["augment_policy"], erasing=_DEFAULT["random_erasing"])

    # Settings that may change between a run and its resumption (where it runs,
    # not what it learns).
    RESUMABLE_CHANGES = ("num_workers", "use_gpu", "max_failures")

    @classmethod
    def for_recipe(cls, recipe: str = "default", **settings: Any) -> "TrainConfig":
        """``recipe``'s knobs, then ``settings`` on top (a None setting keeps the recipe's value).

        ``augment_policy`` and ``random_erasing`` go into ``augment``.
        """
        if recipe not in RECIPES:
            raise UserError(f"--recipe {recipe} is not one of {', '.join(RECIPES)}.")
        knobs = RECIPES[recipe] | {k: v for k, v in settings.items() if v is not None}
        augment = dataclasses.replace(
            knobs.pop("augment", AugmentConfig()), policy=knobs.pop("augment_policy"), erasing=knobs.pop("random_erasing")
        )
        return cls(recipe=recipe, augment=augment, **knobs)

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=self.image_size)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["unfreeze"] = list(self.unfreeze)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(data)
        data["unfreeze"] = tuple(data["unfreeze"])
        data["augment"] = AugmentConfig(**data["augment"])
        return cls(**data)


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    lr: float
    trainable: tuple[str, ...] | str  # stage names, or "all"


def plan_phases(config: TrainConfig) -> list[Phase]:
    """The phases a run goes through, skipping empty ones."""
    if config.weights == "none":
        phases = [Phase("full", config.finetune_epochs, config.lr, "all")]
    else:
        phases = [
            Phase("frozen", config.frozen_epochs, config.lr, ()),
            Phase("finetune", config.finetune_epochs, config.finetune_lr, tuple(config.unfreeze)),
        ]
    return [p for p in phases if p.epochs > 0]


# ---------------------------------------------------------------- plain PyTorch steps
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


# --------------------------------------------------------------------- checkpoint state
@dataclass
class TrainState:
    """What a checkpoint holds: enough to resume mid-run on any number of workers."""

    phase_index: int = 0
    epoch_in_phase: int = 0
    epoch: int = 0  # global epoch counter
    model: dict | None = None
    optimizer: dict | None = None
    scheduler: dict | None = None
    best_loss: float = math.inf
    bad_epochs: int = 0
    best_model: dict | None = None  # what validation scored: the weight average when there is one
    best_epoch: int = -1
    ema: dict | None = None  # the weight average mid-phase
    history: list | None = None
    done: bool = False

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(dataclasses.asdict(self), buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "TrainState":
        # weights_only: a checkpoint is data, never code.
        return cls(**torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


def newest_stored_state(output_uri: str) -> TrainState | None:
    """The newest readable checkpoint under OUTPUT/_train/; None only when there is none.

    Ray Train registers a reported checkpoint only at its next poll of the
    workers (every 2 s), so a worker that dies right after reporting can restart
    with get_checkpoint() None although the checkpoint is already in storage.

    A checkpoint cut short by the failure (its state file missing or truncated)
    is passed over for the one before. Storage that cannot be read is not "no
    checkpoint": it raises, and the run fails instead of starting over from
    nothing (a rerun resumes once the storage answers).
    """
    root = storage.join(output_uri, CHECKPOINT_RUN_NAME)
    try:
        names = sorted((n for n, is_dir in storage.list_dir(root) if is_dir and n.startswith("checkpoint_")), reverse=True)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise storage_failure(f"the checkpoints under {root}", exc) from None
    for name in names:  # names carry their timestamp, so newest sorts first
        uri = storage.join(root, name, STATE_FILE)
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:  # the upload of this checkpoint never finished
            continue
        except OSError as exc:
            raise storage_failure(uri, exc) from None
        try:
            return TrainState.from_bytes(data)
        except Exception:  # truncated or corrupt bytes: try the one before
            continue
    return None


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _all_reduce(values: list[float]) -> list[float]:
    """Sum across workers (a no-op on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def _use_rank0_buffers(model: nn.Module) -> None:
    """Rank 0's BatchNorm statistics on every worker, so that validation scores the model rank 0 saves.

    DDP copies rank 0's buffers to the others at the start of each forward, and each
    worker's own last batch then moves its running statistics a little further.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _global(stats: EpochStats) -> EpochStats:
    loss_sum, correct, count = _all_reduce([stats.loss_sum, stats.correct, stats.count])
    seconds = _all_reduce([stats.seconds])[0] / (dist.get_world_size() if dist.is_initialized() else 1)
    return EpochStats(loss_sum, int(correct), int(count), seconds)


# ------------------------------------------------------------------- the Ray Train loop
def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; resumes from the latest checkpoint if there is one."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(loop_config["threads"])
    context = ray.train.get_context()  # Ray: who am I
    worker = _Worker(
        config=TrainConfig.from_dict(loop_config["config"]),
        num_classes=len(loop_config["classes"]),
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),  # Ray: this worker's GPU, or CPU
        train_shard=ray.train.get_dataset_shard("train"),  # Ray: this worker's shard
        val_shard=ray.train.get_dataset_shard("val"),
        train_images=loop_config["train_images"],
        progress=loop_config.get("progress"),
    )
    worker.run(_restored_state(worker.config))


def _restored_state(config: TrainConfig) -> TrainState:
    """The latest checkpoint's state, or a fresh one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()  # Ray: the latest reported checkpoint, after a failure or a rerun
    if checkpoint is None:
        return newest_stored_state(config.output_uri) or TrainState(history=[])
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, STATE_FILE), "rb") as f:
            return TrainState.from_bytes(f.read())


@dataclass
class _PhaseParts:
    """What one phase trains with; rebuilt at every phase start, restored mid-phase from the checkpoint."""

    phase: Phase
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    stopper: EarlyStopping
    ddp: nn.Module  # the model as the training step sees it (DDP-wrapped on several workers)
    ema: WeightEma | None

    @property
    def eval_model(self) -> nn.Module:
        """What validation scores and the artifact keeps: the weight average when there is one."""
        return self.ema.module if self.ema is not None else getattr(self.ddp, "module", self.ddp)


@dataclass
class _Worker:
    """One Ray Train worker's run: phases of epochs of train, validate, record, checkpoint."""

    config: TrainConfig
    num_classes: int
    rank: int
    world_size: int
    device: torch.device
    train_shard: Any
    val_shard: Any
    train_images: int
    progress: Any = None  # a ray.util.queue.Queue the driver reads epoch lines from; None: none

    def run(self, state: TrainState) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        model = build_model(c.arch, self.num_classes, c.head_hidden, c.dropout)
        load_backbone_weights(model, c.arch, c.weights)
        if state.model is not None:
            model.load_state_dict(state.model)
            self._say(f"resuming from epoch {state.epoch} (phase {state.phase_index + 1}, best val_loss {state.best_loss:.4f})")
        model.to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model, self.state = model, state
        self.phases = plan_phases(c)
        self.mix = BatchMix(self.num_classes, c.mixup_alpha, c.cutmix_alpha)
        self.augment_collate = training_data.AugmentingCollate(
            c.augment, self.num_classes if c.objective == "multilabel" else None, seed=c.seed * 1009 + self.rank
        )
        # Each worker sees about 1/world of the training images per epoch.
        self.steps_per_epoch = max(1, math.ceil(self.train_images / (c.batch_size * self.world_size)))
        while not state.done and state.phase_index < len(self.phases):
            parts = self._start_phase(self.phases[state.phase_index])
            while not self._epoch(parts):
                pass

    def _start_phase(self, phase: Phase) -> _PhaseParts:
        c, s = self.config, self.state
        set_trainable(self.model, phase.trainable)
        optimizer = make_optimizer(trainable_parameters(self.model), c.optimizer, phase.lr, c.weight_decay)
        schedule = LrSchedule(optimizer, c.lr_schedule, phase.lr, phase.epochs, c.warmup_epochs, c.lr_patience, c.lr_factor)
        ema = WeightEma(self.model, c.ema_decay) if c.ema_decay > 0 else None
        if s.epoch_in_phase > 0:  # resuming mid-phase
            if s.optimizer is not None:
                optimizer.load_state_dict(s.optimizer)
                schedule.load_state_dict(s.scheduler or {})
            if ema is not None and s.ema is not None:
                ema.load_state_dict(s.ema)
        stopper = EarlyStopping(c.patience, s.best_loss if s.epoch_in_phase else math.inf, s.bad_epochs)
        # DDP only syncs the parameters that require grad when it wraps the model,
        # so it is wrapped again whenever a phase changes what trains.
        ddp = _distributed(self.model, self.device) if self.world_size > 1 else self.model
        return _PhaseParts(phase, optimizer, schedule, stopper, ddp, ema)

    def _epoch(self, parts: _PhaseParts) -> bool:
        """Train and validate one epoch, record it, checkpoint; True when the phase is over."""
        c, s = self.config, self.state
        parts.schedule.set_progress(s.epoch_in_phase)
        lr = parts.optimizer.param_groups[0]["lr"]
        batches = self.train_shard.iter_torch_batches(
            batch_size=c.batch_size, local_shuffle_buffer_size=4 * c.batch_size, prefetch_batches=2, collate_fn=self.augment_collate
        )
        step = StepRecipe(c.label_smoothing, self.mix, parts.ema, parts.schedule, s.epoch_in_phase, self.steps_per_epoch)
        train_stats = _global(train_one_epoch(parts.ddp, batches, parts.optimizer, self.device, c.preprocess, step))
        val_stats = self._validate(parts.eval_model)
        row = self._record(parts, train_stats, val_stats, lr)
        phase_over = self._advance(parts)
        s.model = _cpu_state(self.model)
        _report(s, row, self.rank)
        return phase_over

    def _validate(self, model: nn.Module) -> EpochStats:
        _use_rank0_buffers(model)
        batches = self.val_shard.iter_torch_batches(batch_size=max(64, self.config.batch_size), prefetch_batches=2)
        return _global(evaluate(model, batches, self.device, self.config.preprocess, self.num_classes, self.config.tta_flip)[0])

    def _record(self, parts: _PhaseParts, train_stats: EpochStats, val_stats: EpochStats, lr: float) -> dict[str, Any]:
        """Append the epoch to the history; keep the weights if validation is the best so far."""
        s = self.state
        parts.schedule.end_epoch(val_stats.loss)
        improved = parts.stopper.step(val_stats.loss)
        if val_stats.loss < s.best_loss - 1e-6:
            s.best_loss, s.best_model, s.best_epoch = val_stats.loss, _cpu_state(parts.eval_model), s.epoch
        images_per_s = train_stats.count / max(train_stats.seconds, 1e-9)
        row = {
            "epoch": s.epoch + 1,
            "phase": parts.phase.name,
            "lr": lr,
            "train_loss": train_stats.loss,
            "train_accuracy": train_stats.accuracy,
            "val_loss": val_stats.loss,
            "val_accuracy": val_stats.accuracy,
            "images_per_s": images_per_s,
            "train_images": train_stats.count,
        }
        s.history.append(row)
        s.epoch += 1
        s.epoch_in_phase += 1
        s.bad_epochs = parts.stopper.bad_epochs
        total = sum(p.epochs for p in self.phases)
        stop_early = parts.stopper.should_stop and s.epoch_in_phase < parts.phase.epochs
        self._say(
            f"epoch {s.epoch:>3}/{total} [{parts.phase.name}] train_loss {train_stats.loss:.4f} "
            f"val_loss {val_stats.loss:.4f} val_acc {val_stats.accuracy:.4f} lr {lr:.1e} "
            f"{images_per_s:,.0f} img/s" + (" *" if improved else "") + ("  early stop" if stop_early else "")
        )
        return row

    def _advance(self, parts: _PhaseParts) -> bool:
        """Keep the phase's optimizer state for a restart, or end the phase; True when it ended."""
        s = self.state
        if not parts.stopper.should_stop and s.epoch_in_phase < parts.phase.epochs:
            s.optimizer, s.scheduler = parts.optimizer.state_dict(), parts.schedule.state_dict()
            s.ema = _cpu_state(parts.ema) if parts.ema is not None else None
            return False
        # The next phase starts from the best weights so far, not the last.
        s.phase_index += 1
        s.epoch_in_phase, s.optimizer, s.scheduler, s.ema, s.bad_epochs = 0, None, None, None, 0
        s.done = s.phase_index >= len(self.phases)
        if s.best_model is not None:
            self.model.load_state_dict(s.best_model)
        return True

    def _say(self, line: str) -> None:
        if self.rank != 0:
            return
        _say(line)  # into this worker's log file (and the terminal with --verbose)
        if self.progress is not None:
            try:  # the driver shows it; losing a line must not stop training
                self.progress.put(line, timeout=5)
            except Exception:  # noqa: BLE001 - the queue's actor may be gone with a dying driver
                pass


def _distributed(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around ``model``, its gradients kept in the all-reduce buckets (one copy less per step)."""
    # On GPU, NCCL all-reduces each 25 MB bucket while backward goes on, so the default
    # stays. On CPU every core is already computing: there is nothing to overlap with,
    # and one bucket for the whole model (one gloo call per step, not ~3 for resnet18)
    # is faster. Measured on 2 cores, resnet18 at 64 px, batch 2 x 64, synthetic data:
    # two 1-thread DDP processes went from 0.89-0.94x to 0.97-1.0x of one 2-thread process
    # (in the whole `train` pipeline the gain is within the machine's run-to-run noise).
    buckets = {} if device.type == "cuda" else {"bucket_cap_mb": 1024}
    return nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True, **buckets)


def _say(line: str) -> None:
    # Not print(): Ray Train patches print on workers into a logger that the
    # driver then shows twice.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _report(state: TrainState, row: dict[str, Any], rank: int) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (Ray Train V2 contract)."""
    import ray.train

    metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))} | {"done": state.done}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, STATE_FILE), "wb") as f:
            f.write(state.to_bytes())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


# --------------------------------------------------------------------------- driver
def _check_inputs(config: TrainConfig) -> None:
    if config.weights not in ("none", "imagenet") and not storage.exists(config.weights):
        raise UserError(f"--weights {config.weights} does not exist: give a state dict path or URI, 'imagenet' or 'none'.")
    # argparse checks these for the CLI; callers of train() from Python get the same sentence.
    for flag, value, choices in (("--lr-schedule", config.lr_schedule, LR_SCHEDULES), ("--optimizer", config.optimizer, OPTIMIZERS),
                                 ("--augment", config.augment.policy, AUGMENT_POLICIES), ("--recipe", config.recipe, tuple(RECIPES))):
        if value not in choices:
            raise UserError(f"{flag} {value} is not one of {', '.join(choices)}.")
    if config.objective not in OBJECTIVES:
        raise UserError(f"--objective {config.objective} is not one of {', '.join(OBJECTIVES)}.")
    if config.objective == "multilabel" and (config.mixup_alpha > 0 or config.cutmix_alpha > 0):
        raise UserError("--mixup-alpha and --cutmix-alpha mix softmax targets: use them with --objective single.")
    if not plan_phases(config):
        raise UserError("Nothing to train: --frozen-epochs and --finetune-epochs are both 0.")
    # An unknown --arch or --unfreeze stage -> one sentence now, not on the workers.
    set_trainable(build_model(config.arch, 2), config.unfreeze)
    storage.check_writable(config.output_uri, "model artifact")


def _check_resume(config: TrainConfig) -> None:
    """Refuse to resume a run made with different settings into the same output."""
    record_uri = storage.join(config.output_uri, CHECKPOINT_RUN_NAME, "run.json")
    mine = config.to_dict()
    if storage.exists(record_uri):
        theirs = _recorded_config(storage.read_json(record_uri))
        differ = sorted(
            k for k in set(mine) | set(theirs) if k not in TrainConfig.RESUMABLE_CHANGES and mine.get(k) != theirs.get(k)
        )
        if differ:
            raise UserError(
                f"{config.output_uri} holds a run with different settings ({', '.join(differ)}): "
                "rerun with the same flags to resume, or choose another --output."
            )
        print(f"resuming the run in {config.output_uri}")
    storage.write_json(record_uri, mine)


def _recorded_config(record: dict[str, Any]) -> dict[str, Any]:
    """A run record as a full config: a setting it lacks ran with the default of its day.

    Records older than ``--recipe`` ran the notebook's recipe, without a test split.
    """
    legacy = "recipe" not in record
    base = TrainConfig.for_recipe("notebook", test_fraction=0.0) if legacy else TrainConfig.for_recipe(record["recipe"])
    # Records older than --objective trained a softmax.
    merged = base.to_dict() | {"objective": "single", "boxes": ""} | record
    merged["augment"] = base.to_dict()["augment"] | record.get("augment", {})
    return merged


def _cpus_per_worker(config: TrainConfig) -> float:
    """CPUs per training worker, from the nodes the workers will run on (those there are, or that the autoscaler may add).

    At most a node's CPUs less one, and at most the cluster's CPUs less one shared
    out, so that Ray Data's input pipeline always has a CPU. An autoscaling
    cluster is sized from its node types, not from the nodes it has at start-up
    (cluster.yaml starts with none).
    """
    if config.use_gpu:
        return 1.0
    node, total = cluster.node_cpus(), cluster.max_cpus()
    if node <= 0:  # no CPU anywhere, nor any the autoscaler could add: Ray Train will say so
        return 1.0
    return max(0.25, min(node - 1, (total - 1) / config.num_workers))


def _split(config: TrainConfig) -> tuple[datasets.Split, dict[str, int]]:
    """List, filter, cap and split the labelled images; returns the split and the dropped classes."""
    images = datasets.list_labelled_images(config.data_uri)
    images, dropped = datasets.filter_classes(images, config.min_images_per_class)
    if dropped:
        print(f"dropped {len(dropped)} character(s) with fewer than {config.min_images_per_class} images: "
              + ", ".join(f"{k} ({v})" for k, v in dropped.items()))
    images = datasets.cap_per_class(images, config.max_images_per_class, config.seed)
    if config.objective == "multilabel":
        images = compose.attach_boxes(images, _boxes(config))
        boxed = int(np.isfinite(np.stack(images["box"].to_numpy())[:, 0]).sum())
        if boxed:
            print(f"{boxed} of {len(images)} pictures have a box: their characters are cut to it, and the rest of the "
                  "picture is a background for composed frames")
        else:
            print("no boxes for these pictures (annotation.csv): whole pictures are pasted into composed frames, and frames "
                  "with nobody are flat colours, unlike the show's; give --boxes for real backgrounds")
    split = datasets.stratified_split(images, config.val_fraction, config.seed, config.test_fraction)
    if len(split.classes) < 2:
        raise UserError(f"Only one character ({split.classes[0]}) under {config.data_uri}: training needs at least two.")
    print(f"{len(split.train)} training, {len(split.val)} validation and {len(split.test)} test images "
          f"of {len(split.classes)} characters")
    return split, dropped


def _boxes(config: TrainConfig):
    """The training pictures' boxes: --boxes, else an annotation.csv beside --data; None without."""
    if config.boxes == "none":
        return None
    uri = config.boxes or compose.default_boxes_uri(config.data_uri)
    return compose.read_boxes(uri) if uri else None


def _composed(decoded, num_classes: int, seed: int):
    """A split's pictures as a fixed set of composed frames (image, multi-hot target): the same on every epoch and rerun."""
    return decoded.map_batches(
        compose.composed_eval_batch, fn_kwargs={"num_classes": num_classes, "seed": seed}, batch_size=64
    ).materialize()


def _epoch_of(line: str) -> int | None:
    """The epoch number of a worker's ``epoch   3/10 ...`` line, for the driver's progress bar."""
    match = re.match(r"epoch\s+(\d+)/", line)
    return int(match.group(1)) if match else None


def train(config: TrainConfig) -> dict[str, Any]:
    """Train and write a complete model artifact to ``config.output_uri``; returns its metrics."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    _check_inputs(config)
    split, dropped = _split(config)
    _check_resume(config)  # before Ray starts: a refused resume should not wait for a cluster
    if not ray.is_initialized():
        console.init_ray()
    multi = config.objective == "multilabel"
    train_ds, skipped_train = training_data.decode_or_stop(split.train, config.image_size, config.seed, "training", config.data_uri, multi)
    val_ds, skipped_val = training_data.decode_or_stop(split.val, config.image_size, config.seed, "validation", config.data_uri, multi)
    if multi:  # validation scores composed frames, as the model will see the show's
        val_ds = _composed(val_ds, len(split.classes), config.seed)
    train_images = train_ds.count()
    if train_images == 0:
        raise UserError(f"None of the training images under {config.data_uri} could be decoded.")
    epoch_train_ds = train_ds.randomize_block_order()  # augmented by AugmentingCollate on the workers

    cpus = _cpus_per_worker(config)
    fs, path = storage.resolve(config.output_uri)
    shown = console.WorkerLines("train", "epochs", sum(p.epochs for p in plan_phases(config)), progress=_epoch_of)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "classes": split.classes, "threads": max(1, int(cpus)),
                           "train_images": train_images, "progress": shown.queue},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": cpus, **({"GPU": 1} if config.use_gpu else {})}
        ),
        run_config=ray.train.RunConfig(
            name=CHECKPOINT_RUN_NAME,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        # The test split is not here: the workers never see it, so no decision can use it.
        datasets={"train": epoch_train_ds, "val": val_ds},
    )
    start = time.perf_counter()
    with shown:
        result = trainer.fit()
    wall = time.perf_counter() - start
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, STATE_FILE), "rb") as f:
            state = TrainState.from_bytes(f.read())
    # Decoded only now, once the model is final.
    test_ds, skipped_test = (
        training_data.decode_or_stop(split.test, config.image_size, config.seed, "test", config.data_uri, multi) if len(split.test) else (None, [])
    )
    if multi and test_ds is not None:
        test_ds = _composed(test_ds, len(split.classes), config.seed + 1)
    return _write_artifact(config, split.classes, state, val_ds, test_ds, skipped_train + skipped_val + skipped_test, dropped, wall)


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
    model.load_state_dict(state.best_model if state.best_model is not None else state.model)
    cpu = torch.device("cpu")
    scored = {"validation": predict_logits(model, scoring.ray_batches(val_ds), cpu, config.preprocess, config.tta_flip)}
    if test_ds is not None:
        scored["test"] = predict_logits(model, scoring.ray_batches(test_ds), cpu, config.preprocess, config.tta_flip)
    multi = config.objective == "multilabel"
    inference = {"tta_flip": config.tta_flip, "objective": config.objective}
    if multi:
        temperature, thresholds, results = multilabel_results(scored, classes)
        inference["thresholds"] = [float(t) for t in thresholds]
    else:
        temperature = calibration.fit_temperature(*scored["validation"])
        results = {name: scoring.score(logits, labels, classes, temperature) for name, (logits, labels) in scored.items()}
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
        scoring.write_multilabel_pictures(out, classes, state.history, scored, temperature, results[shown])
        print(multilabel.format_report(results[shown]))
        for name, result in results.items():
            print(multilabel.format_headline(name, result))
    else:
        scoring.write_pictures(out, classes, state.history, scored, temperature)
        print(metrics.format_report(results[shown]))
        for name, result in results.items():
            print(scoring.format_headline(name, result))
    print(f"model {model_id} (best epoch {state.best_epoch + 1}) written to {out}")
    return summary
