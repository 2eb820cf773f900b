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
is skipped and phase 2 trains the whole network at ``--lr``. With ``--init-from MODEL``
the run starts from that model (:mod:`simpsons_ray.train.parent`), and phase 1 runs
only when the data adds characters to its head.

This module is the driver: it checks the inputs, splits and decodes the data once on
Ray Data, runs the workers (:mod:`simpsons_ray.train.worker`) under Ray Train's
``TorchTrainer``, and writes the artifact (:mod:`simpsons_ray.train.results`).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from simpsons_ray.core import cluster, console, storage
from simpsons_ray.core.errors import UserError
from simpsons_ray.model.network import build_model, set_trainable
from simpsons_ray.train.config import Phase, TrainConfig, check_choices, plan_phases, recorded_config
from simpsons_ray.train.data import decode_or_stop
from simpsons_ray.train.mixing import validation_frames
from simpsons_ray.train.parent import Parent, check_fits, lineage, read_parent
from simpsons_ray.train.results import RunPlan, write_artifact
from simpsons_ray.train.state import CHECKPOINT_RUN_NAME, STATE_FILE, TrainState, newest_stored_state
from simpsons_ray.train.training_set import TrainingSet, build_training_set
from simpsons_ray.train.worker import train_loop_per_worker


def _check_inputs(config: TrainConfig) -> Parent | None:
    """One sentence for a setting that cannot work, before any data is listed; the --init-from model, if any."""
    parent = read_parent(config.init_from) if config.init_from else None
    if parent is not None:
        check_fits(config, parent)
    elif config.weights not in ("none", "imagenet") and not storage.exists(config.weights):
        raise UserError(f"--weights {config.weights} does not exist: give a state dict path or URI, 'imagenet' or 'none'.")
    check_choices(config)
    if config.objective == "multilabel" and (config.mixup_alpha > 0 or config.cutmix_alpha > 0):
        raise UserError("--mixup-alpha and --cutmix-alpha mix softmax targets: use them with --objective single.")
    if not plan_phases(config, added_classes=True):  # the most phases a run can have: whether it adds characters is the data's
        raise UserError("Nothing to train: --frozen-epochs and --finetune-epochs are both 0.")
    # An unknown --arch or --unfreeze stage -> one sentence now, not on the workers.
    set_trainable(build_model(config.arch, 2), config.unfreeze)
    storage.check_writable(config.output_uri, "model artifact")
    return parent


def _check_resume(config: TrainConfig, parent: Parent | None) -> None:
    """Refuse to resume a run made with different settings, or from another --init-from model, into the same output."""
    record_uri = storage.join(config.output_uri, CHECKPOINT_RUN_NAME, "run.json")
    # The model's id too: checkpoints grown from one model must not resume under a lineage that names another.
    mine = config.to_dict() | ({"init_from_model_id": parent.model_id} if parent is not None else {})
    if storage.exists(record_uri):
        theirs = recorded_config(storage.read_json(record_uri))
        differ = sorted(
            k for k in set(mine) | set(theirs) if k not in TrainConfig.RESUMABLE_CHANGES and mine.get(k) != theirs.get(k)
        )
        if differ:
            raise UserError(
                f"{config.output_uri} holds a run with different settings ({', '.join(differ)}): "
                "rerun with the same flags to resume, or choose another --output."
            )
        # Said before any worker starts; checkpoints passed over as unreadable are named in a warning.
        stored = newest_stored_state(config.output_uri)
        print(f"resuming the run in {config.output_uri}"
              + (f" from its checkpoint after epoch {stored.epoch}" if stored is not None else ": no readable checkpoint, from the first epoch"))
    storage.write_json(record_uri, mine)


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


def _held_out(config: TrainConfig, table, what: str, num_classes: int, seed: int) -> tuple[Any, list[dict[str, str]]]:
    """A validation or test split, decoded; a multi-label model's as its pictures and frames composed of them, fixed by the seed."""
    decoded, skipped = decode_or_stop(table, config.image_size, config.seed, what, _roots(config), config.objective == "multilabel")
    if config.objective == "multilabel":
        decoded = decoded.map_batches(validation_frames, fn_kwargs={"num_classes": num_classes, "seed": seed},
                                      batch_size=64).materialize()
    return decoded, skipped


def _roots(config: TrainConfig) -> str:
    return ", ".join(config.data_uris)


def _phases(config: TrainConfig, training: TrainingSet) -> list[Phase]:
    phases = plan_phases(config, added_classes=bool(training.added))
    if not phases:
        raise UserError("Nothing to train: --finetune-epochs is 0, and an --init-from run trains --frozen-epochs only "
                        "when it adds characters.")
    return phases


def _epoch_of(line: str) -> int | None:
    """The epoch number of a worker's ``epoch   3/10 ...`` line, for the driver's progress bar."""
    match = re.match(r"epoch\s+(\d+)/", line)
    return int(match.group(1)) if match else None


def train(config: TrainConfig) -> dict[str, Any]:
    """Train and write a complete model artifact to ``config.output_uri``; returns its metrics."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    parent = _check_inputs(config)
    training = build_training_set(config, parent.classes if parent is not None else ())
    split, phases = training.split, _phases(config, training)
    _check_resume(config, parent)  # before Ray starts: a refused resume should not wait for a cluster
    if not ray.is_initialized():
        console.init_ray()
    multi = config.objective == "multilabel"
    train_ds, skipped_train = decode_or_stop(split.train, config.image_size, config.seed, "training", _roots(config), multi)
    val_ds, skipped_val = _held_out(config, split.val, "validation", len(split.classes), config.seed)
    train_images = train_ds.count()
    if train_images == 0:
        raise UserError(f"None of the training images under {_roots(config)} could be decoded.")
    epoch_train_ds = train_ds.randomize_block_order()  # augmented by AugmentingCollate on the workers

    cpus = _cpus_per_worker(config)
    fs, path = storage.resolve(config.output_uri)
    shown = console.WorkerLines("train", "epochs", sum(p.epochs for p in phases), progress=_epoch_of)
    start_from = {"uri": parent.uri, "model_id": parent.model_id} if parent is not None else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "classes": split.classes, "threads": max(1, int(cpus)),
                           "train_images": train_images, "progress": shown.queue, "phases": phases, "parent": start_from},
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
    test_ds, skipped_test = _held_out(config, split.test, "test", len(split.classes), config.seed + 1) if len(split.test) else (None, [])
    plan = RunPlan(split.classes, phases, training.dropped,
                lineage(parent, training.added, training.without_data) if parent is not None else [])
    return write_artifact(config, plan, state, val_ds, test_ds, skipped_train + skipped_val + skipped_test, wall)
