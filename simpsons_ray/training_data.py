"""Training's inputs on Ray Data: images decoded once into uint8 blocks, augmented per batch on the workers.

Bad files are flagged while decoding and listed, never fatal: one unreadable image
does not stop a run.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from simpsons_ray import storage
from simpsons_ray.preprocess import AugmentConfig, ImageDecodeError, TrainAugment, load_resized


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


def decoded_dataset(table: pd.DataFrame, image_size: int, seed: int):
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


def drop_unreadable(decoded, what: str) -> tuple[Any, list[dict[str, str]]]:
    from ray.data.expressions import col

    bad = decoded.filter(expr=col("error") != "").select_columns(["uri", "error"]).take_all()
    good = decoded.filter(expr=col("error") == "").select_columns(["image", "label"]).materialize()
    skipped = [{"uri": str(r["uri"]), "error": str(r["error"])} for r in bad]
    if skipped:
        first = skipped[0]
        print(f"skipped {len(skipped)} unreadable {what} image(s), e.g. {first['uri']}: {first['error']}")
    return good, skipped
