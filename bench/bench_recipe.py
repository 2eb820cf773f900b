"""Recipe benchmark: test accuracy of `simpsons-ray train`'s recipes beside a strong plain PyTorch loop.

On real Kaggle frames, the same images, split, image size and epochs for every arm:

(a) ``simpsons-ray train --recipe default`` (Ray Train, ``--num-workers`` CPU workers);
(b) ``simpsons-ray train --recipe notebook``;
(c) a plain single-process loop of ~30 lines: torchvision's resnet18, AdamW, one-cycle LR,
    label smoothing 0.1, flips and small affine shifts, trained on the same training split;
plus, with ``--ablate``, (a) again with one ingredient switched off per row.

Every arm is scored on the test split, which nothing here uses for a decision: the Ray
runs pick their best epoch and temperature on the validation split, the plain loop keeps
its last epoch. Prints test accuracy and macro-F1, validation accuracy, training
images/s (timed training passes only) and the calibration error, per seed, then the
mean and spread over seeds and the paired differences (a) - (c) and (a) - (b).

    python bench/bench_recipe.py                       # ../shared/data/simpsons-kaggle/train, the issue's setting
    python bench/bench_recipe.py --seeds 0 1 2         # is a 3-point gap more than noise?
    python bench/bench_recipe.py --ablate ema_decay=0 tta_flip=false augment_policy=none
    python bench/bench_recipe.py --quick               # smoke run: 32 px, 2 epochs, 20 images per class

The issue's setting: the 19 characters with at least 200 images, at most 300 each,
resnet18 at 96 px from scratch (``--weights none``), 10 epochs, 2 CPU workers. On a
2-core machine one arm takes 15-20 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simpsons_ray.core import storage  # noqa: E402
from simpsons_ray.model import calibration, metrics
from simpsons_ray.model.preprocess import load_resized, normalize  # noqa: E402
from simpsons_ray.train import datasets
from simpsons_ray.train.config import TrainConfig
from simpsons_ray.train.driver import train  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "simpsons-kaggle", "train")


def load_split(config: TrainConfig) -> tuple[datasets.Split, dict[str, np.ndarray]]:
    """The very split `train` draws for ``config``, decoded into uint8 arrays."""
    images = datasets.list_labelled_images(config.data_uris[0])
    images, _ = datasets.filter_classes(images, config.min_images_per_class)
    images = datasets.cap_per_class(images, config.max_images_per_class, config.seed)
    split = datasets.stratified_split(images, config.val_fraction, config.seed, config.test_fraction)
    decode = lambda uri: load_resized(storage.read_bytes(uri), config.image_size)  # noqa: E731
    arrays = {}
    with ThreadPoolExecutor(8) as pool:
        for name in ("train", "val", "test"):
            table = getattr(split, name)
            arrays[name + "_x"] = np.stack(list(pool.map(decode, table["uri"])))
            arrays[name + "_y"] = table["label_index"].to_numpy()
    return split, arrays


def plain_loop(config: TrainConfig, data: dict[str, np.ndarray], num_classes: int, epochs: int, batch: int,
               lr: float, threads: int) -> dict:
    """(c): a plain PyTorch loop with a good recipe of its own (AdamW, one-cycle, label smoothing, flip + affine)."""
    from torchvision import models
    from torchvision.transforms import v2

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = models.resnet18(num_classes=num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = int(np.ceil(len(data["train_x"]) / batch))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    augment = v2.Compose([v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))])
    prep = config.preprocess
    rng = np.random.default_rng(config.seed)
    train_seconds, seen = 0.0, 0
    for _ in range(epochs):
        model.train()
        order = rng.permutation(len(data["train_x"]))
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            start = time.perf_counter()
            images = torch.stack([augment(img) for img in torch.from_numpy(data["train_x"][idx]).permute(0, 3, 1, 2)])
            x = normalize(images.permute(0, 2, 3, 1), prep)
            loss = loss_fn(model(x), torch.from_numpy(data["train_y"][idx]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            train_seconds += time.perf_counter() - start
            seen += len(idx)
    model.eval()
    out = {"images_per_s": seen / train_seconds}
    for split in ("val", "test"):
        with torch.inference_mode():
            logits = torch.cat([model(normalize(torch.from_numpy(data[f"{split}_x"][i : i + 256]), prep))
                                for i in range(0, len(data[f"{split}_x"]), 256)]).numpy()
        labels = data[f"{split}_y"]
        report = metrics.report(metrics.confusion_matrix(labels, logits.argmax(1), num_classes), list(range(num_classes)))
        out[split] = {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                      "ece": calibration.reliability(calibration.softmax(logits), labels).ece}
    return out


def ray_arm(config: TrainConfig) -> dict:
    import ray

    # A fresh Ray per arm, shut down before the next, so no idle process takes CPU from another arm.
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        summary = train(config)
    finally:
        ray.shutdown()
    out = {"images_per_s": summary["train_images_per_s_mean"], "best_epoch": summary["best_epoch"]}
    for split, key in (("val", "validation"), ("test", "test")):
        result = summary[key]
        out[split] = {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
                      "ece": result["calibration"]["ece_after"], "ece_before": result["calibration"]["ece_before"]}
    return out


def _parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    try:
        return key, float(value) if "." in value or "e" in value.lower() else int(value)
    except ValueError:
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.abspath(DEFAULT_DATA))
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--min-images-per-class", type=int, default=200)
    parser.add_argument("--max-images-per-class", type=int, default=300)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="per Ray worker; the plain loop uses workers x this")
    parser.add_argument("--plain-lr", type=float, default=2e-3, help="the plain loop's one-cycle peak LR")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="each seed draws its own split and initial weights")
    parser.add_argument("--arms", nargs="+", default=["default", "notebook", "plain"], choices=["default", "notebook", "plain"])
    parser.add_argument("--ablate", nargs="*", default=[], metavar="KNOB=VALUE",
                        help="extra runs of the default recipe with one knob changed, e.g. ema_decay=0 tta_flip=false")
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.epochs, args.max_images_per_class, args.min_images_per_class = 32, 2, 20, 0

    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as out:
        for seed in args.seeds:
            def config(recipe: str, name: str, **knobs) -> TrainConfig:
                return TrainConfig.for_recipe(
                    recipe, data_uris=(args.data,), output_uri=os.path.join(out, f"{name}-{seed}"), arch=args.arch,
                    weights="none", image_size=args.image_size, num_workers=args.num_workers, batch_size=args.batch_size,
                    finetune_epochs=args.epochs, min_images_per_class=args.min_images_per_class,
                    max_images_per_class=args.max_images_per_class, seed=seed, **knobs,
                )

            runs = [(arm, arm, {}) for arm in args.arms]
            runs += [(f"default {text}", "default", dict([_parse_override(text)])) for text in args.ablate]
            for name, recipe, knobs in runs:
                start = time.perf_counter()
                if recipe == "plain":
                    split, data = load_split(config("default", "plain"))
                    result = plain_loop(config("default", "plain"), data, len(split.classes), args.epochs,
                                        args.batch_size * args.num_workers, args.plain_lr, threads=os.cpu_count())
                else:
                    result = ray_arm(config(recipe, name.replace(" ", "_").replace("=", "-"), **knobs))
                result |= {"seed": seed, "wall_s": time.perf_counter() - start}
                results.setdefault(name, []).append(result)
                print(f"seed {seed} {name}: " + json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    _print_table(args, results)


def _print_table(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    print()
    print(f"data {args.data}  classes with >= {args.min_images_per_class} images, <= {args.max_images_per_class} each  "
          f"{args.arch} {args.image_size}px from scratch  {args.epochs} epochs  global batch {args.batch_size * args.num_workers}  "
          f"cpus {os.cpu_count()}  torch {torch.__version__}  seeds {' '.join(map(str, args.seeds))}")
    head = f"{'arm':<34} {'test acc':>13} {'test mF1':>13} {'val acc':>13} {'train img/s':>13} {'test ECE':>9}"
    print(head)
    print("-" * len(head))

    def cell(values: list[float], fmt: str = ".4f") -> str:
        if len(values) == 1:
            return f"{values[0]:{fmt}}"
        return f"{np.mean(values):{fmt}}+-{np.std(values, ddof=1):.3f}"

    for name, runs in results.items():
        print(f"{name:<34} {cell([r['test']['accuracy'] for r in runs]):>13} {cell([r['test']['macro_f1'] for r in runs]):>13} "
              f"{cell([r['val']['accuracy'] for r in runs]):>13} {cell([r['images_per_s'] for r in runs], '.1f'):>13} "
              f"{np.mean([r['test']['ece'] for r in runs]):9.4f}")
    base = results.get("default")
    if base:
        print("-" * len(head))
        for other in [n for n in results if n != "default"]:
            pairs = [(a, b) for a in base for b in results[other] if a["seed"] == b["seed"]]
            if not pairs:
                continue
            d_acc = [a["test"]["accuracy"] - b["test"]["accuracy"] for a, b in pairs]
            d_f1 = [a["test"]["macro_f1"] - b["test"]["macro_f1"] for a, b in pairs]
            ratio = [a["images_per_s"] / b["images_per_s"] for a, b in pairs]
            print(f"{'default - ' + other:<34} {cell(d_acc, '+.4f'):>13} {cell(d_f1, '+.4f'):>13} {'':>13} "
                  f"{cell(ratio, '.2f') + 'x':>13}")
    print("(test: scored once at the end, never used for a decision; val: the split that chose the best epoch and")
    print(" the temperature. ECE: after temperature scaling for the Ray arms, raw softmax for the plain loop.")
    print(" img/s: timed training passes only; the default - other rows give paired differences and ratios per seed)")


if __name__ == "__main__":
    main()
