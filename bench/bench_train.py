"""Training benchmark: `simpsons-ray train` on Ray Train beside a plain single-process PyTorch loop.

Same images, split, architecture, image size, augmentation, optimizer, global batch
and epochs; the plain loop calls the very same ``train_one_epoch``/``evaluate``
functions, so the difference is what Ray Train and Ray Data add or take away.

    python bench/bench_train.py                      # ../shared/data/simpsons-mnist/train
    python bench/bench_train.py --quick              # a smoke run: 2 epochs, 100 images/class
    python bench/bench_train.py --data DIR --arch resnet18 --image-size 64 --epochs 8
    python bench/bench_train.py --image-size 128     # 4x the model work per image (~25 min on 2 cores)
    python bench/bench_train.py --repeats 4 --epochs 12 --recipe notebook --lr-schedule cosine   # the runs of bench/RESULTS.md

Both loops use the recipe of `simpsons-ray train` (``--recipe``, default "default"): its
optimizer, LR schedule (``--lr-schedule``; with plateau, ``--lr-patience 0`` keeps the LR
fixed), label smoothing, weight average and flip TTA, built by the same functions, with
early stopping off so that both run every epoch. Nothing is held out for test here: this
benchmark compares Ray with a plain loop, not recipes (``bench_recipe.py`` does that).
Both start from the same initial weights (seeded by the split seed, as the Ray
workers do); the plain loop's order and augmentation are seeded by the repeat
number, the Ray run's block order is not seeded at all.

Prints, per pair of runs: mean training images/s per epoch (training pass only,
both validate after every epoch outside it) and validation accuracy three ways:
after the last epoch, at the epoch of lowest validation loss (what the artifact
keeps), and the mean of the last three epochs. With ``--repeats`` > 1, also the
mean and spread of each, and of the paired differences.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simpsons_ray.core import storage  # noqa: E402
from simpsons_ray.model import metrics
from simpsons_ray.model.network import build_model  # noqa: E402
from simpsons_ray.model.preprocess import TrainAugment, load_resized  # noqa: E402
from simpsons_ray.train import datasets
from simpsons_ray.train.config import (
    RECIPES,  # noqa: E402
    TrainConfig,
)
from simpsons_ray.train.driver import train  # noqa: E402
from simpsons_ray.train.recipe import LR_SCHEDULES, BatchMix, LrSchedule, WeightEma, make_optimizer
from simpsons_ray.train.steps import StepRecipe, evaluate, train_one_epoch

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "simpsons-mnist", "train")


def plain_loop(config: TrainConfig, epochs: int, threads: int, repeat: int = 0) -> dict:
    """Single process, no Ray: decode everything, then epochs of augment + train_one_epoch."""
    torch.set_num_threads(threads)
    images = datasets.cap_per_class(datasets.list_labelled_images(config.data_uris[0]), config.max_images_per_class, config.seed)
    split = datasets.stratified_split(images, config.val_fraction, config.seed)
    with ThreadPoolExecutor(8) as pool:
        decode = lambda uri: load_resized(storage.read_bytes(uri), config.image_size)  # noqa: E731
        train_x = np.stack(list(pool.map(decode, split.train["uri"])))
        val_x = np.stack(list(pool.map(decode, split.val["uri"])))
    train_y = split.train["label_index"].to_numpy()
    val_y = split.val["label_index"].to_numpy()
    torch.manual_seed(config.seed)  # the initial weights the Ray workers start from
    model = build_model(config.arch, len(split.classes), config.head_hidden, config.dropout)
    # The recipe's own parts, as the Ray workers build them.
    optimizer = make_optimizer(model.parameters(), config.optimizer, config.lr, config.weight_decay)
    schedule = LrSchedule(optimizer, config.lr_schedule, config.lr, epochs, config.warmup_epochs, config.lr_patience, config.lr_factor)
    ema = WeightEma(model, config.ema_decay) if config.ema_decay > 0 else None
    mix = BatchMix(len(split.classes), config.mixup_alpha, config.cutmix_alpha)
    augment = TrainAugment(config.augment)
    torch.manual_seed(1000 + repeat)  # augmentation and dropout
    rng = np.random.default_rng(repeat)  # batch order
    batch = config.batch_size * config.num_workers  # the same global batch as the Ray run
    device = torch.device("cpu")
    val_batches = lambda: ({"image": torch.from_numpy(val_x[i : i + 256]), "label": torch.tensor(val_y[i : i + 256])}  # noqa: E731
                           for i in range(0, len(val_x), 256))
    rates, history = [], []
    train_seconds = 0.0
    steps_per_epoch = int(np.ceil(len(train_x) / (config.batch_size * config.num_workers)))
    for epoch in range(epochs):
        order = rng.permutation(len(train_x))
        schedule.set_progress(epoch)
        lr = optimizer.param_groups[0]["lr"]

        def batches():
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                yield {"image": torch.from_numpy(augment.batch(train_x[idx])), "label": torch.from_numpy(train_y[idx])}

        step = StepRecipe(config.label_smoothing, mix, ema, schedule, epoch, steps_per_epoch)
        stats = train_one_epoch(model, batches(), optimizer, device, config.preprocess, step)
        rates.append(stats.count / stats.seconds)
        train_seconds += stats.seconds
        # Validated every epoch, as the Ray run does, outside the timed training pass.
        val, matrix = evaluate(ema.module if ema else model, val_batches(), device, config.preprocess, len(split.classes),
                               config.tta_flip)
        history.append({"val_loss": val.loss, "val_accuracy": metrics.report(matrix, split.classes)["accuracy"], "lr": lr})
        schedule.end_epoch(val.loss)
    return {"history": history, "acc": accuracies(history), "images_per_s": float(np.mean(rates)), "epoch_rates": rates,
            "train_s": train_seconds}


def ray_run(config: TrainConfig) -> dict:
    summary = train(config)
    history = [{k: row[k] for k in ("val_loss", "val_accuracy", "lr")} for row in summary["history"]]
    return {"history": history, "acc": accuracies(history), "images_per_s": summary["train_images_per_s_mean"],
            "epoch_rates": [row["images_per_s"] for row in summary["history"]],
            "train_s": sum(row["train_images"] / row["images_per_s"] for row in summary["history"])}


def accuracies(history: list[dict]) -> dict:
    """Validation accuracy three ways: after the last epoch, at the lowest val loss, mean of the last three."""
    best = min(history, key=lambda row: row["val_loss"])
    return {"last": history[-1]["val_accuracy"], "best": best["val_accuracy"],
            "last3": float(np.mean([row["val_accuracy"] for row in history[-3:]]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.abspath(DEFAULT_DATA))
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64, help="per Ray worker; the plain loop uses workers x this")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="default", help="as `simpsons-ray train` (default %(default)s)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="as `simpsons-ray train` (default: the recipe's)")
    parser.add_argument("--lr-patience", type=int, default=TrainConfig.lr_patience,
                        help="as `simpsons-ray train`; 0 keeps a plateau schedule's LR fixed (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs, alternating Ray and plain")
    parser.add_argument("--max-images-per-class", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.max_images_per_class = 2, 100
    import ray

    pairs = []
    with tempfile.TemporaryDirectory() as out:
        for repeat in range(args.repeats):
            config = TrainConfig.for_recipe(
                args.recipe, data_uris=(args.data,), output_uri=os.path.join(out, f"model{repeat}"), arch=args.arch, weights="none",
                image_size=args.image_size, num_workers=args.num_workers, batch_size=args.batch_size,
                finetune_epochs=args.epochs, patience=args.epochs,  # no early stop: both run every epoch
                lr_schedule=args.lr_schedule, lr_patience=args.lr_patience or args.epochs, val_fraction=0.2, seed=0,
                max_images_per_class=args.max_images_per_class,
            )
            # Ray is shut down before the plain loop, so that its idle processes take nothing from it.
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            ray_result = ray_run(config)
            ray.shutdown()
            plain = plain_loop(config, args.epochs, threads=os.cpu_count(), repeat=repeat)
            pairs.append((ray_result, plain))
            _print_pair(repeat, ray_result, plain)

    print()
    print(f"data {args.data}  arch {args.arch}  image {args.image_size}px  epochs {args.epochs}  "
          f"global batch {args.batch_size * args.num_workers}  recipe {args.recipe}  LR {_schedule_words(config)}  "
          f"cpus {os.cpu_count()}  torch {torch.__version__}")
    head = f"{'run':<36} {'train img/s':>12} {'train s':>8} {'acc last':>13} {'acc best':>13} {'acc last3':>13}"
    print(head)
    for repeat, (ray_result, plain) in enumerate(pairs):
        _print_rows(f"#{repeat + 1} ", ray_result, plain, args.num_workers)
    if len(pairs) > 1:
        print("-" * len(head))
        _print_spread(pairs)
    print("(train img/s: mean over epochs of the timed training pass; train s: those passes summed. acc last: after the")
    print(" last epoch; acc best: at the epoch of lowest validation loss, the one the Ray run's artifact keeps;")
    print(" acc last3: mean of the last three epochs)")


def _schedule_words(config: TrainConfig) -> str:
    if config.lr_schedule == "cosine":
        return f"{config.warmup_epochs:g} warm-up epoch(s), cosine to 0"
    return "fixed" if config.lr_patience >= config.finetune_epochs else f"/10 after {config.lr_patience} flat epoch(s)"


def _print_pair(repeat: int, ray_result: dict, plain: dict) -> None:
    for name, result in (("simpsons-ray train", ray_result), ("plain loop", plain)):
        print(f"#{repeat + 1} {name} per epoch: img/s " + " ".join(f"{r:.0f}" for r in result["epoch_rates"])
              + "; val acc " + " ".join(f"{row['val_accuracy']:.3f}" for row in result["history"])
              + "; lr " + " ".join(f"{row['lr']:.0e}" for row in result["history"]), flush=True)


def _print_rows(prefix: str, ray_result: dict, plain: dict, num_workers: int) -> None:
    for name, result in ((f"{prefix}simpsons-ray ({num_workers} workers)", ray_result),
                         (f"{prefix}plain loop (1 process)", plain)):
        a = result["acc"]
        print(f"{name:<36} {result['images_per_s']:12.1f} {result['train_s']:8.1f} {a['last']:13.4f} "
              f"{a['best']:13.4f} {a['last3']:13.4f}")
    acc = {"ray": ray_result["acc"], "plain": plain["acc"]}
    print(f"{prefix + 'ray / plain; ray - plain':<36} {ray_result['images_per_s'] / plain['images_per_s']:11.2f}x "
          f"{ray_result['train_s'] / plain['train_s']:7.2f}x "
          f"{acc['ray']['last'] - acc['plain']['last']:+13.4f} {acc['ray']['best'] - acc['plain']['best']:+13.4f} "
          f"{acc['ray']['last3'] - acc['plain']['last3']:+13.4f}")


def _print_spread(pairs: list[tuple[dict, dict]]) -> None:
    """Mean +- sample standard deviation over the repeats, of each run and of the paired differences."""
    def cells(values: list[float], fmt: str) -> str:
        return f"{np.mean(values):{fmt}}+-{np.std(values, ddof=1):.{fmt[-2]}f}"

    for key, runs in (("ray", [r for r, _ in pairs]), ("plain", [p for _, p in pairs])):
        rates = [run["images_per_s"] for run in runs]
        accs = {k: [run["acc"][k] for run in runs] for k in ("last", "best", "last3")}
        print(f"{'mean+-sd ' + key:<36} {cells(rates, '.1f'):>12} {'':>8} {cells(accs['last'], '.3f'):>13} "
              f"{cells(accs['best'], '.3f'):>13} {cells(accs['last3'], '.3f'):>13}")
    ratios = [r["images_per_s"] / p["images_per_s"] for r, p in pairs]
    diffs = {k: [r["acc"][k] - p["acc"][k] for r, p in pairs] for k in ("last", "best", "last3")}
    print(f"{'mean+-sd ray/plain; ray-plain':<36} {cells(ratios, '.2f'):>12} {'':>8} {cells(diffs['last'], '+.3f'):>13} "
          f"{cells(diffs['best'], '+.3f'):>13} {cells(diffs['last3'], '+.3f'):>13}")


if __name__ == "__main__":
    main()
