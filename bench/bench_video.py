"""Video benchmark: `simpsons-ray label` on video files beside a plain PyAV loop and an extract-then-label route.

Generates H.264 videos from real frames (../shared/data/simpsons-kaggle/train by
default: one picture every two seconds, panned a little every frame so the encoder
has motion to code): ``--minutes`` long at 640x480 and at 1280x720, 24 fps. Then,
for each video and at ``--sample-fps`` and at every frame, on the same machine:

- plain loop: one process, PyAV decode (FFmpeg's own threads), the kept frames to
  PIL, torchvision Resize/ToTensor/Normalize, batches of ``--batch-size``, forward
  of the model as loaded;
- pipeline: ``simpsons_ray.label.run.label`` on the video on a fresh local Ray with
  all the machine's CPUs (Ray's own start excluded, actor start-up included);
- extract + label: what users do today, ffmpeg-style: decode the video, write the
  kept frames as full-size JPEGs (quality 90) into a folder, then ``label`` the
  folder; the extraction time is included.

Then the peak memory (PSS of the whole process tree, as bench_label.py measures
it) of the pipeline at ``--sample-fps`` on the 640x480 video and on one ``--scale``
times longer (the same video played over and over, remuxed).

    python bench/bench_video.py                     # 5 minutes, resnet18 at 64 px, 4 frames/s and all
    python bench/bench_video.py --quick             # 20 seconds: a smoke run
    python bench/bench_video.py --arch resnet50 --image-size 224 --gpu   # on a GPU machine
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.join(REPO, "tests"))

from bench_label import TreeMemory, label_plainly  # noqa: E402

from simpsons_ray.media import video as video_lib  # noqa: E402
from simpsons_ray.model.artifact import save_artifact  # noqa: E402
from simpsons_ray.model.network import build_model  # noqa: E402
from simpsons_ray.model.preprocess import PreprocessConfig  # noqa: E402

DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "simpsons-kaggle", "train")
FPS = 24


# ------------------------------------------------------------------------ inputs
def source_pictures(data_dir: str, count: int) -> list:
    """``count`` real pictures, spread over the characters, in a fixed order."""
    from PIL import Image

    paths = []
    for name in sorted(os.listdir(data_dir)):
        folder = os.path.join(data_dir, name)
        if os.path.isdir(folder):
            paths += [os.path.join(folder, f) for f in sorted(os.listdir(folder))[:8]]
    if not paths:
        raise SystemExit(f"no images under {data_dir}: pass --data ROOT/<character>/*.jpg")
    step = max(1, len(paths) // count)
    return [Image.open(p).convert("RGB") for p in paths[::step][:count]]


def write_video(path: str, pictures: list, seconds: float, size: tuple[int, int]) -> int:
    """H.264 at 24 fps: each picture for 2 s, scaled to cover the frame and panned 2 px a frame."""
    import av

    w, h = size
    covers = []
    for picture in pictures:
        scale = max((w + 2 * FPS * 2) / picture.width, h / picture.height)
        covers.append(np.asarray(picture.resize((int(picture.width * scale) + 1, int(picture.height * scale) + 1))))
    frames = int(seconds * FPS)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(frames):
            cover = covers[(i // (2 * FPS)) % len(covers)]
            x = 2 * (i % (2 * FPS))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(cover[:h, x : x + w]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return frames


def repeat_video(src: str, dst: str, times: int) -> None:
    """``src`` played ``times`` times over, remuxed (no re-encoding: each copy starts on its keyframe)."""
    import av

    with av.open(src) as inp, av.open(dst, "w") as out:
        in_stream = inp.streams.video[0]
        out_stream = out.add_stream_from_template(in_stream)
        length = None
        for k in range(times):
            inp.seek(0)
            last = 0
            for packet in inp.demux(in_stream):
                if packet.dts is None:
                    continue
                if length is None or k == 0:
                    last = max(last, packet.pts + packet.duration)
                shift = k * (length or 0)
                packet.pts += shift
                packet.dts += shift
                packet.stream = out_stream
                out.mux(packet)
            length = length or last


# --------------------------------------------------------------------- baselines
def kept(timestamp: float, last_bucket: list, sample_fps: float | None) -> bool:
    """The pipeline's rule: the first frame of each 1/F s interval."""
    if sample_fps is None:
        return True
    bucket = int(np.floor(timestamp * sample_fps + 1e-9))
    if bucket == last_bucket[0]:
        return False
    last_bucket[0] = bucket
    return True


def plain_loop(model_dir: str, path: str, sample_fps: float | None, batch_size: int, device: str) -> tuple[int, float]:
    """(frames labelled, frames/s) of one process: PyAV decode, PIL + torchvision transforms, forward."""
    import av

    start = time.perf_counter()

    def pictures():
        last = [None]
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if kept(float(frame.pts * stream.time_base), last, sample_fps):
                    yield frame.to_image()

    n = label_plainly(pictures(), model_dir, batch_size, device)
    return n, n / (time.perf_counter() - start)


def extract_jpegs(path: str, folder: str, sample_fps: float | None) -> int:
    """ffmpeg -i VIDEO -vf fps=F -q:v 2 FOLDER/%06d.jpg, done with PyAV: the kept frames as full-size JPEGs."""
    import av

    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    n, last = 0, [None]
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if not kept(float(frame.pts * stream.time_base), last, sample_fps):
                continue
            n += 1
            frame.to_image().save(os.path.join(folder, f"{n:06d}.jpg"), quality=90)
    return n


# ---------------------------------------------------------------------- pipeline
def pipeline(model_dir: str, frames_uri: str, output: str, sample_fps: float | None, batch_size: int, use_gpu: bool,
             memory: TreeMemory | None = None, **fps_kwargs) -> dict:
    """label()'s summary, on a fresh local Ray."""
    import contextlib

    import ray

    from simpsons_ray.label.config import LabelConfig
    from simpsons_ray.label.run import label

    shutil.rmtree(output, ignore_errors=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with memory or contextlib.nullcontext():
            return label(LabelConfig(model_uri=model_dir, frames_uri=frames_uri, output_uri=output, sample_fps=sample_fps,
                                     batch_size=batch_size, use_gpu=use_gpu, **fps_kwargs))
    finally:
        ray.shutdown()


# -------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="source pictures, ROOT/<character>/*.jpg (default %(default)s)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "simpsons-ray-bench-video"))
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the videos (default %(default)s)")
    parser.add_argument("--scale", type=int, default=10, help="the memory run's long video is this many times longer (default %(default)s)")
    parser.add_argument("--sample-fps", type=float, default=video_lib.DEFAULT_SAMPLE_FPS, help="(default %(default)s)")
    parser.add_argument("--arch", default="resnet18", help="(default %(default)s)")
    parser.add_argument("--image-size", type=int, default=64, help="model input size (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default %(default)s)")
    parser.add_argument("--sizes", nargs="+", default=["640x480", "1280x720"])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the 1x / 10x memory runs")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 s videos, 3x for memory")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.scale = 1 / 3, 3
    logging.basicConfig(level=logging.WARNING)
    device = "cuda" if args.gpu else "cpu"
    torch.set_num_threads(os.cpu_count() or 1)
    work = args.work_dir
    os.makedirs(work, exist_ok=True)

    pictures = source_pictures(args.data, 40)
    model_dir = os.path.join(work, "model")
    torch.manual_seed(0)
    # Random weights: throughput does not depend on what the model learnt.
    save_artifact(model_dir, build_model(args.arch, 42), args.arch, [f"c{i}" for i in range(42)], PreprocessConfig(image_size=args.image_size))
    seconds = args.minutes * 60
    print(f"{args.arch} at {args.image_size}px, batch {args.batch_size}, {device}, {os.cpu_count()} CPUs; "
          f"{seconds:.0f} s H.264 videos at {FPS} fps; sampling {args.sample_fps:g} frames/s and every frame", flush=True)

    rows = []
    for size_text in args.sizes:
        size = tuple(int(v) for v in size_text.split("x"))
        folder = os.path.join(work, f"video-{size_text}")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        path = os.path.join(folder, f"ep-{size_text}.mp4")
        t = time.perf_counter()
        total = write_video(path, pictures, seconds, size)
        print(f"  wrote {path}: {total:,} frames, {os.path.getsize(path) / 2**20:.1f} MiB in {time.perf_counter() - t:.0f} s", flush=True)
        for rate in (args.sample_fps, None):
            rate_text = f"{rate:g}/s" if rate else "all"
            n_plain, plain_fps = plain_loop(model_dir, path, rate, args.batch_size, device)
            print(f"  {size_text} {rate_text:>5} plain loop      {plain_fps:8.1f} frames/s ({n_plain:,} frames)", flush=True)
            summary = pipeline(model_dir, folder, os.path.join(work, "labels"), rate, args.batch_size, args.gpu)
            assert summary["frames_labelled"] == n_plain and summary["errors"] == 0, summary
            print(f"  {size_text} {rate_text:>5} pipeline        {summary['frames_per_s']:8.1f} frames/s", flush=True)
            t = time.perf_counter()
            dump = os.path.join(work, "dump")
            n_dump = extract_jpegs(path, os.path.join(dump, "ep"), rate)
            extract_s = time.perf_counter() - t
            dumped = pipeline(model_dir, dump, os.path.join(work, "labels-dump"), None, args.batch_size, args.gpu)
            route_fps = n_dump / (extract_s + dumped["wall_time_s"])
            print(f"  {size_text} {rate_text:>5} extract + label {route_fps:8.1f} frames/s (extraction {extract_s:.0f} s, label "
                  f"{dumped['wall_time_s']:.0f} s)", flush=True)
            shutil.rmtree(dump, ignore_errors=True)
            rows.append((size_text, rate_text, n_plain, plain_fps, summary["frames_per_s"], route_fps))

    print()
    print(f"{'video':10}{'kept':>6}{'frames':>8}{'plain loop':>12}{'pipeline':>10}{'extract+label':>15}{'vs plain':>10}{'vs extract':>12}")
    for size_text, rate_text, n, plain_fps, fps, route_fps in rows:
        print(f"{size_text:10}{rate_text:>6}{n:>8,}{plain_fps:>12.1f}{fps:>10.1f}{route_fps:>15.1f}{fps / plain_fps:>10.2f}{fps / route_fps:>12.2f}")
    print("(frames/s of labelled frames, decoding included; targets: pipeline >= 0.9x plain loop, faster than extract + label)")

    if args.no_memory:
        return
    peaks = []
    one = os.path.join(work, "memory-1x.mp4")
    write_video(one, pictures, seconds, (640, 480))
    for scale in (1, args.scale):
        folder = os.path.join(work, f"memory-{scale}x")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        path = os.path.join(folder, f"ep-{scale}x.mp4")
        repeat_video(one, path, scale)
        _, plain_fps = plain_loop(model_dir, path, args.sample_fps, args.batch_size, device)
        fps = pipeline(model_dir, folder, os.path.join(work, "labels-memory"), args.sample_fps, args.batch_size, args.gpu)["frames_per_s"]
        memory = TreeMemory()  # a second, untimed run: sampling every worker's memory slows the run it samples
        summary = pipeline(model_dir, folder, os.path.join(work, "labels-memory"), args.sample_fps, args.batch_size, args.gpu, memory=memory)
        peaks.append((scale, summary["frames_labelled"], plain_fps, fps, memory.peak))
        print(f"  {scale}x: plain loop {plain_fps:.1f} frames/s, pipeline {fps:.1f} frames/s, peak {memory.peak / 2**30:.2f} GiB", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    print()
    print(f"{'640x480 at ' + format(args.sample_fps, 'g') + '/s':22}{'frames':>9}{'plain loop':>12}{'pipeline':>10}{'vs plain':>10}{'peak PSS':>11}")
    for scale, n, plain_fps, fps, peak in peaks:
        print(f"{str(scale) + 'x (' + format(seconds * scale / 60, 'g') + ' min)':22}{n:>9,}{plain_fps:>12.1f}{fps:>10.1f}"
              f"{fps / plain_fps:>10.2f}{peak / 2**30:>9.2f} G")
    print(f"peak memory {args.scale}x vs 1x: {peaks[1][4] / peaks[0][4] - 1:+.1%} (target: within 20%)")


if __name__ == "__main__":
    main()
