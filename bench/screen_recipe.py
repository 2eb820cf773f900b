"""Recipe screening: one ingredient at a time, in one process, judged on the validation split only.

Cheaper than ``bench_recipe.py`` (no Ray, smaller images, fewer images), so that many
variants fit in an afternoon on 2 cores; it calls the library's own recipe parts
(``make_optimizer``, ``LrSchedule``, ``WeightEma``, ``BatchMix``, ``TrainAugment``,
``train_one_epoch``, ``evaluate``). The test split is never loaded: choosing a recipe
here cannot leak into the test figures of ``bench_recipe.py``.

Each variant is a JSON object of knobs over the base below; per epoch it prints the
validation accuracy of the model validation would keep (the weight average when
``ema`` > 0), with flip TTA, and of the raw weights.

    python bench/screen_recipe.py '{"name": "base"}' '{"name": "ta", "policy": "trivialaugment"}'
    python bench/screen_recipe.py '{"name": "plain", "plain": true, "onecycle": true}'   # the plain loop of bench_recipe

Knobs: opt (adam|adamw|sgd), lr, wd, sched (cosine|plateau), warmup, ls, policy
(none|trivialaugment|randaugment), erasing, mixup, cutmix, ema, batch, hidden,
dropout, zero_init (zero the last BatchNorm of each residual block), plain
(torchvision's resnet18 with its own head), onecycle (OneCycleLR instead of the
schedule), seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simpsons_ray.core import storage  # noqa: E402
from simpsons_ray.model.network import build_model  # noqa: E402
from simpsons_ray.model.preprocess import AugmentConfig, PreprocessConfig, TrainAugment, load_resized  # noqa: E402
from simpsons_ray.train import datasets
from simpsons_ray.train.recipe import BatchMix, LrSchedule, WeightEma, make_optimizer  # noqa: E402
from simpsons_ray.train.steps import StepRecipe, evaluate, train_one_epoch  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "simpsons-kaggle", "train")
BASE = dict(opt="adamw", lr=2e-3, wd=0.05, sched="cosine", warmup=1.0, ls=0.1, policy="none", erasing=0.0, mixup=0.0,
            cutmix=0.0, ema=0.0, batch=64, hidden=0, dropout=0.0, zero_init=False, plain=False, onecycle=False, seed=0)


def load(data: str, size: int, cap: int) -> dict[str, np.ndarray]:
    """Training and validation arrays of `train`'s own split (seed 0, 15% validation, 15% test left unread)."""
    images, _ = datasets.filter_classes(datasets.list_labelled_images(data), 200)
    split = datasets.stratified_split(datasets.cap_per_class(images, cap, 0), 0.15, 0, test_fraction=0.15)
    decode = lambda uri: load_resized(storage.read_bytes(uri), size)  # noqa: E731
    with ThreadPoolExecutor(4) as pool:
        return {"tx": np.stack(list(pool.map(decode, split.train["uri"]))), "ty": split.train["label_index"].to_numpy(),
                "vx": np.stack(list(pool.map(decode, split.val["uri"]))), "vy": split.val["label_index"].to_numpy()}


def run(data: dict[str, np.ndarray], size: int, epochs: int, name: str, **knobs) -> dict:
    k = BASE | knobs
    torch.manual_seed(k["seed"])
    torch.set_num_threads(os.cpu_count())
    classes = int(data["ty"].max()) + 1
    prep = PreprocessConfig(image_size=size)
    if k["plain"]:
        from torchvision import models

        model = models.resnet18(num_classes=classes)
    else:
        model = build_model("resnet18", classes, k["hidden"], k["dropout"])
    if k["zero_init"]:
        for block in model.modules():
            if hasattr(block, "bn2") and not hasattr(block, "bn3"):
                torch.nn.init.zeros_(block.bn2.weight)
    optimizer = make_optimizer(model.parameters(), k["opt"], k["lr"], k["wd"])
    steps = int(np.ceil(len(data["tx"]) / k["batch"]))
    onecycle = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=k["lr"], total_steps=epochs * steps) if k["onecycle"] else None
    schedule = None if onecycle else LrSchedule(optimizer, k["sched"], k["lr"], epochs, k["warmup"])
    ema = WeightEma(model, k["ema"]) if k["ema"] > 0 else None
    mix = BatchMix(classes, k["mixup"], k["cutmix"])
    augment = TrainAugment(AugmentConfig(policy=k["policy"], erasing=k["erasing"]))
    rng = np.random.default_rng(k["seed"])
    step_optimizer = _StepsSchedule(optimizer, onecycle) if onecycle else optimizer
    history, start = [], time.time()
    for epoch in range(epochs):
        order = rng.permutation(len(data["tx"]))
        batches = ({"image": torch.from_numpy(augment.batch(data["tx"][order[i : i + k["batch"]]])),
                    "label": torch.from_numpy(data["ty"][order[i : i + k["batch"]]])} for i in range(0, len(order), k["batch"]))
        stats = train_one_epoch(model, batches, step_optimizer, torch.device("cpu"), prep,
                                StepRecipe(k["ls"], mix, ema, schedule, epoch, steps))
        kept = ema.module if ema else model

        def val(m, tta=False):
            batches = ({"image": torch.from_numpy(data["vx"][i : i + 256]), "label": torch.from_numpy(data["vy"][i : i + 256])}
                       for i in range(0, len(data["vx"]), 256))
            return evaluate(m, batches, torch.device("cpu"), prep, classes, tta)[0]

        kept_stats = val(kept)
        row = {"val": kept_stats.accuracy, "val_tta": val(kept, True).accuracy, "val_raw": val(model).accuracy if ema else kept_stats.accuracy,
               "val_loss": kept_stats.loss}
        if schedule:
            schedule.end_epoch(kept_stats.loss)
        history.append(row)
        print(f"{name} {epoch + 1} train_loss {stats.loss:.3f} {stats.count / stats.seconds:.0f} img/s  "
              + "  ".join(f"{key} {value:.4f}" for key, value in row.items()), flush=True)
    return {"name": name, "knobs": knobs, "last": history[-1], "seconds": round(time.time() - start)}


class _StepsSchedule:
    """An optimizer whose step() also steps a per-step LR scheduler (OneCycleLR)."""

    def __init__(self, optimizer, scheduler):
        self.optimizer, self.scheduler, self.param_groups = optimizer, scheduler, optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="JSON objects of knobs, each with a name")
    parser.add_argument("--data", default=os.path.abspath(DEFAULT_DATA))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-images-per-class", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    data = load(args.data, args.image_size, args.max_images_per_class)
    results = [run(data, args.image_size, args.epochs, **json.loads(text)) for text in args.variants]
    print(f"\n{len(data['tx'])} training and {len(data['vx'])} validation images, {args.image_size} px, {args.epochs} epochs")
    print(f"{'variant':<16} {'val acc':>8} {'with TTA':>9} {'raw':>8} {'val loss':>9} {'seconds':>8}")
    for r in results:
        last = r["last"]
        print(f"{r['name']:<16} {last['val']:8.4f} {last['val_tta']:9.4f} {last['val_raw']:8.4f} {last['val_loss']:9.3f} {r['seconds']:8d}")


if __name__ == "__main__":
    main()
