"""Training benchmark: `simpsons-ray train` on Ray Train beside a plain single-process PyTorch loop.

Same images, split, architecture, image size, augmentation, optimizer, global batch
and epochs; the plain loop calls the very same ``train_one_epoch``/``evaluate``
functions, so the difference is what Ray Train and Ray Data add or take away.

    python bench/bench_train.py                      # ../shared/data/simpsons-mnist/train
    python bench/bench_train.py --quick              # a smoke run: 2 epochs, 100 images/class
    python bench/bench_train.py --data DIR --arch resnet18 --image-size 64 --epochs 8
    python bench/bench_train.py --image-size 128     # 4x the model work per image (~25 min on 2 cores)

Prints a table: mean training images/s per epoch and validation accuracy three
ways (after the last epoch, at the epoch of lowest validation loss, and the mean
of the last three epochs; at a fixed LR the last epoch alone moves by several
points from one epoch to the next). Both runs validate after every epoch;
training images/s counts only the training pass of each epoch, in both columns.
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

from simpsons_ray import datasets, metrics, storage  # noqa: E402
from simpsons_ray.model import build_model  # noqa: E402
from simpsons_ray.preprocess import TrainAugment, load_resized  # noqa: E402
from simpsons_ray.training import TrainConfig, evaluate, train, train_one_epoch  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "simpsons-mnist", "train")


def plain_loop(config: TrainConfig, epochs: int, threads: int) -> dict:
    """Single process, no Ray: decode everything, then epochs of augment + train_one_epoch."""
    torch.set_num_threads(threads)
    images = datasets.cap_per_class(datasets.list_labelled_images(config.data_uri), config.max_images_per_class, config.seed)
    split = datasets.stratified_split(images, config.val_fraction, config.seed)
    with ThreadPoolExecutor(8) as pool:
        decode = lambda uri: load_resized(storage.read_bytes(uri), config.image_size)  # noqa: E731
        train_x = np.stack(list(pool.map(decode, split.train["uri"])))
        val_x = np.stack(list(pool.map(decode, split.val["uri"])))
    train_y = split.train["label_index"].to_numpy()
    val_y = split.val["label_index"].to_numpy()
    torch.manual_seed(config.seed)
    model = build_model(config.arch, len(split.classes), config.head_hidden, config.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    augment = TrainAugment(config.augment)
    rng = np.random.default_rng(config.seed)
    batch = config.batch_size * config.num_workers  # the same global batch as the Ray run
    device = torch.device("cpu")
    val_batches = lambda: ({"image": torch.from_numpy(val_x[i : i + 256]), "label": torch.tensor(val_y[i : i + 256])}  # noqa: E731
                           for i in range(0, len(val_x), 256))
    rates, history = [], []
    train_seconds = 0.0
    for _ in range(epochs):
        order = rng.permutation(len(train_x))

        def batches():
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                yield {"image": torch.from_numpy(augment.batch(train_x[idx])), "label": torch.from_numpy(train_y[idx])}

        stats = train_one_epoch(model, batches(), optimizer, device, config.preprocess)
        rates.append(stats.count / stats.seconds)
        train_seconds += stats.seconds
        # Validated every epoch, as the Ray run does, outside the timed training pass.
        val, matrix = evaluate(model, val_batches(), device, config.preprocess, len(split.classes))
        history.append({"val_loss": val.loss, "val_accuracy": metrics.report(matrix, split.classes)["accuracy"]})
    return {"history": history, "images_per_s": float(np.mean(rates)), "epoch_rates": rates,
            "train_s": train_seconds, "val_images": len(val_x)}


def ray_run(config: TrainConfig) -> dict:
    summary = train(config)
    history = [{"val_loss": row["val_loss"], "val_accuracy": row["val_accuracy"]} for row in summary["history"]]
    return {"history": history, "images_per_s": summary["train_images_per_s_mean"],
            "epoch_rates": [row["images_per_s"] for row in summary["history"]],
            "train_s": sum(row["train_images"] / row["images_per_s"] for row in summary["history"]),
            "val_images": summary["final"]["num_images"]}


def accuracies(history: list[dict]) -> dict:
    """Validation accuracy three ways: after the last epoch, at the lowest val loss, mean of the last three."""
    best = min(history, key=lambda row: row["val_loss"])
    return {"last": history[-1]["val_accuracy"], "best": best["val_accuracy"], "best_epoch": history.index(best) + 1,
            "last3": float(np.mean([row["val_accuracy"] for row in history[-3:]]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.path.abspath(DEFAULT_DATA))
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64, help="per Ray worker; the plain loop uses workers x this")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--max-images-per-class", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.max_images_per_class = 2, 100

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            data_uri=args.data, output_uri=os.path.join(out, "model"), arch=args.arch, weights="none",
            image_size=args.image_size, num_workers=args.num_workers, batch_size=args.batch_size,
            finetune_epochs=args.epochs, patience=10_000, lr_patience=10_000,  # run every epoch, fixed LR, in both
            val_fraction=0.2, seed=0, max_images_per_class=args.max_images_per_class,
        )
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray_result = ray_run(config)
        ray.shutdown()
        plain = plain_loop(config, args.epochs, threads=os.cpu_count())

    print()
    print(f"data {args.data}  arch {args.arch}  image {args.image_size}px  epochs {args.epochs}  "
          f"global batch {args.batch_size * args.num_workers}  cpus {os.cpu_count()}  torch {torch.__version__}")
    acc = {"ray": accuracies(ray_result["history"]), "plain": accuracies(plain["history"])}
    print(f"{'run':<34} {'train img/s':>12} {'train s':>8} {'acc last':>9} {'acc best':>9} {'acc last3':>10}")
    for name, key, result in (("simpsons-ray train (" + str(args.num_workers) + " Ray workers)", "ray", ray_result),
                              ("plain PyTorch loop (1 process)", "plain", plain)):
        a = acc[key]
        print(f"{name:<34} {result['images_per_s']:12.1f} {result['train_s']:8.1f} {a['last']:9.4f} "
              f"{a['best']:9.4f} {a['last3']:10.4f}")
    print(f"{'ray / plain; ray - plain':<34} {ray_result['images_per_s'] / plain['images_per_s']:11.2f}x "
          f"{ray_result['train_s'] / plain['train_s']:7.2f}x "
          f"{acc['ray']['last'] - acc['plain']['last']:+9.4f} {acc['ray']['best'] - acc['plain']['best']:+9.4f} "
          f"{acc['ray']['last3'] - acc['plain']['last3']:+10.4f}")
    for name, result in (("simpsons-ray train", ray_result), ("plain loop", plain)):
        print(f"{name} per epoch: img/s " + " ".join(f"{r:.0f}" for r in result["epoch_rates"])
              + "; val acc " + " ".join(f"{row['val_accuracy']:.3f}" for row in result["history"]))
    print("(train img/s: mean over epochs of the timed training pass; train s: those passes summed. acc last: after the")
    print(" last epoch; acc best: at the epoch of lowest validation loss, the one the Ray run's artifact keeps (epochs "
          f"{acc['ray']['best_epoch']} and {acc['plain']['best_epoch']}); acc last3: mean of the last three epochs)")


if __name__ == "__main__":
    main()
