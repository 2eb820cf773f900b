"""Multi-label benchmark: who is on screen in composed frames, a sigmoid per character against a softmax's top-1.

On the real Kaggle pictures of the 18 characters that have the dataset author's
boxes, the same split, image size and epochs for both arms:

(a) ``simpsons-ray train --objective multilabel``: frames of 0-3 characters composed on
    the fly (box crops on the backgrounds outside the boxes), a sigmoid per character,
    per-character thresholds chosen on validation frames;
(b) ``simpsons-ray train --objective single``: the softmax on single pictures, read
    as its top-1, and as its top-1 above one probability cut chosen on validation
    frames (the cut of best macro-F1).

Both are scored on frames composed from the pictures of the training run's test split
(held out: no training, early stopping, threshold or temperature saw them) that
have a box, 0-3 characters per frame, uniform. The single model's cut is chosen on
frames composed, the same way, from the validation split. Prints, per arm: macro and
micro F1, exact-set accuracy, "nobody" precision and recall, the mean relative
screen-time error, the training images/s (mean over epochs), and per character the
true and predicted screen time of both.

    python bench/bench_multilabel.py                  # ../shared/data/simpsons-kaggle, the issue's setting
    python bench/bench_multilabel.py --quick          # smoke run: 4 characters, 32 px, 2 epochs

The issue's setting: resnet18 at 64 px from scratch (``--weights none``), 12 epochs,
2 CPU workers, every boxed picture and 60 others per character (7,800 pictures),
2,400 test frames. On a 2-core machine each arm takes ~20 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simpsons_ray.model import multilabel  # noqa: E402
from simpsons_ray.model.artifact import load_artifact  # noqa: E402
from simpsons_ray.train import compose, datasets
from simpsons_ray.train.config import TrainConfig
from simpsons_ray.train.driver import train  # noqa: E402
from simpsons_ray.train.evaluation import composite_frames, composite_scores, composite_sets  # noqa: E402

DEFAULT_ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "simpsons-kaggle")


def boxed_folder(root: str, work: str, characters: int | None, unboxed: int) -> tuple[str, pd.DataFrame]:
    """A folder of the boxed characters' pictures (links) with their annotation.csv; returns it and the boxes.

    Every boxed picture is kept, and at most ``unboxed`` of each character's others
    (the first by name): the boxed ones make the held-out frames, the others only
    lengthen training.
    """
    boxes = pd.read_csv(os.path.join(root, compose.ANNOTATION_FILE))
    names = sorted(boxes["character"].unique())
    if characters:
        names = boxes["character"].value_counts().index[:characters].sort_values().tolist()
    boxed = set(boxes["path"].map(compose.picture_key))
    data = os.path.join(work, "data")
    if os.path.isdir(data):  # a rerun into the same --work
        return data, compose.read_boxes(os.path.join(data, compose.ANNOTATION_FILE))
    for name in names:
        os.makedirs(os.path.join(data, name))
        folder = os.path.join(root, "train", name)
        files = sorted(os.listdir(folder))
        keep = [f for f in files if f"{name}/{f}" in boxed] + [f for f in files if f"{name}/{f}" not in boxed][:unboxed]
        for f in keep:
            os.symlink(os.path.abspath(os.path.join(folder, f)), os.path.join(data, name, f))
    boxes = boxes[boxes["character"].isin(names)]
    boxes.to_csv(os.path.join(data, compose.ANNOTATION_FILE), index=False)
    return data, compose.read_boxes(os.path.join(data, compose.ANNOTATION_FILE))


def held_out(config: TrainConfig, boxes: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The validation and test pictures of the training runs' split that have a box."""
    images = datasets.list_labelled_images(config.data_uri)
    images = datasets.cap_per_class(images, config.max_images_per_class, config.seed)
    split = datasets.stratified_split(images, config.val_fraction, config.seed, config.test_fraction)
    boxed = set(boxes["key"])
    return {name: part[part["uri"].map(compose.picture_key).isin(boxed)][["uri", "label"]].reset_index(drop=True)
            for name, part in (("validation", split.val), ("test", split.test))}


def best_cut(artifact, frames: compose.Composite, scores: np.ndarray) -> float:
    """The single top-1 probability cut of best macro-F1 on these (validation) frames."""
    cuts = np.round(np.arange(0.0, 1.0, 0.02), 2)
    f1 = [multilabel.report(composite_sets(artifact, scores, c), frames.targets, artifact.classes)["macro_f1"] for c in cuts]
    return float(cuts[int(np.argmax(f1))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="the Kaggle folder: train/<character>/*.jpg and annotation.csv")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--unboxed", type=int, default=60, help="pictures without a box kept per character")
    parser.add_argument("--frames", type=int, default=2400, help="test frames composed (validation: half as many)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=["multilabel", "single"],
                        help="multilabel, single, and multilabel-ft: multilabel from the single model's weights (after single)")
    parser.add_argument("--ft-epochs", type=int, nargs=2, default=(2, 4), metavar=("FROZEN", "FINETUNE"),
                        help="multilabel-ft's two phases (default 2 4)")
    parser.add_argument("--work", help="keep the data links and models here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 characters, 32 px, 2 epochs, 200 frames")
    args = parser.parse_args()
    characters = None
    if args.quick:
        args.image_size, args.epochs, args.frames, characters = 32, 2, 200, 4

    work = args.work or tempfile.mkdtemp(prefix="bench-multilabel-")
    data, boxes = boxed_folder(os.path.abspath(args.root), work, characters, args.unboxed)
    base = dict(data_uri=data, arch="resnet18", weights="none", image_size=args.image_size, num_workers=args.num_workers,
                finetune_epochs=args.epochs, batch_size=64, seed=args.seed, patience=args.epochs)
    rows, per_character, trained = [], {}, {}
    for arm in args.arms:
        settings = dict(base, objective=arm)
        if arm == "multilabel-ft":
            # The single model's backbone as the pretrained one, as ImageNet's would be: the head on
            # the frozen backbone, then the last two stages too (the two phases of `train`).
            settings.update(objective="multilabel", weights=os.path.join(work, "model-single", "model.pt"),
                            frozen_epochs=args.ft_epochs[0], finetune_epochs=args.ft_epochs[1], unfreeze=("layer3", "layer4"),
                            patience=sum(args.ft_epochs))
        config = TrainConfig.for_recipe("default", output_uri=os.path.join(work, f"model-{arm}"), **settings)
        done = os.path.join(config.output_uri, "metrics.json")
        if os.path.exists(done):  # trained by an earlier run into the same --work: scored again, not retrained
            summary = json.load(open(done))
            trained[arm] = {"wall_s": summary["wall_time_s"], "images_per_s": summary["train_images_per_s_mean"],
                            "per_epoch": [round(r["images_per_s"], 1) for r in summary["history"]], "best_epoch": summary["best_epoch"]}
            continue
        start = time.perf_counter()
        summary = train(config)
        trained[arm] = {"wall_s": time.perf_counter() - start, "images_per_s": summary["train_images_per_s_mean"],
                        "per_epoch": [round(r["images_per_s"], 1) for r in summary["history"]],
                        "best_epoch": summary["best_epoch"]}
        print(f"[{arm}] trained in {trained[arm]['wall_s']:.0f} s, {trained[arm]['images_per_s']:.1f} img/s", flush=True)

    split = held_out(TrainConfig.for_recipe("default", **base), boxes)
    print(f"held out: {len(split['validation'])} validation and {len(split['test'])} test pictures with a box", flush=True)
    for arm in args.arms:
        artifact = load_artifact(os.path.join(work, f"model-{arm}"))
        frames = {name: composite_frames(split[name], artifact.classes, args.frames // (2 if name == "validation" else 1),
                                         artifact.preprocess.image_size, args.seed + (name == "test"), boxes)
                  for name in ("validation", "test")}
        scores = {name: composite_scores(artifact, f) for name, f in frames.items()}
        readings = [("thresholds" if arm.startswith("multilabel") else "top-1", None)]
        if arm == "single":
            readings.append((f"top-1 >= {best_cut(artifact, frames['validation'], scores['validation']):.2f}", None))
            readings[-1] = (readings[-1][0], float(readings[-1][0].split(">= ")[1]))
        for reading, cut in readings:
            for name in ("validation", "test"):
                result = multilabel.report(composite_sets(artifact, scores[name], cut), frames[name].targets, artifact.classes)
                rows.append({"model": arm, "read as": reading, "split": name, "frames": result["num_frames"],
                             "macro_f1": result["macro_f1"], "micro_f1": result["micro_f1"],
                             "exact_set": result["exact_set_accuracy"], "nobody_p": result["nobody"]["precision"],
                             "nobody_r": result["nobody"]["recall"], "screen_time_err": result["screen_time_error"],
                             "train_img_s": trained.get(arm, {}).get("images_per_s")})
                if name == "test":
                    per_character[f"{arm} {reading}"] = {k: v["predicted_seconds"] for k, v in result["per_class"].items()}
                    per_character["truth"] = {k: v["true_seconds"] for k, v in result["per_class"].items()}

    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print("\ntest frames on screen per character (seconds, one second a frame):")
    print(pd.DataFrame(per_character).to_string(float_format=lambda v: f"{v:.0f}"))
    if "multilabel" in trained and "single" in trained:  # the same epochs, the same pictures
        ratio = trained["multilabel"]["images_per_s"] / trained["single"]["images_per_s"]
        print(f"\ntraining images/s: multilabel (composition) {trained['multilabel']['images_per_s']:.1f}, "
              f"single {trained['single']['images_per_s']:.1f}: {ratio:.2f}x")
    print(json.dumps({"trained": trained, "rows": rows}, default=float))


if __name__ == "__main__":
    main()
