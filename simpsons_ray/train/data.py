"""Training's inputs on Ray Data: images decoded once into uint8 blocks, augmented per batch on the workers.

Bad files are flagged while decoding and listed, never fatal: one image that does
not decode does not stop a run. Storage that fails is another matter: a read that
still fails after the S3 client's retries is tried twice more, then the run stops
with one sentence (it never trains on less).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from simpsons_ray.core import storage
from simpsons_ray.core.errors import StorageError, first_line
from simpsons_ray.media.images import ImageDecodeError, decode_rgb
from simpsons_ray.model.preprocess import AugmentConfig, TrainAugment, load_resized, resize
from simpsons_ray.train import compose
from simpsons_ray.train.mixing import Mix, training_frames

# A read that still fails after the S3 client's own retries (~20 s) is tried again
# after these pauses; then the image is marked a storage failure and the run stops.
READ_RETRY_PAUSES_S = (1.0, 4.0)


def decode_batch(batch: dict[str, np.ndarray], image_size: int, cells: bool = False) -> dict[str, np.ndarray]:
    """Read and decode one batch of image URIs.

    Bytes that do not decode are flagged in ``error`` (skipped by training); a read
    the storage keeps refusing is flagged in ``storage_error``, and stops the run
    (``decode_or_stop``): never train on less because storage was away.

    With ``cells`` (multi-label training) ``whole`` is the picture, ``image`` its
    character cut to its ``box`` (the whole picture without one), with its
    ``aspect`` ratio, and ``background`` the part of the picture outside the box
    (``has_background``): what :mod:`simpsons_ray.train.mixing` makes frames of.
    A stranger's picture (label -1) is decoded the same way; a frame of nobody
    (``nobody``, label -1 too) is also a background, whole.
    """
    n = len(batch["uri"])
    images = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    wholes = np.zeros((n if cells else 0, image_size, image_size, 3), dtype=np.uint8)
    backgrounds = np.zeros((n if cells else 0, image_size, image_size, 3), dtype=np.uint8)
    aspects, has_background = np.ones(n, dtype=np.float32), np.zeros(n, dtype=bool)
    errors, storage_errors = [], []
    for i, uri in enumerate(batch["uri"]):
        data, why = _read(str(uri))
        storage_errors.append(why)
        if why:
            errors.append("")
            continue
        try:
            if cells:
                picture = decode_rgb(data)
                wholes[i] = resize(picture, image_size)
                images[i], aspects[i], background = compose.cut(picture, batch["box"][i], image_size)
                if "nobody" in batch and batch["nobody"][i]:
                    background = wholes[i]
                if background is not None:
                    backgrounds[i], has_background[i] = background, True
            else:
                images[i] = load_resized(data, image_size)
            errors.append("")
        except ImageDecodeError as exc:
            errors.append(str(exc) or type(exc).__name__)
    out: dict[str, np.ndarray] = {"image": images, "label": batch["label_index"].astype(np.int64), "uri": batch["uri"],
           "error": np.array(errors, dtype=object), "storage_error": np.array(storage_errors, dtype=object)}
    if cells:
        out |= {"whole": wholes, "aspect": aspects, "background": backgrounds, "has_background": has_background}
        if "nobody" in batch:
            out["nobody"] = np.asarray(batch["nobody"], dtype=bool)
    return out


def _read(uri: str) -> tuple[bytes, str]:
    """(bytes, "") or (b"", why the storage would not give them, after the retries)."""
    for pause in (*READ_RETRY_PAUSES_S, None):
        try:
            return storage.read_bytes(uri), ""
        except OSError as exc:
            if pause is None:
                return b"", first_line(exc)
            time.sleep(pause)
    raise AssertionError("unreachable")


class AugmentingCollate(NumpyBatchCollateFn):
    """Fresh random augmentation of every training batch, on every epoch.

    Ray Data calls it on the training worker, in the iterator's prefetch thread,
    so it overlaps the training step. As a ``map_batches`` stage it would need a
    Ray Data task, and with it a new worker process, at every start of the
    pipeline: 5-9 s before the first batch on a 2-core machine, more than a third
    of an epoch of the benchmark. Decoding, the expensive part, stays in Ray Data
    and is done once.


    With ``num_classes`` (multi-label training) the batch's pictures first become
    frames (whole, scenes of several, composed: :mod:`simpsons_ray.train.mixing`),
    which are then augmented; the batch gains their multi-hot ``target``, the
    loss ``weight`` of each character and the ``ce_label`` of whole pictures.
    """

    def __init__(self, augment: AugmentConfig, num_classes: int | None = None, seed: int = 0, mix: Mix | None = None):
        self._augment = TrainAugment(augment)
        self._num_classes = num_classes
        self._rng = np.random.default_rng(seed)
        self._mix = mix or Mix()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:  # type: ignore[override]  # Ray's CollatedData is any batch
        if self._num_classes is None:
            # Ray hands over read-only arrays; the labels are copied (a few bytes) so torch gets a writable one.
            return {"image": torch.from_numpy(self._augment.batch(batch["image"])), "label": torch.tensor(batch["label"])}
        frames = training_frames(batch, self._num_classes, self._rng, self._mix)
        return {"image": torch.from_numpy(self._augment.batch(frames.images)), "label": torch.tensor(batch["label"]),
                "target": torch.from_numpy(frames.targets), "weight": torch.from_numpy(frames.weights),
                "ce_label": torch.from_numpy(frames.ce_labels)}


def decoded_dataset(table: pd.DataFrame, image_size: int, seed: int, cells: bool = False):
    import ray.data

    # Shuffle the file list once (seeded) so that blocks mix characters; the
    # listing is sorted by folder, i.e. by class.
    columns = ["uri", "label_index"] + ([c for c in ("box", "nobody") if c in table] if cells else [])
    table = table.sample(frac=1.0, random_state=seed).reset_index(drop=True)[columns]
    records = table.to_dict("records")
    if cells:
        for r in records:
            r["box"] = np.asarray(r["box"], dtype=np.float64)
    num_blocks = max(4, math.ceil(len(table) / 256))
    return (
        ray.data.from_items(records, override_num_blocks=num_blocks)
        # Ray types the function as taking the batch alone; fn_kwargs passes the rest.
        .map_batches(decode_batch, fn_kwargs={"image_size": image_size, "cells": cells}, batch_size=64)  # type: ignore[arg-type]
        .materialize()  # decode once; every epoch re-reads these uint8 blocks
    )


def decode_or_stop(table: pd.DataFrame, image_size: int, seed: int, what: str, data_uri: str,
                   cells: bool = False) -> tuple[Any, list[dict[str, str]]]:
    """Decode a split's images once and drop those that do not decode; storage that kept failing stops the run."""
    from ray.data.expressions import col

    decoded = decoded_dataset(table, image_size, seed, cells)
    failed = decoded.filter(expr=col("storage_error") != "").select_columns(["uri", "storage_error"]).take_all()
    if failed:
        first = failed[0]
        raise StorageError(
            f"Could not read {len(failed)} of the {what} images under {data_uri} from storage, even after retries "
            f"(e.g. {first['uri']}: {str(first['storage_error']).rstrip('.')}): stopped rather than train on less; "
            "rerun once the storage answers."
        )
    return drop_unreadable(decoded, what)


def drop_unreadable(decoded, what: str) -> tuple[Any, list[dict[str, str]]]:
    from ray.data.expressions import col

    bad = decoded.filter(expr=col("error") != "").select_columns(["uri", "error"]).take_all()
    kept = [c for c in decoded.columns() if c not in ("uri", "error", "storage_error")]
    good = decoded.filter(expr=col("error") == "").select_columns(kept).materialize()
    skipped = [{"uri": str(r["uri"]), "error": str(r["error"])} for r in bad]
    if skipped:
        first = skipped[0]
        print(f"skipped {len(skipped)} unreadable {what} image(s), e.g. {first['uri']}: {first['error']}")
    return good, skipped
