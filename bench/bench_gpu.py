"""GPU benchmark: labeling, JPEG decoding and training on one CUDA device, each beside its baseline.

Three side-by-side measurements, all ResNet50 at 224 px unless told otherwise:

1. label: ``simpsons_ray.label.run.label`` with ``use_gpu=True`` (read, header
   checks on CPU, JPEG decode and the model in the predictor actor on the GPU,
   Parquet), end to end on a local Ray with every CPU of the machine, beside the
   model alone: the predictor's bf16 channels_last forward pass on batches already
   on the GPU. Target: end to end >= 0.8x model-only. Then the same with
   ``decode="tasks"`` (PIL in CPU tasks), to check that the default is the faster.
2. decode: JPEG decode + resize to 224 px with ``torchvision.io.decode_jpeg(device="cuda")``
   (nvJPEG, batched) beside the CPU path the pipeline uses (PIL, all cores in threads).
3. train: training images/s of the project's ``train_one_epoch`` on one GPU (bf16
   autocast, channels_last, normalisation on the GPU) beside a plain single-GPU
   PyTorch loop (fp32, NCHW, the same model, optimizer and batch). Inputs are
   random tensors already on the GPU, so both measure the GPU, not the input pipeline.

    python bench/bench_gpu.py                  # the full run (a few minutes on an A10G / L4)
    python bench/bench_gpu.py --quick          # a smoke run: fewer frames and steps
    python bench/bench_gpu.py --device cpu --quick --arch resnet18 --image-size 64
                                               # checks the script itself on a machine without a GPU

Without a CUDA device (and without ``--device cpu``) it prints why nothing was
measured and exits with status 0. Record the printed table in bench/RESULTS.md
with the date, the GPU, the driver and the versions it prints.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: fewer frames and steps")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only checks the script (default cuda)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--frame-size", default="720x480", help="WxH of the generated JPEG frames (default: DVD frames)")
    p.add_argument("--frames", type=int, help="frames labelled end to end (default 20,000; --quick 1,000)")
    p.add_argument("--batch-size", type=int, default=256, help="labeling batch (default %(default)s)")
    p.add_argument("--train-batch-size", type=int, default=64, help="training batch (default %(default)s)")
    p.add_argument("--train-steps", type=int, help="timed training steps (default 50; --quick 5)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- inputs
def make_jpegs(count: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """Distinct JPEG frames of the generated characters at frame size (quality 90)."""
    from PIL import Image

    from simpsons_ray.demo.synthetic import class_image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        img = class_image(i % 6, rng, size=max(width, height)).resize((width, height), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_dump(root: str, jpegs: list[bytes], frames: int, episodes: int = 4) -> None:
    """``episodes`` folders sharing ``frames`` frames; distinct JPEGs repeat (decode cost is per frame)."""
    per_episode = -(-frames // episodes)
    n = 0
    for e in range(episodes):
        folder = os.path.join(root, f"e{e:02d}")
        os.makedirs(folder)
        for i in range(min(per_episode, frames - n)):
            with open(os.path.join(folder, f"frame_{i:06d}.jpg"), "wb") as f:
                f.write(jpegs[(n + i) % len(jpegs)])
        n += per_episode


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def items_per_s(step, device, steps: int, warmup: int, items_per_step: int) -> float:
    """Rate of ``step()`` after ``warmup`` untimed calls; synchronises so GPU work is counted."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * items_per_step / (time.perf_counter() - start)


# -------------------------------------------------------------------------- 1. label
def bench_label(args, device, jpegs, workdir) -> list[tuple[str, float, str]]:
    import ray
    import torch

    from simpsons_ray.label.config import LabelConfig
    from simpsons_ray.label.predictor import FramePredictor
    from simpsons_ray.label.run import label
    from simpsons_ray.model.artifact import save_artifact
    from simpsons_ray.model.network import build_model
    from simpsons_ray.model.preprocess import PreprocessConfig

    frames = args.frames or (1000 if args.quick else 20000)
    classes = [f"c{i}" for i in range(40)]  # about the number of characters in the Kaggle set
    model_dir = os.path.join(workdir, "model")
    save_artifact(model_dir, build_model(args.arch, len(classes)), args.arch, classes, PreprocessConfig(image_size=args.image_size))

    # Model only: the predictor's own forward pass on a batch already on the device.
    predictor = FramePredictor(model_dir, top_k=3, device=device.type)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if predictor.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    steps = 5 if args.quick else 30

    def forward():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=predictor.mixed_precision):
            predictor.model(x).float().softmax(1).topk(3, dim=1)

    model_only = items_per_s(forward, device, steps, warmup=3, items_per_step=args.batch_size)
    predictor = x = None  # frees the device memory before the pipeline runs (forward() is done with them)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    dump = os.path.join(workdir, "frames")
    write_dump(dump, jpegs, frames)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    rates = {}
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        # Both decode paths: JPEGs decoded by the predictor (decode_jpeg on the
        # device, what --gpu picks by itself) and by CPU tasks with PIL.
        for decode in ("predictor", "tasks"):
            summary = label(
                LabelConfig(
                    model_uri=model_dir,
                    frames_uri=dump,
                    output_uri=os.path.join(workdir, f"labels-{decode}"),
                    batch_size=args.batch_size,
                    num_workers=max(1, gpus) if device.type == "cuda" else 1,
                    use_gpu=device.type == "cuda",
                    decode=decode,
                )
            )
            rates[decode] = summary["frames_labelled"] / summary["wall_time_s"]
    finally:
        ray.shutdown()
    scale = max(1, gpus) if device.type == "cuda" else 1
    note = f"{frames:,} frames of {args.frame_size}, {scale} predictor(s), actor start-up included"
    return [
        (f"label {args.arch} {args.image_size}px: model-only forward (frames/s, one device)", model_only, ""),
        (f"label {args.arch} {args.image_size}px: end to end, JPEG decoded by the predictor (frames/s per device)",
         rates["predictor"] / scale, note + "; the --gpu default"),
        ("  end to end / model-only", rates["predictor"] / scale / model_only, "target >= 0.8"),
        (f"label {args.arch} {args.image_size}px: end to end, decoded by CPU tasks (frames/s per device)",
         rates["tasks"] / scale, "--decode tasks"),
        ("  predictor decode / CPU-task decode", rates["predictor"] / rates["tasks"], "> 1: the default is the faster path"),
    ]


# ------------------------------------------------------------------------- 2. decode
def bench_decode(args, device, jpegs) -> list[tuple[str, float, str]]:
    import torch
    import torchvision
    from torch.nn import functional as F

    from simpsons_ray.model.preprocess import load_resized

    size = args.image_size
    count = 256 if args.quick else 2048
    data = [jpegs[i % len(jpegs)] for i in range(count)]

    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda b: load_resized(b, size), data[:threads * 2]))  # warm-up
        start = time.perf_counter()
        list(pool.map(lambda b: load_resized(b, size), data))
        cpu_rate = count / (time.perf_counter() - start)

    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    batch = 64

    def gpu_decode(chunk):
        images = torchvision.io.decode_jpeg(chunk, mode=torchvision.io.ImageReadMode.RGB, device=device)
        return torch.stack([F.interpolate(im.unsqueeze(0).float(), size=(size, size), mode="bilinear", antialias=True)[0] for im in images])

    gpu_decode(encoded[:batch])
    sync(device)
    start = time.perf_counter()
    for i in range(0, count, batch):
        gpu_decode(encoded[i : i + batch])
    sync(device)
    gpu_rate = count / (time.perf_counter() - start)
    return [
        (f"decode+resize {args.frame_size} JPEG -> {size}px: CPU, PIL, {threads} threads (images/s)", cpu_rate, "the labeling pipeline's path"),
        (f"decode+resize {args.frame_size} JPEG -> {size}px: decode_jpeg(device={device.type!r}) batched (images/s)", gpu_rate, f"batches of {batch}"),
        ("  device / CPU", gpu_rate / cpu_rate, ""),
    ]


# -------------------------------------------------------------------------- 3. train
def bench_train(args, device) -> list[tuple[str, float, str]]:
    import torch
    from torch import nn

    from simpsons_ray.model.network import build_model
    from simpsons_ray.model.preprocess import PreprocessConfig, normalize
    from simpsons_ray.train.steps import train_one_epoch

    steps = args.train_steps or (5 if args.quick else 50)
    warmup = 2 if args.quick else 10
    n, size, classes = args.train_batch_size, args.image_size, 40
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=generator).to(device)
    labels = torch.randint(0, classes, (n,), generator=generator).to(device)
    preprocess = PreprocessConfig(image_size=size)

    # Plain: fp32, NCHW, the textbook loop.
    torch.manual_seed(0)
    model = build_model(args.arch, classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    x = normalize(images, preprocess).to(device)
    model.train()

    def plain_step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    plain_rate = items_per_s(plain_step, device, steps, warmup, items_per_step=n)
    model = optimizer = x = None  # frees the device memory before the next measurement
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # The project's step: bf16 autocast + channels_last on CUDA, uint8 in, normalised on the device.
    torch.manual_seed(0)
    model = build_model(args.arch, classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_one_epoch(model, [{"image": images, "label": labels}] * warmup, optimizer, device, preprocess)
    sync(device)
    stats = train_one_epoch(model, [{"image": images, "label": labels}] * steps, optimizer, device, preprocess)
    sync(device)
    ours = stats.count / stats.seconds
    mode = "bf16 + channels_last" if device.type == "cuda" else "fp32 (no autocast on CPU)"
    return [
        (f"train {args.arch} {size}px: plain fp32 NCHW loop (images/s)", plain_rate, f"batch {n}"),
        (f"train {args.arch} {size}px: train_one_epoch, {mode} (images/s)", ours, f"batch {n}"),
        ("  ours / plain", ours / plain_rate, ""),
    ]


# --------------------------------------------------------------------------- main
def describe(device) -> str:
    import ray
    import torch
    import torchvision

    gpu = "none"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return (
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; GPU {gpu}; CPU {os.cpu_count()} cores "
        f"({platform.processor() or platform.machine()}); Python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, ray {ray.__version__}"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device on this machine, so nothing was measured; run it on a GPU node "
              "(or pass --device cpu to check the script itself).")
        return 0
    device = torch.device(args.device)
    width, height = (int(v) for v in args.frame_size.lower().split("x"))
    print(describe(device), flush=True)
    jpegs = make_jpegs(32, width, height)
    rows: list[tuple[str, float, str]] = []
    workdir = tempfile.mkdtemp(prefix="bench-gpu-")
    try:
        for bench in (lambda: bench_decode(args, device, jpegs), lambda: bench_train(args, device), lambda: bench_label(args, device, jpegs, workdir)):
            rows += bench()
            print("\n".join(f"{name:<92} {value:>10,.2f}  {note}" for name, value, note in rows[-3:]), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"| {'measurement':<90} | {'value':>10} | note |")
    print(f"|{'-' * 92}|{'-' * 12}|------|")
    for name, value, note in rows:
        print(f"| {name.strip():<90} | {value:>10,.2f} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
