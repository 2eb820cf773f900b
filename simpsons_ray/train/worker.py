"""The Ray Train worker: phases of epochs of train, validate, record, checkpoint; resumable on any number of workers.

The Ray-specific lines are few and marked ``# Ray:``; everything else calls the plain
PyTorch steps of :mod:`simpsons_ray.train.steps`.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from simpsons_ray.model.network import build_model, load_backbone_weights, set_trainable, trainable_parameters
from simpsons_ray.train.config import Phase, TrainConfig
from simpsons_ray.train.data import AugmentingCollate
from simpsons_ray.train.parent import load_parent_weights
from simpsons_ray.train.recipe import BatchMix, LrSchedule, WeightEma, make_optimizer
from simpsons_ray.train.selection import Validation, validate
from simpsons_ray.train.state import STATE_FILE, TrainState, cpu_state, newest_stored_state
from simpsons_ray.train.steps import EarlyStopping, EpochStats, StepRecipe, predict, train_one_epoch


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


def _gathered(scored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every worker's scored validation frames, joined in rank order (on one process: its own)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return scored
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, scored)
    keys = set().union(*(p.keys() for p in parts))
    return {k: np.concatenate([p[k] for p in parts if k in p and len(p[k])]) for k in keys
            if any(k in p and len(p[k]) for p in parts)}


def _global(stats: EpochStats) -> EpochStats:
    loss_sum, correct, count = _all_reduce([stats.loss_sum, stats.correct, stats.count])
    seconds = _all_reduce([stats.seconds])[0] / (dist.get_world_size() if dist.is_initialized() else 1)
    return EpochStats(loss_sum, int(correct), int(count), seconds)


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
        phases=loop_config["phases"],
        parent=loop_config.get("parent"),
    )
    worker.run(_restored_state(worker.config))


def _restored_state(config: TrainConfig) -> TrainState:
    """The latest checkpoint's state, or a fresh one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()  # Ray: the latest reported checkpoint, after a failure or a rerun
    if checkpoint is None:
        return newest_stored_state(config.output_uri) or TrainState(history=[])
    with checkpoint.as_directory() as directory:
        try:
            with open(os.path.join(directory, STATE_FILE), "rb") as f:
                return TrainState.from_bytes(f.read())
        except Exception:  # Ray's latest is cut short or corrupt: the newest readable one, named and warned about
            return newest_stored_state(config.output_uri) or TrainState(history=[])


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
    phases: list[Phase] = field(default_factory=list)  # the driver's plan_phases
    parent: dict[str, str] | None = None  # the --init-from model: its uri and model_id

    def run(self, state: TrainState) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        model = build_model(c.arch, self.num_classes, c.head_hidden, c.dropout)
        # A checkpoint holds every weight: the starting ones (ImageNet's, a file's, a parent model's) are read on a fresh start only.
        if state.model is not None:
            model.load_state_dict(state.model)
            self._say(f"resuming from epoch {state.epoch} (phase {state.phase_index + 1}, best val_score {state.best_score:.4f})")
        elif self.parent is not None:
            load_parent_weights(model, self.parent["uri"], self.parent["model_id"], c.arch)
        else:
            load_backbone_weights(model, c.arch, c.weights)
        model.to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model, self.state = model, state
        self.mix = BatchMix(self.num_classes, c.mixup_alpha, c.cutmix_alpha)
        self.augment_collate = AugmentingCollate(
            c.augment, self.num_classes if c.objective == "multilabel" else None, seed=c.seed * 1009 + self.rank, mix=c.mix
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
        stopper = EarlyStopping(c.patience, s.best_score if s.epoch_in_phase else -math.inf, s.bad_epochs)
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
        step = StepRecipe(c.label_smoothing, self.mix, parts.ema, parts.schedule, s.epoch_in_phase, self.steps_per_epoch,
                          whole_ce=c.whole_ce if c.objective == "multilabel" else 0.0)
        train_stats = _global(train_one_epoch(parts.ddp, batches, parts.optimizer, self.device, c.preprocess, step))
        val_stats = self._validate(parts.eval_model)
        row = self._record(parts, train_stats, val_stats, lr)
        phase_over = self._advance(parts)
        s.model = cpu_state(self.model)
        _report(s, row, self.rank)
        return phase_over

    def _validate(self, model: nn.Module) -> Validation:
        """Every worker scores its shard of validation; all of them then judge the whole of it alike."""
        _use_rank0_buffers(model)
        batches = self.val_shard.iter_torch_batches(batch_size=max(64, self.config.batch_size), prefetch_batches=2)
        scored = _gathered(predict(model, batches, self.device, self.config.preprocess, self.config.tta_flip))
        return validate(scored, self.config.objective, self.config.threshold_rule)

    def _record(self, parts: _PhaseParts, train_stats: EpochStats, val_stats: Validation, lr: float) -> dict[str, Any]:
        """Append the epoch to the history; keep the weights if validation's figure is the best so far."""
        s = self.state
        parts.schedule.end_epoch(val_stats.loss)
        improved = parts.stopper.step(val_stats.score)
        if val_stats.score > s.best_score + 1e-9:
            s.best_score, s.best_model, s.best_epoch = val_stats.score, cpu_state(parts.eval_model), s.epoch
        images_per_s = train_stats.count / max(train_stats.seconds, 1e-9)
        row = {
            "epoch": s.epoch + 1,
            "phase": parts.phase.name,
            "lr": lr,
            "train_loss": train_stats.loss,
            "train_accuracy": train_stats.accuracy,
            "val_loss": val_stats.loss,
            "val_accuracy": val_stats.accuracy,
            "val_score": val_stats.score,
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
            f"val_loss {val_stats.loss:.4f} val_acc {val_stats.accuracy:.4f} val_score {val_stats.score:.4f} lr {lr:.1e} "
            f"{images_per_s:,.0f} img/s" + (" *" if improved else "") + ("  early stop" if stop_early else "")
        )
        return row

    def _advance(self, parts: _PhaseParts) -> bool:
        """Keep the phase's optimizer state for a restart, or end the phase; True when it ended."""
        s = self.state
        if not parts.stopper.should_stop and s.epoch_in_phase < parts.phase.epochs:
            s.optimizer, s.scheduler = parts.optimizer.state_dict(), parts.schedule.state_dict()
            s.ema = cpu_state(parts.ema) if parts.ema is not None else None
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
    bucket_cap_mb = None if device.type == "cuda" else 1024
    return nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True, bucket_cap_mb=bucket_cap_mb)


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
