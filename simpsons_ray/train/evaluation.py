"""``simpsons-ray evaluate``: a model artifact's metrics on a labelled set (either Kaggle layout).

Two ways to score:

- on the pictures as they are (one character each): accuracy, macro-F1, confusion
  matrix and calibration of the top-1, for either objective (a multi-label model
  also says how often ``characters`` names the picture's character, alone); and
  on the pictures of characters the model does not know, how often it gives them
  a trained character's name (the false-name rate);
- ``--composites N``: on N frames composed from the pictures (0-3 characters each,
  cut to the boxes of the folder's ``annotation.csv`` where it has them, on real
  backgrounds; :mod:`simpsons_ray.train.compose`), whose characters are known: per-character
  precision/recall/F1, micro and macro F1, exact-set accuracy, "nobody" precision and
  recall, and the screen time of each character against the truth (each frame one
  second). A multi-label model names everyone above its thresholds; a single-label
  one names its top-1 (above ``--min-confidence`` when given).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError, storage_failure
from simpsons_ray.media.images import ImageDecodeError, decode_rgb
from simpsons_ray.model import metrics, multilabel
from simpsons_ray.model.artifact import load_artifact, read_artifact_config
from simpsons_ray.model.calibration import softmax
from simpsons_ray.model.preprocess import load_resized
from simpsons_ray.train import compose, datasets, scores
from simpsons_ray.train.steps import predict_logits


@dataclass(frozen=True)
class EvaluateConfig:
    model_uri: str
    data_uri: str
    batch_size: int = 64
    as_json: bool = False
    composites: int = 0  # > 0: score that many composed frames instead of the pictures
    seed: int = 0  # which pictures and frames the composites are
    boxes: str = ""  # annotation.csv; "": the one beside --data, if any; "none": whole pictures
    min_confidence: float | None = None  # composites: overrides the model's thresholds (its top-1 cut for a single-label model)


def _read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except OSError as exc:
        raise storage_failure(uri, exc) from None


def _decode(uri: str, image_size: int) -> np.ndarray | None:
    """The image, or None when its bytes do not decode; storage that fails (after the S3 client's retries) stops the run."""
    data = _read(uri)
    try:
        return load_resized(data, image_size)
    except ImageDecodeError:
        return None


def _known_images(config: EvaluateConfig, classes: list[str]):
    """The set's pictures of characters the model knows, those of characters it does not, and the latter's names."""
    images = datasets.list_labelled_images(config.data_uri)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(images["label"]) - set(index))
    known = images[images["label"].isin(list(index))].reset_index(drop=True)
    if known.empty:
        raise UserError(
            f"None of the characters under {config.data_uri} are known to the model "
            f"({', '.join(classes[:5])}...): check --data and --model."
        )
    strangers = images[~images["label"].isin(list(index))].reset_index(drop=True)
    return known, strangers, unknown


def evaluate_model(config: EvaluateConfig) -> dict[str, Any]:
    """Print the per-class report (and a final JSON line with --json); return the metrics.

    The model runs as it was trained to be used: its fitted temperature, thresholds
    and, if it was trained with it, flip test-time augmentation. Either objective is
    scored by the same figures: top-1 accuracy and macro-F1, the calibration of its
    top-1 score, and, on the pictures of characters it does not know, the share it
    gives a trained character's name (a softmax names one on every picture unless
    ``--min-confidence`` leaves it out).
    """
    _, classes = read_artifact_config(config.model_uri)  # a wrong --model fails before the data is listed
    if config.composites:
        return evaluate_composites(config)
    known, strangers, unknown = _known_images(config, classes)
    artifact = load_artifact(config.model_uri)
    artifact.model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    skipped: list[str] = []
    index = {name: i for i, name in enumerate(artifact.classes)}
    logits, labels = picture_logits(artifact, known["uri"].tolist(), [index[k] for k in known["label"]], config.batch_size, skipped)
    result = picture_figures(artifact, logits, labels, config.min_confidence)
    result |= {"model_id": artifact.model_id, "model_objective": artifact.objective, "skipped_images": len(skipped),
               "unknown_characters": unknown, "unknown_images": len(strangers)}
    if len(strangers):
        unknown_logits, _ = picture_logits(artifact, strangers["uri"].tolist(), [-1] * len(strangers), config.batch_size, skipped)
        result["false_name_rate"] = false_name_rate(artifact, unknown_logits, config.min_confidence)
    _print_pictures(result, skipped, config.as_json)
    return result


def picture_figures(artifact, logits: np.ndarray, labels: np.ndarray, min_confidence: float | None = None) -> dict[str, Any]:
    """Top-1 accuracy, macro-F1, per-class report, confusion matrix and top-1 calibration; a multi-label model's ``characters`` too."""
    if artifact.objective != "multilabel":
        return scores.score(logits, labels, artifact.classes, artifact.temperature)
    cut = np.full(len(artifact.classes), min_confidence) if min_confidence is not None else np.asarray(artifact.thresholds)
    return scores.picture_report(logits, labels, artifact.classes, artifact.temperature, cut)


def false_name_rate(artifact, logits: np.ndarray, min_confidence: float | None = None) -> float | None:
    """The share of pictures (of characters the model does not know) on which it names a character it knows."""
    if not len(logits):
        return None
    if artifact.objective == "multilabel":
        cut = min_confidence if min_confidence is not None else np.asarray(artifact.thresholds)
        return float(multilabel.predicted_sets(multilabel.sigmoid(logits, artifact.temperature), cut).any(axis=1).mean())
    top = softmax(logits, artifact.temperature).max(axis=1)
    return float((top >= (min_confidence or 0.0)).mean())


def picture_logits(artifact, uris: list[str], labels: list[int], batch_size: int, skipped: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The model's logits on these pictures (those that decode), with their labels; the others' uris go to ``skipped``."""
    size = artifact.preprocess.image_size

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        # Threads overlap S3 reads and PIL decodes (both release the GIL).
        with ThreadPoolExecutor(max_workers=8) as pool:
            for start in range(0, len(uris), batch_size):
                decoded = list(pool.map(lambda u: _decode(u, size), uris[start : start + batch_size]))
                keep = [i for i, img in enumerate(decoded) if img is not None]
                skipped.extend(uris[start + i] for i, img in enumerate(decoded) if img is None)
                if keep:
                    yield {"image": torch.from_numpy(np.stack([img for img in decoded if img is not None])),
                           "label": torch.tensor([labels[start + i] for i in keep], dtype=torch.int64)}

    device = next(artifact.model.parameters()).device
    return predict_logits(artifact.model, batches(), device, artifact.preprocess, artifact.tta_flip)


def _print_pictures(result: dict[str, Any], skipped: list[str], as_json: bool) -> None:
    print(metrics.format_report(result))
    print(scores.format_headline("scored", result))
    if result.get("model_objective") == "multilabel":
        print(f"characters: the picture's own named {result['named_recall']:.4f} of the time, it alone {result['named_exactly']:.4f}, "
              f"nobody {result['named_nobody']:.4f}")
    if result["unknown_characters"]:
        rate = result.get("false_name_rate")
        print(f"{result['unknown_images']} images of {len(result['unknown_characters'])} character(s) the model does not know "
              f"({', '.join(result['unknown_characters'])}): given a trained character's name on "
              + (f"{rate:.4f} of them (false-name rate)" if rate is not None else "none that decode"))
    if skipped:
        print(f"skipped {len(skipped)} unreadable images, e.g. {skipped[0]}")
    if as_json:
        print(json.dumps(result, separators=(",", ":")))


def composite_frames(known, classes: list[str], count: int, image_size: int, seed: int, boxes,
                     skipped: list[str] | None = None) -> compose.Composite:
    """``count`` frames of 0-3 characters composed from the pictures of ``known`` (uri, label), seeded.

    At most ``2 * count`` pictures are read (a seeded sample), enough for the
    1.5 characters a frame holds on average. Pictures that do not decode are left
    out, and their uris go to ``skipped``, so that the caller says how many.
    """
    rng = np.random.default_rng(seed)
    if len(known) > 2 * count:
        known = known.iloc[np.sort(rng.choice(len(known), 2 * count, replace=False))].reset_index(drop=True)
    known = compose.attach_boxes(known, boxes)
    index = {name: i for i, name in enumerate(classes)}

    def cut(row) -> tuple | None:
        try:
            return compose.cut(decode_rgb(_read(row.uri)), row.box, image_size) + (index[row.label],)
        except ImageDecodeError:
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        cut_out = list(pool.map(cut, known.itertuples(index=False)))
    if skipped is not None:
        skipped.extend(uri for uri, piece in zip(known["uri"], cut_out) if piece is None)
    pieces = [p for p in cut_out if p is not None]
    if not pieces:
        raise UserError("None of the pictures could be decoded: nothing to compose frames from.")
    cells = np.stack([p[0] for p in pieces])
    aspects = np.array([p[1] for p in pieces], dtype=np.float32)
    found = [p[2] for p in pieces if p[2] is not None]
    labels = np.array([p[3] for p in pieces], dtype=np.int64)
    backgrounds = np.stack(found) if found else np.zeros((0, image_size, image_size, 3), np.uint8)
    return compose.compose(cells, aspects, labels, backgrounds, len(classes), rng, count, compose.EVAL_COUNT_WEIGHTS)


def composite_scores(artifact, composite: compose.Composite, batch_size: int = 64) -> np.ndarray:
    """The model's per-character probabilities on composed frames, as it labels: sigmoid or softmax of logits / T."""
    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(composite.images), batch_size):
            stop = start + batch_size
            yield {"image": torch.from_numpy(composite.images[start:stop]), "target": torch.from_numpy(composite.targets[start:stop])}

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    artifact.model.to(device)
    logits, _ = predict_logits(artifact.model, batches(), device, artifact.preprocess, artifact.tta_flip)
    if artifact.objective == "multilabel":
        return multilabel.sigmoid(logits, artifact.temperature)
    return softmax(logits, artifact.temperature)


def composite_sets(artifact, scores: np.ndarray, min_confidence: float | None = None) -> np.ndarray:
    """Who the model says is on each frame: above its thresholds (multi-label), or its top-1 (single)."""
    if artifact.objective == "multilabel":
        cut = min_confidence if min_confidence is not None else np.asarray(artifact.thresholds)
        return multilabel.predicted_sets(scores, cut)
    return multilabel.top1_sets(scores, min_confidence or 0.0)


def evaluate_composites(config: EvaluateConfig) -> dict[str, Any]:
    """``evaluate --composites N``: set metrics and screen-time error on N composed frames of known characters."""
    artifact = load_artifact(config.model_uri)
    known, _, unknown = _known_images(config, artifact.classes)
    boxes_uri = None if config.boxes == "none" else (config.boxes or compose.default_boxes_uri(config.data_uri))
    boxes = compose.read_boxes(boxes_uri) if boxes_uri else None
    skipped: list[str] = []
    composite = composite_frames(known[["uri", "label"]], artifact.classes, config.composites, artifact.preprocess.image_size,
                                 config.seed, boxes, skipped)
    scores = composite_scores(artifact, composite, config.batch_size)
    sets = composite_sets(artifact, scores, config.min_confidence)
    result = multilabel.report(sets, composite.targets, artifact.classes)
    result |= {"model_id": artifact.model_id, "model_objective": artifact.objective, "seed": config.seed,
               "boxes": boxes_uri or "none", "unknown_characters": unknown, "skipped_images": len(skipped)}
    print(multilabel.format_report(result))
    print(f"{config.composites} composed frames from {len(known)} pictures ({'boxes: ' + boxes_uri if boxes_uri else 'no boxes'}), "
          f"seed {config.seed}; {artifact.objective} model {artifact.model_id}")
    if unknown:
        print(f"not used: {len(unknown)} character(s) the model does not know: {', '.join(unknown)}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable images, e.g. {skipped[0]}")
    if config.as_json:
        print(json.dumps(result, separators=(",", ":")))
    return result
