"""``simpsons-ray evaluate``: a model artifact's metrics on a labelled set (either Kaggle layout)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from simpsons_ray import datasets, metrics, scoring, storage
from simpsons_ray.errors import UserError, storage_failure
from simpsons_ray.model import load_artifact, read_artifact_config
from simpsons_ray.preprocess import ImageDecodeError, load_resized
from simpsons_ray.training import predict_logits


@dataclass(frozen=True)
class EvaluateConfig:
    model_uri: str
    data_uri: str
    batch_size: int = 64
    as_json: bool = False


def _decode(uri: str, image_size: int) -> np.ndarray | None:
    """The image, or None when its bytes do not decode; storage that fails (after the S3 client's retries) stops the run."""
    try:
        data = storage.read_bytes(uri)
    except OSError as exc:
        raise storage_failure(uri, exc) from None
    try:
        return load_resized(data, image_size)
    except ImageDecodeError:
        return None


def evaluate_model(config: EvaluateConfig) -> dict[str, Any]:
    """Print the per-class report (and a final JSON line with --json); return the metrics.

    The model runs as it was trained to be used: its fitted temperature and, if it
    was trained with it, flip test-time augmentation. Characters of the set that the
    model does not know are named and left out of every number.
    """
    read_artifact_config(config.model_uri)  # a wrong --model fails before the data is listed
    images = datasets.list_labelled_images(config.data_uri)
    artifact = load_artifact(config.model_uri)
    index = {name: i for i, name in enumerate(artifact.classes)}
    unknown = sorted(set(images["label"]) - set(index))
    known = images[images["label"].isin(list(index))].reset_index(drop=True)
    if known.empty:
        raise UserError(
            f"None of the characters under {config.data_uri} are known to the model "
            f"({', '.join(artifact.classes[:5])}...): check --data and --model."
        )
    size = artifact.preprocess.image_size
    skipped: list[str] = []

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        # Threads overlap S3 reads and PIL decodes (both release the GIL).
        with ThreadPoolExecutor(max_workers=8) as pool:
            for start in range(0, len(known), config.batch_size):
                chunk = known.iloc[start : start + config.batch_size]
                decoded = list(pool.map(lambda u: _decode(u, size), chunk["uri"]))
                keep = [i for i, img in enumerate(decoded) if img is not None]
                skipped.extend(chunk["uri"].iloc[i] for i, img in enumerate(decoded) if img is None)
                if keep:
                    yield {
                        "image": torch.from_numpy(np.stack([decoded[i] for i in keep])),
                        "label": torch.tensor([index[chunk["label"].iloc[i]] for i in keep], dtype=torch.int64),
                    }

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    artifact.model.to(device)
    logits, labels = predict_logits(artifact.model, batches(), device, artifact.preprocess, artifact.tta_flip)
    result = scoring.score(logits, labels, artifact.classes, artifact.temperature)
    result |= {"model_id": artifact.model_id, "skipped_images": len(skipped), "unknown_characters": unknown,
               "unscored_images": len(images) - len(known)}
    print(metrics.format_report(result))
    print(scoring.format_headline("scored", result))
    if unknown:
        print(f"not scored: {len(images) - len(known)} images of {len(unknown)} character(s) the model does not know: "
              f"{', '.join(unknown)}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable images, e.g. {skipped[0]}")
    if config.as_json:
        print(json.dumps({k: v for k, v in result.items()}, separators=(",", ":")))
    return result
