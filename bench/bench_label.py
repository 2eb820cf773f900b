"""Labeling benchmark: `simpsons-ray label` end to end beside the model alone and a plain loop.

Builds frame dumps from real frames (../shared/data/simpsons-mnist/train by default):
``--episodes`` episodes, half as folders and half as tar archives, at 1x and 10x
``--frames-per-episode``. Then, on the same machine and the same frames:

- model only: the forward pass alone on pre-decoded, pre-normalised tensors at
  ``--batch-size``, of the model exactly as the predictor runs it (BatchNorm
  folded, channels_last; bf16 on GPU): the ceiling for the pipeline on this hardware;
- plain loop: one process reading the same folders and tars, PIL decode,
  torchvision Resize/ToTensor/Normalize, batches of ``--batch-size``, forward of
  the model as loaded (the straightforward way: no folding, default layout);
- pipeline: ``simpsons_ray.label.run.label`` (what ``simpsons-ray label`` runs) on a
  fresh local Ray with all the machine's CPUs, at 1x and 10x. Its wall time counts
  from the call to the last committed episode (actor start-up included, Ray's own
  start excluded).

The baselines run before and after the pipeline, and the faster of each is kept.
Peak memory is the proportional set size (PSS) of the whole process tree (this
process, Ray's GCS, raylet and every worker), sampled every 0.5 s: shared
object-store pages are split between the processes that map them, so they are
counted once. It is measured in a second run of each size, not in the timed one:
reading smaps_rollup of every worker costs the kernel ~16% of a core, which took
8% off the pipeline's frames/s on 2 cores.

    python bench/bench_label.py                       # 4 episodes x 5,000 frames, and x 50,000
    python bench/bench_label.py --quick               # a smoke run: 2 episodes x 150 frames, and x 1,500
    python bench/bench_label.py --image-size 128 --frames-per-episode 2500   # 4x the model work per frame (~22 min)
    python bench/bench_label.py --arch resnet50 --image-size 224 --gpu   # on a GPU machine
    python bench/bench_label.py --compare-objectives --frames-per-episode 2500   # single-label against multi-label labeling

``--compare-objectives`` labels the 1x dump with the same weights saved as a single-label
and as a multi-label artifact (a sigmoid per character, thresholds, and the
``characters`` lists that writes), alternating, ``--repeats`` times each.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from cluster_fixtures import process_tree  # noqa: E402  (the /proc walk the cluster tests use)
from simpsons_ray.model.artifact import load_artifact, save_artifact  # noqa: E402
from simpsons_ray.model.network import build_model
from simpsons_ray.model.preprocess import PreprocessConfig  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "simpsons-mnist", "train")


# ------------------------------------------------------------------------ inputs
def source_images(data_dir: str) -> tuple[list[str], list[bytes]]:
    """Class names and every image's bytes, in a fixed order."""
    classes = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
    images = []
    for name in classes:
        folder = os.path.join(data_dir, name)
        for file in sorted(os.listdir(folder)):
            with open(os.path.join(folder, file), "rb") as f:
                images.append(f.read())
    if not images:
        raise SystemExit(f"no images under {data_dir}: pass --data ROOT/<character>/*.jpg")
    return classes, images


def build_dump(root: str, images: list[bytes], episodes: int, frames_per_episode: int) -> int:
    """Even episodes as folders, odd ones as tar archives; frames cycle through ``images``."""
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    k = 0
    for e in range(episodes):
        episode = f"s01e{e + 1:02d}"
        if e % 2 == 0:
            os.makedirs(os.path.join(root, episode))
            for i in range(frames_per_episode):
                with open(os.path.join(root, episode, f"frame_{i:06d}.jpg"), "wb") as f:
                    f.write(images[k % len(images)])
                k += 1
        else:
            with tarfile.open(os.path.join(root, f"{episode}.tar"), "w") as tar:
                for i in range(frames_per_episode):
                    data = images[k % len(images)]
                    info = tarfile.TarInfo(f"frames/frame_{i:06d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    k += 1
    return episodes * frames_per_episode


def iter_dump(root: str):
    """Every frame's bytes of a dump, read the plain way (files, then tar members)."""
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            for file in sorted(os.listdir(path)):
                with open(os.path.join(path, file), "rb") as f:
                    yield f.read()
        else:
            with tarfile.open(path, "r|*") as tar:
                for member in tar:
                    if member.isfile():
                        yield tar.extractfile(member).read()


# --------------------------------------------------------------------- baselines
def bench_model_only(model_dir: str, frames_dir: str, batch_size: int, device: str) -> float:
    """Frames/s of the forward pass alone on pre-decoded tensors.

    The model is the one the pipeline's predictor runs (BatchNorm folded,
    channels_last, bf16 autocast on CUDA), taken from a FramePredictor, so this is
    the ceiling of the pipeline on this hardware, not of a slower model.
    """
    from PIL import Image
    from torchvision import transforms

    from simpsons_ray.label.predictor import FramePredictor

    predictor = FramePredictor(model_dir, top_k=3, device=device, cpu_threads=os.cpu_count())
    preprocess = predictor.preprocess
    size = preprocess.image_size
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(preprocess.mean, preprocess.std)])
    x = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in iter_dump(frames_dir)])
    memory_format = torch.channels_last if predictor.channels_last else torch.contiguous_format
    batches = [b.to(device).contiguous(memory_format=memory_format) for b in torch.split(x, batch_size)]
    with torch.inference_mode(), torch.autocast(predictor.device.type, dtype=torch.bfloat16, enabled=predictor.mixed_precision):
        predictor.model(batches[0])  # warm-up: kernels chosen, caches filled
        _sync(device)
        start = time.perf_counter()
        for batch in batches:
            predictor.model(batch)
        _sync(device)
    return len(x) / (time.perf_counter() - start)


def bench_plain_loop(model_dir: str, frames_dir: str, batch_size: int, device: str) -> float:
    """Frames/s of one process: read, PIL decode, torchvision transforms, forward."""
    from PIL import Image

    start = time.perf_counter()
    n = label_plainly((Image.open(io.BytesIO(data)).convert("RGB") for data in iter_dump(frames_dir)), model_dir, batch_size, device)
    return n / (time.perf_counter() - start)


def label_plainly(pictures, model_dir: str, batch_size: int, device: str) -> int:
    """The plain loop's model side: PIL pictures -> torchvision Resize/ToTensor/Normalize -> batches -> forward of the model as loaded."""
    from torchvision import transforms

    artifact = load_artifact(model_dir, device)
    size = artifact.preprocess.image_size
    transform = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(artifact.preprocess.mean, artifact.preprocess.std)])
    n, pending = 0, []
    with torch.inference_mode():
        for picture in pictures:
            pending.append(transform(picture))
            if len(pending) == batch_size:
                artifact.model(torch.stack(pending).to(device)).softmax(1).topk(3).values.cpu()
                n, pending = n + len(pending), []
        if pending:
            artifact.model(torch.stack(pending).to(device)).softmax(1).topk(3).values.cpu()
            n += len(pending)
    _sync(device)
    return n


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------- pipeline
class TreeMemory:
    """Peak summed PSS of this process and all its descendants, sampled in a thread.

    PSS (proportional set size) splits each shared page between the processes
    that map it, so Ray's shared-memory object store is counted once, not once
    per worker that reads from it (summed RSS counts it in every one). It is read
    from /proc/<pid>/smaps_rollup, which the kernel sums cheaply: walking the full
    smaps of every worker took most of a core. Still not free (see the module
    docstring), so the timed runs go without it.
    """

    def __init__(self, every_s: float = 0.5):
        self._every = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _sample(self) -> int:
        return sum(self._pss(pid) for pid in process_tree([os.getpid()]))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self._every)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bench_pipeline(model_dir: str, frames_dir: str, output: str, batch_size: int, use_gpu: bool) -> tuple[float, float]:
    """(frames/s, wall s) of label() on a fresh local Ray."""
    summary, _ = _run_pipeline(model_dir, frames_dir, output, batch_size, use_gpu, memory=None)
    return summary["frames_per_s"], summary["wall_time_s"]


def peak_memory(model_dir: str, frames_dir: str, output: str, batch_size: int, use_gpu: bool) -> int:
    """Peak PSS bytes of the process tree during a second, untimed run of label()."""
    _, memory = _run_pipeline(model_dir, frames_dir, output, batch_size, use_gpu, memory=TreeMemory())
    return memory.peak


def _run_pipeline(model_dir, frames_dir, output, batch_size, use_gpu, memory: TreeMemory | None):
    import contextlib

    import ray

    from simpsons_ray.label.config import LabelConfig
    from simpsons_ray.label.run import label

    shutil.rmtree(output, ignore_errors=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with memory or contextlib.nullcontext():
            summary = label(LabelConfig(model_uri=model_dir, frames_uri=frames_dir, output_uri=output, batch_size=batch_size, use_gpu=use_gpu))
    finally:
        ray.shutdown()
    return summary, memory


# -------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="source frames, ROOT/<character>/*.jpg (default %(default)s)")
    parser.add_argument("--frames-dir", default=os.path.join(tempfile.gettempdir(), "simpsons-ray-bench-label"), help="where the dumps and labels go (default %(default)s)")
    parser.add_argument("--episodes", type=int, default=4, help="episodes per dump, half folders, half tars (default %(default)s)")
    parser.add_argument("--frames-per-episode", type=int, default=5000, help="frames per episode at 1x (default %(default)s)")
    parser.add_argument("--scale", type=int, default=10, help="the second, bigger dump is this many times 1x (default %(default)s)")
    parser.add_argument("--arch", default="resnet18", help="model architecture (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=64, help="model input size (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="frames per forward pass, everywhere (default %(default)s)")
    parser.add_argument("--gpu", action="store_true", help="run every column on the GPU (bf16 + channels_last in the model-only and pipeline columns)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 episodes x 150 frames")
    parser.add_argument("--compare-objectives", action="store_true",
                        help="only the 1x pipeline, with a single-label and a multi-label artifact of the same weights, alternating")
    parser.add_argument("--repeats", type=int, default=2, help="--compare-objectives: runs of each (default %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.episodes, args.frames_per_episode = 2, 150
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if args.gpu else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)

    classes, images = source_images(args.data)
    work = args.frames_dir
    os.makedirs(work, exist_ok=True)
    model_dir = os.path.join(work, "model")
    torch.manual_seed(0)
    # Random weights: throughput does not depend on what the model learnt.
    save_artifact(model_dir, build_model(args.arch, len(classes)), args.arch, classes, PreprocessConfig(image_size=args.image_size))
    if args.compare_objectives:
        compare_objectives(args, classes, images, work, model_dir)
        return
    dump_1x = os.path.join(work, "frames-1x")
    dump_nx = os.path.join(work, f"frames-{args.scale}x")
    n1 = build_dump(dump_1x, images, args.episodes, args.frames_per_episode)
    nn = build_dump(dump_nx, images, args.episodes, args.frames_per_episode * args.scale)
    print(f"{args.arch} at {args.image_size}px, batch {args.batch_size}, {device}, {os.cpu_count()} CPUs; "
          f"1x = {n1:,} frames, {args.scale}x = {nn:,} frames in {args.episodes} episodes (half folders, half tars)", flush=True)

    def baselines() -> tuple[float, float]:
        model = bench_model_only(model_dir, dump_1x, args.batch_size, device)
        print(f"  model only     {model:9.1f} frames/s", flush=True)
        plain = bench_plain_loop(model_dir, dump_1x, args.batch_size, device)
        print(f"  plain loop     {plain:9.1f} frames/s", flush=True)
        return model, plain

    # Baselines before and after the pipeline runs, the faster of each kept: on a
    # machine whose load changes, that keeps the comparison on the safe side.
    model_fps, plain_fps = baselines()
    rows = []
    for label_name, dump, n in (("1x", dump_1x, n1), (f"{args.scale}x", dump_nx, nn)):
        output = os.path.join(work, f"labels-{label_name}")
        fps, wall = bench_pipeline(model_dir, dump, output, args.batch_size, args.gpu)
        print(f"  pipeline {label_name:>4} {fps:9.1f} frames/s  ({n:,} frames in {wall:.1f} s)", flush=True)
        peak = peak_memory(model_dir, dump, output, args.batch_size, args.gpu)
        print(f"  pipeline {label_name:>4} peak {peak / 2**30:.2f} GiB (a second run, sampled)", flush=True)
        rows.append((label_name, n, fps, peak, wall))
    model_again, plain_again = baselines()
    model_fps, plain_fps = max(model_fps, model_again), max(plain_fps, plain_again)

    print()
    print(f"{'':24}{'frames':>9}{'frames/s':>11}{'vs model':>10}{'vs plain':>10}{'peak PSS':>11}")
    print(f"{'model only (a)':24}{n1:>9,}{model_fps:>11.1f}{1.0:>10.2f}{model_fps / plain_fps:>10.2f}{'':>11}")
    print(f"{'plain loop (b)':24}{n1:>9,}{plain_fps:>11.1f}{plain_fps / model_fps:>10.2f}{1.0:>10.2f}{'':>11}")
    for name, n, fps, peak, _ in rows:
        print(f"{'simpsons-ray label ' + name:24}{n:>9,}{fps:>11.1f}{fps / model_fps:>10.2f}{fps / plain_fps:>10.2f}{peak / 2**30:>9.2f} G")
    growth = rows[1][3] / rows[0][3] - 1
    print(f"\npeak memory {rows[1][0]} vs {rows[0][0]}: {growth:+.1%}  (targets: label >= 0.8x model only, >= 1.0x plain loop; memory within 20%)")


def compare_objectives(args, classes, images, work: str, single_dir: str) -> None:
    """frames/s of `label` with the same weights as a single-label and as a multi-label artifact, alternating."""
    multi_dir = os.path.join(work, "model-multilabel")
    artifact = load_artifact(single_dir)
    save_artifact(multi_dir, artifact.model, args.arch, classes, PreprocessConfig(image_size=args.image_size),
                  inference={"objective": "multilabel", "thresholds": [0.5] * len(classes)})
    dump = os.path.join(work, "frames-1x")
    n = build_dump(dump, images, args.episodes, args.frames_per_episode)
    print(f"{args.arch} at {args.image_size}px, batch {args.batch_size}, {os.cpu_count()} CPUs; {n:,} frames in {args.episodes} episodes", flush=True)
    results: dict[str, list[float]] = {"single": [], "multilabel": []}
    for repeat in range(args.repeats):
        for objective, model_dir in (("single", single_dir), ("multilabel", multi_dir))[:: 1 if repeat % 2 == 0 else -1]:
            output = os.path.join(work, f"labels-{objective}")
            fps, wall = bench_pipeline(model_dir, dump, output, args.batch_size, args.gpu)
            results[objective].append(fps)
            print(f"  {objective:<10} run {repeat + 1}: {fps:8.1f} frames/s ({wall:.1f} s)", flush=True)
    single, multi = max(results["single"]), max(results["multilabel"])
    print(f"\nbest of {args.repeats}: single {single:.1f}, multilabel {multi:.1f} frames/s: {multi / single:.2f}x "
          f"(runs: single {', '.join(f'{v:.1f}' for v in results['single'])}; multilabel {', '.join(f'{v:.1f}' for v in results['multilabel'])})")


if __name__ == "__main__":
    main()
