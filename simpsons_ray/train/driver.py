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

This module is the driver: it checks the inputs, splits and decodes the data once on
Ray Data, runs the workers (:mod:`simpsons_ray.train.worker`) under Ray Train's
``TorchTrainer``, and writes the artifact (:mod:`simpsons_ray.train.results`).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import numpy as np

from simpsons_ray.core import cluster, console, storage
from simpsons_ray.core.errors import UserError
from simpsons_ray.model.network import build_model, set_trainable
from simpsons_ray.train import compose, datasets
from simpsons_ray.train.config import TrainConfig, check_choices, plan_phases, recorded_config
from simpsons_ray.train.data import decode_or_stop
from simpsons_ray.train.mixing import validation_frames
from simpsons_ray.train.results import write_artifact
from simpsons_ray.train.state import CHECKPOINT_RUN_NAME, STATE_FILE, TrainState, newest_stored_state
from simpsons_ray.train.worker import train_loop_per_worker


def _check_inputs(config: TrainConfig) -> None:
    if config.weights not in ("none", "imagenet") and not storage.exists(config.weights):
        raise UserError(f"--weights {config.weights} does not exist: give a state dict path or URI, 'imagenet' or 'none'.")
    check_choices(config)
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


def _split(config: TrainConfig) -> tuple[datasets.Split, dict[str, int]]:
    """List, filter, cap and split the labelled images; returns the split and the characters left out (or trained as strangers)."""
    everyone = datasets.list_labelled_images(config.data_uri)
    images, dropped = datasets.filter_classes(everyone, config.min_images_per_class)
    strangers = frozenset(dropped) if config.objective == "multilabel" and config.strangers else frozenset()
    if strangers:
        images = everyone
        print(f"{len(dropped)} character(s) with fewer than {config.min_images_per_class} images train as strangers, whom the "
              "model names as nobody: " + ", ".join(f"{k} ({v})" for k, v in dropped.items()))
    elif dropped:
        print(f"dropped {len(dropped)} character(s) with fewer than {config.min_images_per_class} images: "
              + ", ".join(f"{k} ({v})" for k, v in dropped.items()))
    images = datasets.cap_per_class(images, config.max_images_per_class, config.seed)
    if config.objective == "multilabel":
        images = _with_boxes(config, images)
    split = datasets.stratified_split(images, config.val_fraction, config.seed, config.test_fraction, strangers)
    if len(split.classes) < 2:
        raise UserError(f"Only one character ({split.classes[0]}) under {config.data_uri}: training needs at least two.")
    print(f"{len(split.train)} training, {len(split.val)} validation and {len(split.test)} test images "
          f"of {len(split.classes)} characters" + (f" and {len(strangers)} strangers" if strangers else ""))
    return split, dropped


def _with_boxes(config: TrainConfig, images):
    images = compose.attach_boxes(images, _boxes(config))
    boxed = int(np.isfinite(np.stack(images["box"].to_numpy())[:, 0]).sum())
    if boxed:
        print(f"{boxed} of {len(images)} pictures have a box: their characters are cut to it, and the rest of the "
              "picture is a background for composed frames")
    else:
        print("no boxes for these pictures (annotation.csv): whole pictures are pasted into composed frames, and frames "
              "with nobody are flat colours, unlike the show's; give --boxes for real backgrounds")
    return images


def _boxes(config: TrainConfig):
    """The training pictures' boxes: --boxes, else an annotation.csv beside --data; None without."""
    if config.boxes == "none":
        return None
    uri = config.boxes or compose.default_boxes_uri(config.data_uri)
    return compose.read_boxes(uri) if uri else None


def _held_out(config: TrainConfig, table, what: str, num_classes: int, seed: int) -> tuple[Any, list[dict[str, str]]]:
    """A validation or test split, decoded; a multi-label model's as its pictures and frames composed of them, fixed by the seed."""
    decoded, skipped = decode_or_stop(table, config.image_size, config.seed, what, config.data_uri, config.objective == "multilabel")
    if config.objective == "multilabel":
        decoded = decoded.map_batches(validation_frames, fn_kwargs={"num_classes": num_classes, "seed": seed},
                                      batch_size=64).materialize()
    return decoded, skipped


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
    train_ds, skipped_train = decode_or_stop(split.train, config.image_size, config.seed, "training", config.data_uri, multi)
    val_ds, skipped_val = _held_out(config, split.val, "validation", len(split.classes), config.seed)
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
    test_ds, skipped_test = _held_out(config, split.test, "test", len(split.classes), config.seed + 1) if len(split.test) else (None, [])
    return write_artifact(config, split.classes, state, val_ds, test_ds, skipped_train + skipped_val + skipped_test, dropped, wall)
