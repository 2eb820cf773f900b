"""One model for real, crowded and empty frames: the default multi-label model against the softmax, on held-out Kaggle pictures.

The setting of the recipe benchmark: resnet18 at 96 px from scratch, 10 epochs, 2 Ray
workers, the 19 characters with at least 200 pictures (at most 300 each), default
flags otherwise. Arms, each trained by ``simpsons-ray train`` on the same split:

- ``default``: ``--objective multilabel`` as it ships (pictures, scenes and composed
  frames; the rarer characters as strangers; thresholds by counts);
- ``single``: ``--objective single``, the softmax;
- ``composed-only``: the multi-label training before this change (composed frames of box
  crops only, no strangers, thresholds for F1), for its figures and its training speed.

Every arm is scored on the same held-out data, the training run's own splits
(seed-drawn): the validation split chose each run's epoch, temperature and
thresholds, and is reported apart; the test split decided nothing. On each:

- top-1 accuracy, macro-F1 and top-1 ECE on the pictures as they are;
- on frames composed of those pictures (0-3 characters, uniform; the author's boxes):
  macro-F1 of ``characters``, the model's own top-1 read as a set, "nobody" recall and
  the screen-time error (a softmax names its top-1);
- the false-name rate on the same split's pictures of the 23 characters under 200
  pictures (which ``default`` trained as strangers and the others never saw);
- training images/s, mean over the epochs.

    python bench/bench_multilabel.py --seeds 0 1            # ../shared/data/simpsons-kaggle, about 30 minutes an arm on 2 cores
    python bench/bench_multilabel.py --quick                 # smoke run: 5 characters, 32 px, 2 epochs
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
from simpsons_ray.train import compose, datasets  # noqa: E402
from simpsons_ray.train.config import TrainConfig  # noqa: E402
from simpsons_ray.train.driver import train  # noqa: E402
from simpsons_ray.train.evaluation import (  # noqa: E402
    composite_frames,
    composite_scores,
    composite_sets,
    false_name_rate,
    picture_figures,
    picture_logits,
)
from simpsons_ray.train.selection import choose_thresholds  # noqa: E402

DEFAULT_ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "simpsons-kaggle")
ARMS = {
    "default": {},
    "single": {"objective": "single"},
    "composed-only": {"whole_share": 0.0, "scene_share": 0.0, "strangers": False, "threshold_rule": "f1"},
}


def held_out(config: TrainConfig) -> dict[str, dict[str, pd.DataFrame]]:
    """The validation and test pictures of the run's split: of the trained characters, and of the rarer ones."""
    images = datasets.list_labelled_images(config.data_uris[0])
    known, rare = datasets.filter_classes(images, config.min_images_per_class)
    everyone = datasets.cap_per_class(images, config.max_images_per_class, config.seed)
    split = datasets.stratified_split(everyone, config.val_fraction, config.seed, config.test_fraction, frozenset(rare))
    return {name: {"known": part[part["label_index"] >= 0][["uri", "label"]].reset_index(drop=True),
                   "strangers": part[part["label_index"] < 0][["uri", "label"]].reset_index(drop=True)}
            for name, part in (("validation", split.val), ("test", split.test))}


def scored(model_dir: str, pictures: dict[str, pd.DataFrame], boxes: pd.DataFrame, frames: int, seed: int) -> dict:
    """One arm's figures on one held-out split."""
    artifact = load_artifact(model_dir)
    index = {name: i for i, name in enumerate(artifact.classes)}
    skipped: list[str] = []
    known = pictures["known"]
    logits, labels = picture_logits(artifact, known["uri"].tolist(), [index[k] for k in known["label"]], 64, skipped)
    figures = picture_figures(artifact, logits, labels)
    stranger_logits, _ = picture_logits(artifact, pictures["strangers"]["uri"].tolist(), [-1] * len(pictures["strangers"]), 64, skipped)
    composite = composite_frames(known, artifact.classes, frames, artifact.preprocess.image_size, seed, boxes)
    scores = composite_scores(artifact, composite)
    sets = multilabel.report(composite_sets(artifact, scores), composite.targets, artifact.classes)
    top1 = multilabel.report(multilabel.top1_sets(scores), composite.targets, artifact.classes)
    return {
        "top1_accuracy": figures["accuracy"], "picture_macro_f1": figures["macro_f1"],
        "ece": figures["calibration"]["ece_after"], "ece_before": figures["calibration"]["ece_before"],
        "frames_macro_f1": sets["macro_f1"], "own_top1_macro_f1": top1["macro_f1"], "nobody_recall": sets["nobody"]["recall"],
        "screen_time_error": sets["screen_time_error"], "false_name_rate": false_name_rate(artifact, stranger_logits),
        "named_exactly": figures.get("named_exactly"), "pictures": len(labels), "stranger_pictures": len(stranger_logits),
        "frames": len(composite.targets), "skipped": len(skipped),
    }


def rules(model_dir: str, split: dict[str, dict[str, pd.DataFrame]], boxes: pd.DataFrame, frames: int, seed: int) -> list[dict]:
    """A multi-label model's thresholds by each rule, chosen as ``train`` chooses them and scored on the test frames.

    Chosen on frames composed of the validation pictures plus the strangers' validation
    pictures (truth: nobody), the frames whose truth is whole; scored on frames composed
    of the test pictures (the same frames as the arm's own test row).
    """
    artifact = load_artifact(model_dir)
    chosen_on = composite_frames(split["validation"]["known"], artifact.classes, frames, artifact.preprocess.image_size, seed, boxes)
    skipped: list[str] = []
    strangers = split["validation"]["strangers"]["uri"].tolist()
    stranger_logits, _ = picture_logits(artifact, strangers, [-1] * len(strangers), 64, skipped)
    scores = np.concatenate([composite_scores(artifact, chosen_on), multilabel.sigmoid(stranger_logits, artifact.temperature)])
    targets = np.concatenate([chosen_on.targets, np.zeros((len(stranger_logits), len(artifact.classes)), np.float32)])
    test = composite_frames(split["test"]["known"], artifact.classes, frames, artifact.preprocess.image_size, seed + 1, boxes)
    test_scores = composite_scores(artifact, test)
    out = []
    for rule in ("count", "f1"):
        cut = choose_thresholds(scores, targets, rule)
        report = multilabel.report(multilabel.predicted_sets(test_scores, cut), test.targets, artifact.classes)
        out.append({"rule": rule, "frames_macro_f1": report["macro_f1"], "screen_time_error": report["screen_time_error"],
                    "nobody_recall": report["nobody"]["recall"], "exact_set": report["exact_set_accuracy"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="the Kaggle folder: train/<character>/*.jpg and annotation.csv")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--frames", type=int, default=2400, help="composed test frames (validation: the same number)")
    parser.add_argument("--work", help="keep the models here; a rerun scores the models it finds instead of training again")
    parser.add_argument("--rules", action="store_true", help="also score each multi-label arm's thresholds by both rules (count, f1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 characters over 150 pictures, 32 px, 2 epochs")
    args = parser.parse_args()
    root = os.path.abspath(args.root)
    work = args.work or tempfile.mkdtemp(prefix="bench-multilabel-")
    base = dict(data_uris=(os.path.join(root, "train"),), boxes=os.path.join(root, compose.ANNOTATION_FILE), arch="resnet18",
                weights="none", image_size=args.image_size, finetune_epochs=args.epochs, patience=args.epochs,
                min_images_per_class=200, max_images_per_class=300, num_workers=2)
    if args.quick:
        base |= {"image_size": 32, "finetune_epochs": 2, "min_images_per_class": 1000, "max_images_per_class": 60}
        args.frames = 200
    boxes = compose.read_boxes(base["boxes"])
    rows: list[dict] = []
    rule_rows: list[dict] = []
    for seed in args.seeds:
        for arm in args.arms:
            config = TrainConfig.for_recipe("default", **base, **ARMS[arm], seed=seed, output_uri=os.path.join(work, f"{arm}-seed{seed}"))
            done = os.path.join(config.output_uri, "metrics.json")
            start = time.perf_counter()
            summary = json.load(open(done)) if os.path.exists(done) else train(config)
            wall = time.perf_counter() - start
            split = held_out(config)
            for name in ("validation", "test"):
                figures = scored(config.output_uri, split[name], boxes, args.frames, seed + (name == "test"))
                rows.append({"seed": seed, "arm": arm, "split": name, **figures, "best_epoch": summary["best_epoch"],
                             "train_img_s": summary["train_images_per_s_mean"], "train_wall_s": round(wall)})
                print(json.dumps(rows[-1]), flush=True)
            if args.rules and config.objective == "multilabel":
                for row in rules(config.output_uri, split, boxes, args.frames, seed):
                    rule_rows.append({"seed": seed, "arm": arm, **row})
                    print(json.dumps(rule_rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 250)
    print("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    means = table.groupby(["arm", "split"]).mean(numeric_only=True).drop(columns=["seed"])
    print("\nmeans over seeds\n" + means.to_string(float_format=lambda v: f"{v:.4f}"))
    if rule_rows:
        print("\nthresholds by rule, chosen on validation frames, scored on the test frames\n"
              + pd.DataFrame(rule_rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    rates = table[table["split"] == "test"].groupby(["seed", "arm"])["train_img_s"].first().unstack()
    if {"default", "composed-only"} <= set(rates.columns):
        print("\ntraining images/s, default / composed-only:", (rates["default"] / rates["composed-only"]).round(3).to_dict())
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
