"""Training benchmark: `simpsons-ray train` on Ray Train beside a plain single-process PyTorch loop.

Same images, split, architecture, image size, augmentation, optimizer, global batch
and epochs; the plain loop calls the very same ``train_one_epoch``/``evaluate``
functions, so the difference is what Ray Train and Ray Data add or take away.

    python bench/bench_train.py                      # ../shared/data/simpsons-mnist/train
    python bench/bench_train.py --quick              # a smoke run: 2 epochs, 100 images/class
    python bench/bench_train.py --data DIR --arch resnet18 --image-size 64 --epochs 8

Prints a table: validation accuracy after the last epoch, mean training images/s
per epoch, wall time.
Training images/s counts only the training pass of each epoch, in both columns.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
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
    rates = []
    start = time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(len(train_x))

        def batches():
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                yield {"image": torch.from_numpy(augment.batch(train_x[idx])), "label": torch.from_numpy(train_y[idx])}

        stats = train_one_epoch(model, batches(), optimizer, device, config.preprocess)
        rates.append(stats.count / stats.seconds)
    wall = time.perf_counter() - start
    val_batches = ({"image": torch.from_numpy(val_x[i : i + 256]), "label": torch.tensor(val_y[i : i + 256])}
                   for i in range(0, len(val_x), 256))
    _, matrix = evaluate(model, val_batches, device, config.preprocess, len(split.classes))
    return {"accuracy": metrics.report(matrix, split.classes)["accuracy"], "images_per_s": float(np.mean(rates)),
            "epoch_rates": rates, "wall_s": wall, "val_images": len(val_x)}


def ray_run(config: TrainConfig) -> dict:
    start = time.perf_counter()
    summary = train(config)
    # The artifact holds the best epoch's weights; the plain loop has only its last
    # epoch, so the last epoch's validation accuracy is the one compared.
    return {"accuracy": summary["history"][-1]["val_accuracy"], "best_accuracy": summary["final"]["accuracy"],
            "best_epoch": summary["best_epoch"], "images_per_s": summary["train_images_per_s_mean"],
            "epoch_rates": [row["images_per_s"] for row in summary["history"]],
            "wall_s": time.perf_counter() - start, "val_images": summary["final"]["num_images"]}


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
    print(f"{'run':<34} {'val acc':>8} {'train img/s':>12} {'wall s':>8}")
    print(f"{'simpsons-ray train (' + str(args.num_workers) + ' Ray workers)':<34} {ray_result['accuracy']:8.4f} "
          f"{ray_result['images_per_s']:12.1f} {ray_result['wall_s']:8.1f}")
    print(f"{'plain PyTorch loop (1 process)':<34} {plain['accuracy']:8.4f} {plain['images_per_s']:12.1f} {plain['wall_s']:8.1f}")
    print(f"{'ratio ray / plain':<34} {ray_result['accuracy'] - plain['accuracy']:+8.4f} "
          f"{ray_result['images_per_s'] / plain['images_per_s']:11.2f}x {ray_result['wall_s'] / plain['wall_s']:7.2f}x")
    for name, result in (("simpsons-ray train", ray_result), ("plain loop", plain)):
        print(f"{name} img/s per epoch: " + " ".join(f"{r:.0f}" for r in result["epoch_rates"]))
    print("(val acc: after the last epoch, in both rows; accuracy column of the ratio row: the difference as a fraction)")
    print(f"(the Ray run's artifact keeps its best epoch, {ray_result['best_epoch']}: val acc {ray_result['best_accuracy']:.4f})")


if __name__ == "__main__":
    main()
