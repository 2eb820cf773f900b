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
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import nn

from simpsons_ray import datasets, metrics, storage
from simpsons_ray.errors import UserError
from simpsons_ray.model import (
    build_model,
    freeze_frozen_batchnorm,
    load_backbone_weights,
    save_artifact,
    set_trainable,
    trainable_parameters,
)
from simpsons_ray.preprocess import AugmentConfig, ImageDecodeError, PreprocessConfig, TrainAugment, load_resized, normalize

log = logging.getLogger(__name__)

CHECKPOINT_RUN_NAME = "_train"  # OUTPUT/_train/: Ray Train's checkpoints and run record
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved in the artifact's config.json."""

    data_uri: str = ""
    output_uri: str = ""
    arch: str = "resnet50"
    weights: str = "imagenet"
    image_size: int = 224
    num_workers: int = 2
    use_gpu: bool = False
    batch_size: int = 32  # per worker
    frozen_epochs: int = 5
    finetune_epochs: int = 10
    lr: float = 1e-3
    finetune_lr: float = 1e-4
    unfreeze: tuple[str, ...] = ("layer4",)
    val_fraction: float = 0.2
    seed: int = 0
    min_images_per_class: int = 0
    max_images_per_class: int | None = None
    patience: int = 3  # epochs without a val-loss improvement before a phase stops
    lr_schedule: str = "plateau"  # or "cosine"; see make_scheduler
    lr_patience: int = 1  # flat epochs before ReduceLROnPlateau divides the LR
    lr_factor: float = 0.1
    max_failures: int = 2
    head_hidden: int = 512
    dropout: float = 0.5
    augment: AugmentConfig = AugmentConfig()

    # Settings that may change between a run and its resumption (where it runs,
    # not what it learns).
    RESUMABLE_CHANGES = ("num_workers", "use_gpu", "max_failures")

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


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    preprocess: PreprocessConfig,
) -> EpochStats:
    """One pass over ``batches`` ({"image": uint8 NHWC, "label": int64}); BN of frozen stages stays frozen."""
    model.train()
    freeze_frozen_batchnorm(model)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    stats = EpochStats()
    start = time.perf_counter()
    for batch in batches:
        x = _to_input(batch["image"], device, preprocess)
        y = batch["label"].to(device, non_blocking=True)
        with _autocast(device):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        (loss / len(y)).backward()
        optimizer.step()
        # .item() is a CPU-GPU sync point; once per step is cheap next to the step.
        stats.loss_sum += loss.item()
        stats.correct += int((logits.argmax(1) == y).sum().item())
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
) -> tuple[EpochStats, np.ndarray]:
    """Loss, accuracy and confusion matrix over ``batches``."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    stats = EpochStats()
    matrix = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for batch in batches:
        x = _to_input(batch["image"], device, preprocess)
        y = batch["label"].to(device)
        with _autocast(device):
            logits = model(x).float()
        stats.loss_sum += loss_fn(logits, y).item()
        pred = logits.argmax(1)
        stats.correct += int((pred == y).sum().item())
        stats.count += len(y)
        matrix += torch.bincount((y * num_classes + pred).cpu(), minlength=num_classes * num_classes)
    return stats, matrix.view(num_classes, num_classes).numpy()


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


LR_SCHEDULES = ("plateau", "cosine")


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, phase_epochs: int):
    """A phase's LR schedule, stepped once per epoch by ``step_scheduler``.

    "plateau" divides the LR by ``lr_factor`` after ``lr_patience`` epochs without a
    lower validation loss, so when it fires depends on one noisy epoch. "cosine"
    anneals from the phase's LR towards 0 over its epochs, the same LR at every epoch
    whatever validation does, so that two runs can be compared epoch for epoch.
    """
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=phase_epochs)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience)


def step_scheduler(scheduler, val_loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    else:
        scheduler.step()


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
    best_model: dict | None = None
    best_epoch: int = -1
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
    """The newest readable checkpoint under OUTPUT/_train/, or None.

    Ray Train registers a reported checkpoint only at its next poll of the
    workers (every 2 s), so a worker that dies right after reporting can restart
    with get_checkpoint() None although the checkpoint is already in storage.
    """
    root = storage.join(output_uri, CHECKPOINT_RUN_NAME)
    names = sorted((n for n, is_dir in storage.list_dir(root) if is_dir and n.startswith("checkpoint_")), reverse=True)
    for name in names:  # names carry their timestamp, so newest sorts first
        try:
            return TrainState.from_bytes(storage.read_bytes(storage.join(root, name, STATE_FILE)))
        except Exception:  # an upload cut short by the failure: try the one before
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

    config = TrainConfig.from_dict(loop_config["config"])
    num_classes = len(loop_config["classes"])
    torch.set_num_threads(loop_config["threads"])
    context = ray.train.get_context()  # Ray: who am I
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # Ray: this worker's GPU, or CPU
    preprocess = config.preprocess

    torch.manual_seed(config.seed)
    model = build_model(config.arch, num_classes, config.head_hidden, config.dropout)
    load_backbone_weights(model, config.arch, config.weights)
    state = TrainState(history=[])
    checkpoint = ray.train.get_checkpoint()  # Ray: the latest reported checkpoint, after a failure or a rerun
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            with open(os.path.join(directory, STATE_FILE), "rb") as f:
                state = TrainState.from_bytes(f.read())
    else:
        state = newest_stored_state(config.output_uri) or state
    if state.model is not None:
        model.load_state_dict(state.model)
        if rank == 0:
            _say(f"resuming from epoch {state.epoch} (phase {state.phase_index + 1}, best val_loss {state.best_loss:.4f})")
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    train_shard = ray.train.get_dataset_shard("train")  # Ray: this worker's shard
    augment_collate = AugmentingCollate(config.augment)
    val_shard = ray.train.get_dataset_shard("val")
    phases = plan_phases(config)
    total_epochs = sum(p.epochs for p in phases)

    while not state.done and state.phase_index < len(phases):
        phase = phases[state.phase_index]
        set_trainable(model, phase.trainable)
        params = trainable_parameters(model)
        optimizer = torch.optim.Adam(params, lr=phase.lr)
        scheduler = make_scheduler(optimizer, config, phase.epochs)
        if state.optimizer is not None and state.epoch_in_phase > 0:
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
        stopper = EarlyStopping(config.patience, state.best_loss if state.epoch_in_phase else math.inf, state.bad_epochs)
        # DDP only syncs the parameters that require grad when it wraps the model,
        # so it is wrapped again whenever a phase changes what trains.
        ddp = _distributed(model, device) if world_size > 1 else model

        while state.epoch_in_phase < phase.epochs:
            batches = train_shard.iter_torch_batches(
                batch_size=config.batch_size,
                local_shuffle_buffer_size=4 * config.batch_size,
                prefetch_batches=2,
                collate_fn=augment_collate,
            )
            train_stats = _global(train_one_epoch(ddp, batches, optimizer, device, preprocess))
            val_batches = val_shard.iter_torch_batches(batch_size=max(64, config.batch_size), prefetch_batches=2)
            _use_rank0_buffers(model)
            val_stats = _global(evaluate(model, val_batches, device, preprocess, num_classes)[0])

            lr = optimizer.param_groups[0]["lr"]
            step_scheduler(scheduler, val_stats.loss)
            improved = stopper.step(val_stats.loss)
            overall_improved = val_stats.loss < state.best_loss - 1e-6
            if overall_improved:
                state.best_loss, state.best_model, state.best_epoch = val_stats.loss, _cpu_state(model), state.epoch
            images_per_s = train_stats.count / max(train_stats.seconds, 1e-9)
            row = {
                "epoch": state.epoch + 1,
                "phase": phase.name,
                "lr": lr,
                "train_loss": train_stats.loss,
                "train_accuracy": train_stats.accuracy,
                "val_loss": val_stats.loss,
                "val_accuracy": val_stats.accuracy,
                "images_per_s": images_per_s,
                "train_images": train_stats.count,
            }
            state.history.append(row)
            state.epoch += 1
            state.epoch_in_phase += 1
            state.bad_epochs = stopper.bad_epochs
            stop_phase = stopper.should_stop and state.epoch_in_phase < phase.epochs
            if rank == 0:
                _say(
                    f"epoch {state.epoch:>3}/{total_epochs} [{phase.name}] train_loss {train_stats.loss:.4f} "
                    f"val_loss {val_stats.loss:.4f} val_acc {val_stats.accuracy:.4f} lr {lr:.1e} "
                    f"{images_per_s:,.0f} img/s" + (" *" if improved else "") + ("  early stop" if stop_phase else "")
                )
            if stop_phase:
                state.epoch_in_phase = phase.epochs
            phase_over = state.epoch_in_phase >= phase.epochs
            if phase_over:
                # The next phase starts from the best weights so far, not the last.
                state.phase_index += 1
                state.epoch_in_phase, state.optimizer, state.scheduler, state.bad_epochs = 0, None, None, 0
                state.done = state.phase_index >= len(phases)
                if state.best_model is not None:
                    model.load_state_dict(state.best_model)
            else:
                state.optimizer, state.scheduler = optimizer.state_dict(), scheduler.state_dict()
            state.model = _cpu_state(model)
            _report(state, row, rank)
            if phase_over:
                break


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


# --------------------------------------------------------------------- Ray Data inputs
def decode_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Read and decode one batch of image URIs; bad files are flagged, never fatal."""
    images = np.zeros((len(batch["uri"]), image_size, image_size, 3), dtype=np.uint8)
    errors = []
    for i, uri in enumerate(batch["uri"]):
        try:
            images[i] = load_resized(storage.read_bytes(str(uri)), image_size)
            errors.append("")
        except (ImageDecodeError, OSError) as exc:
            errors.append(str(exc) or type(exc).__name__)
    return {"image": images, "label": batch["label_index"].astype(np.int64), "uri": batch["uri"], "error": np.array(errors, dtype=object)}


class AugmentingCollate(NumpyBatchCollateFn):
    """Fresh random augmentation of every training batch, on every epoch.

    Ray Data calls it on the training worker, in the iterator's prefetch thread,
    so it overlaps the training step. As a ``map_batches`` stage it would need a
    Ray Data task, and with it a new worker process, at every start of the
    pipeline: 5-9 s before the first batch on a 2-core machine, more than a third
    of an epoch of the benchmark. Decoding, the expensive part, stays in Ray Data
    and is done once.
    """

    def __init__(self, augment: AugmentConfig):
        self._augment = TrainAugment(augment)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {"image": torch.from_numpy(self._augment.batch(batch["image"])), "label": torch.from_numpy(batch["label"])}


def _decoded_dataset(table: pd.DataFrame, image_size: int, seed: int):
    import ray.data

    # Shuffle the file list once (seeded) so that blocks mix characters; the
    # listing is sorted by folder, i.e. by class.
    table = table.sample(frac=1.0, random_state=seed).reset_index(drop=True)[["uri", "label_index"]]
    num_blocks = max(4, math.ceil(len(table) / 256))
    return (
        ray.data.from_items(table.to_dict("records"), override_num_blocks=num_blocks)
        .map_batches(decode_batch, fn_kwargs={"image_size": image_size}, batch_size=64)
        .materialize()  # decode once; every epoch re-reads these uint8 blocks
    )


def _drop_unreadable(decoded, what: str) -> tuple[Any, list[dict[str, str]]]:
    from ray.data.expressions import col

    bad = decoded.filter(expr=col("error") != "").select_columns(["uri", "error"]).take_all()
    good = decoded.filter(expr=col("error") == "").select_columns(["image", "label"]).materialize()
    skipped = [{"uri": str(r["uri"]), "error": str(r["error"])} for r in bad]
    if skipped:
        first = skipped[0]
        print(f"skipped {len(skipped)} unreadable {what} image(s), e.g. {first['uri']}: {first['error']}")
    return good, skipped


# --------------------------------------------------------------------------- driver
def _check_inputs(config: TrainConfig) -> None:
    if config.weights not in ("none", "imagenet") and not storage.exists(config.weights):
        raise UserError(f"--weights {config.weights} does not exist: give a state dict path or URI, 'imagenet' or 'none'.")
    if config.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"--lr-schedule {config.lr_schedule} is not one of {', '.join(LR_SCHEDULES)}.")
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
        # A record written before a setting existed ran with that setting's default.
        theirs = TrainConfig().to_dict() | storage.read_json(record_uri)
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


def _cpus_per_worker(config: TrainConfig) -> float:
    """Leave at least one CPU for Ray Data, or the input pipeline can never run."""
    import ray

    if config.use_gpu:
        return 1.0
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(0.25, min(1.0, (cpus - 1) / config.num_workers))


def train(config: TrainConfig) -> dict[str, Any]:
    """Train and write a complete model artifact to ``config.output_uri``; returns its metrics."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    _check_inputs(config)
    images = datasets.list_labelled_images(config.data_uri)
    images, dropped = datasets.filter_classes(images, config.min_images_per_class)
    if dropped:
        print(f"dropped {len(dropped)} character(s) with fewer than {config.min_images_per_class} images: "
              + ", ".join(f"{k} ({v})" for k, v in dropped.items()))
    images = datasets.cap_per_class(images, config.max_images_per_class, config.seed)
    split = datasets.stratified_split(images, config.val_fraction, config.seed)
    if len(split.classes) < 2:
        raise UserError(f"Only one character ({split.classes[0]}) under {config.data_uri}: training needs at least two.")
    print(f"{len(split.train)} training and {len(split.val)} validation images of {len(split.classes)} characters")

    if not ray.is_initialized():
        ray.init()
    _check_resume(config)
    train_ds, skipped_train = _drop_unreadable(_decoded_dataset(split.train, config.image_size, config.seed), "training")
    val_ds, skipped_val = _drop_unreadable(_decoded_dataset(split.val, config.image_size, config.seed), "validation")
    if train_ds.count() == 0:
        raise UserError(f"None of the training images under {config.data_uri} could be decoded.")
    epoch_train_ds = train_ds.randomize_block_order()  # augmented by AugmentingCollate on the workers

    cpus = _cpus_per_worker(config)
    fs, path = storage.resolve(config.output_uri)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "classes": split.classes, "threads": max(1, int(cpus))},
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
        datasets={"train": epoch_train_ds, "val": val_ds},
    )
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, STATE_FILE), "rb") as f:
            state = TrainState.from_bytes(f.read())
    return _write_artifact(config, split.classes, state, val_ds, skipped_train + skipped_val, dropped, wall)


def _write_artifact(config, classes, state: TrainState, val_ds, skipped, dropped, wall_s: float) -> dict[str, Any]:
    from simpsons_ray import plots

    model = build_model(config.arch, len(classes), config.head_hidden, config.dropout)
    model.load_state_dict(state.best_model if state.best_model is not None else state.model)
    batches = (
        {"image": torch.tensor(b["image"]), "label": torch.tensor(b["label"])}
        for b in val_ds.iter_batches(batch_size=128, batch_format="numpy")
    )
    _, matrix = evaluate(model, batches, torch.device("cpu"), config.preprocess, len(classes))
    final = metrics.report(matrix, classes)
    training_flags = config.to_dict() | {"phases": [dataclasses.asdict(p) for p in plan_phases(config)]}
    model_id = save_artifact(
        config.output_uri, model, config.arch, classes, config.preprocess, config.head_hidden, config.dropout, training_flags
    )
    train_rates = [row["images_per_s"] for row in state.history]
    summary = {
        "model_id": model_id,
        "best_epoch": state.best_epoch + 1,
        "epochs_run": state.epoch,
        "final": final,
        "history": state.history,
        "train_images_per_s_mean": float(np.mean(train_rates)) if train_rates else None,
        "wall_time_s": wall_s,
        "skipped_images": skipped,
        "dropped_classes": dropped,
    }
    out = config.output_uri
    storage.write_json(storage.join(out, "metrics.json"), summary)
    storage.write_bytes(storage.join(out, "confusion_matrix.csv"), metrics.matrix_csv(matrix, classes).encode())
    plots.confusion_matrix(matrix, classes, storage.join(out, "confusion_matrix.png"))
    plots.training_curves(state.history, storage.join(out, "curves.png"))
    print(metrics.format_report(final))
    print(f"model {model_id} (best epoch {state.best_epoch + 1}) written to {out}")
    return summary
