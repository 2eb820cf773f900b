"""Which video decoder: PyAV beside decord (Ray Data's read_videos) and torchcodec, on one video.

Each decodes every frame of the same H.264 file into uint8 RGB at the model's
input size, single-threaded, reading from a Python file object (as from S3), then
seeks to the middle and decodes 24 frames. A decoder that will not install or load
on this machine is reported as such: that is a result too (the project must
install on a fresh machine with no system FFmpeg).

    python bench/bench_decoders.py VIDEO.mp4 [--size 64] [--repeats 2]
    PYTHONPATH=/path/to/decord:/path/to/torchcodec python bench/bench_decoders.py VIDEO.mp4
"""

from __future__ import annotations

import argparse
import io
import os
import time


def pyav(path: str, size: int, seek_s: float) -> tuple[int, float]:
    import av
    from av.video.reformatter import VideoReformatter

    scaler = VideoReformatter()  # as simpsons_ray.media.video does: one scaler, not one per frame
    with open(path, "rb") as f, av.open(f) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        t = time.perf_counter()
        n = sum(1 for frame in container.decode(stream)
                if scaler.reformat(frame, width=size, height=size, format="rgb24", interpolation="BILINEAR").to_ndarray() is not None)
        decode_s = time.perf_counter() - t
        t = time.perf_counter()
        container.seek(int(seek_s / stream.time_base), stream=stream, backward=True)
        for i, frame in enumerate(container.decode(stream)):
            if i == 24:
                break
        return n, decode_s, time.perf_counter() - t


def decord(path: str, size: int, seek_s: float) -> tuple[int, float]:
    from decord import VideoReader, cpu

    with open(path, "rb") as f:
        reader = VideoReader(f, ctx=cpu(0), width=size, height=size, num_threads=1)
        t = time.perf_counter()
        n = 0
        for frame in reader:
            frame.asnumpy()
            n += 1
        decode_s = time.perf_counter() - t
        t = time.perf_counter()
        start = int(seek_s * reader.get_avg_fps())
        reader.get_batch(list(range(start, start + 24))).asnumpy()
        return n, decode_s, time.perf_counter() - t


def torchcodec(path: str, size: int, seek_s: float) -> tuple[int, float]:
    import torch
    from torchcodec.decoders import VideoDecoder
    from torchvision.transforms.v2 import functional as F

    with open(path, "rb") as f:
        decoder = VideoDecoder(io.BufferedReader(f), num_ffmpeg_threads=1, device="cpu")
        t = time.perf_counter()
        n = 0
        for frame in decoder:
            F.resize(frame, [size, size], antialias=True)
            n += 1
        decode_s = time.perf_counter() - t
        t = time.perf_counter()
        start = int(seek_s * decoder.metadata.average_fps)
        decoder.get_frames_in_range(start, start + 24)
        del torch
        return n, decode_s, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"{os.path.basename(args.video)}, every frame to {args.size}x{args.size} RGB, one thread; best of {args.repeats}")
    print(f"{'decoder':12}{'frames':>8}{'frames/s':>10}{'seek + 24 frames':>18}  note")
    for name, fn in (("pyav", pyav), ("decord", decord), ("torchcodec", torchcodec)):
        try:
            runs = [fn(args.video, args.size, 150.0) for _ in range(args.repeats)]
        except Exception as exc:  # an import or load failure is the finding
            print(f"{name:12}{'-':>8}{'-':>10}{'-':>18}  unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}")
            continue
        n = runs[0][0]
        best = min(r[1] for r in runs)
        seek = min(r[2] for r in runs)
        print(f"{name:12}{n:>8,}{n / best:>10.1f}{seek * 1000:>15.0f} ms")


if __name__ == "__main__":
    main()
