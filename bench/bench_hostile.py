"""Hostile input before and after: broken episodes labelled from disk and from S3 (moto's server) by checkouts of this repository.

Inputs: a folder of good frames beside random bytes named .mp4 and .tar.gz, a video
cut at 40%, a .tar.gz whose first member inflates to 1 GiB, and a tar cut between
members. Each checkout labels them in a fresh process (2 s read ranges, 2 frames/s);
the table says what the job did and the rows and error rows of each input.

    python bench/bench_hostile.py MODEL_DIR before=/path/to/old/checkout,after=.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
PORT = int(os.environ.get("BENCH_S3_PORT", "5599"))
os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{PORT}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", "RAY_USAGE_STATS_ENABLED": "0"})

from imagegen import class_image, encode, upload_tree, write_tar, write_video  # noqa: E402

ROOT = os.path.join(tempfile.gettempdir(), "bench-hostile")
INPUTS = {
    "good": "good/ (6 JPEG frames)",
    "random_video": "random_video.mp4 (random bytes)",
    "cut_video": "cut_video.mkv (8 s video cut at 40%)",
    "random_archive": "random_archive.tar.gz (random bytes)",
    "bomb": "bomb.tar.gz (a member inflating to 1 GiB, then a good one)",
    "cut_archive": "cut_archive.tar (cut after its 5th member)",
}
LABEL = r'''
import json, logging, sys
logging.basicConfig(level=logging.ERROR)
import ray
from simpsons_ray.label.config import LabelConfig
from simpsons_ray.label.run import label
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
s = label(LabelConfig(model_uri=sys.argv[1], frames_uri=sys.argv[2], output_uri=sys.argv[3], sample_fps=2.0, seconds_per_read_task=2.0))
print("SUMMARY", json.dumps({"frames": s["frames_labelled"], "errors": s["errors"]}))
'''


class _Zeros(io.RawIOBase):
    """1 GiB of zeros, never held: a member that inflates a thousandfold."""

    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def build(folder: str) -> None:
    rng = np.random.default_rng(26)
    os.makedirs(f"{folder}/good")
    for i in range(6):
        open(f"{folder}/good/frame_{i:04d}.jpg", "wb").write(encode(class_image(i % 4, rng, 64)))
    open(f"{folder}/random_video.mp4", "wb").write(rng.bytes(50_000))
    open(f"{folder}/random_archive.tar.gz", "wb").write(rng.bytes(50_000))
    write_video(f"{ROOT}/whole.mkv", [class_image(i // 12 % 4, rng, 64) for i in range(96)], fps=12)
    data = open(f"{ROOT}/whole.mkv", "rb").read()
    open(f"{folder}/cut_video.mkv", "wb").write(data[: len(data) * 2 // 5])
    buffer = io.BytesIO()
    good = encode(class_image(1, rng, 64))
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        big = tarfile.TarInfo("f/0001.jpg")
        big.size = 1 << 30
        tar.addfile(big, io.BufferedReader(_Zeros(big.size), 1 << 20))
        small = tarfile.TarInfo("f/0002.jpg")
        small.size = len(good)
        tar.addfile(small, io.BytesIO(good))
    open(f"{folder}/bomb.tar.gz", "wb").write(gzip.compress(buffer.getvalue(), 6))
    write_tar(f"{ROOT}/whole.tar", {f"f/{i:04d}.jpg": encode(class_image(i % 4, rng, 64)) for i in range(8)})
    with tarfile.open(f"{ROOT}/whole.tar") as tar:
        fifth = tar.getmembers()[4]
    data = open(f"{ROOT}/whole.tar", "rb").read()
    open(f"{folder}/cut_archive.tar", "wb").write(data[: fifth.offset_data + (fifth.size + 511) // 512 * 512])  # the next header is gone


def counts(output: str) -> tuple[dict, dict]:
    """Rows and error rows per episode of a labels output (empty where the job wrote none)."""
    import pyarrow.dataset as pads

    rows, errors = {}, {}
    labels = pads.dataset(output, format="parquet", partitioning="hive", ignore_prefixes=["_", "."]) if os.path.isdir(output) else None
    if labels is not None and labels.files:
        rows = labels.to_table(columns=["episode"]).to_pandas()["episode"].value_counts().to_dict()
    if os.path.isdir(os.path.join(output, "_errors")):
        errors = pads.dataset(os.path.join(output, "_errors"), format="parquet").to_table().to_pandas()["episode"].value_counts().to_dict()
    return rows, errors


def run(model: str, tree: str, frames: str, output: str, local_copy: str) -> dict:
    """One checkout labels the inputs in a fresh process; what the job did and what it wrote."""
    started = time.time()
    done = subprocess.run([sys.executable, "-c", LABEL, model, frames, output], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": tree}, cwd=tree, timeout=900)
    if output.startswith("s3://"):
        import pyarrow.fs as pafs

        try:
            pafs.copy_files(output, local_copy)
        except OSError:
            pass  # the job wrote nothing
        output = local_copy
    rows, errors = counts(output)
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return {"rc": done.returncode, "rows": rows, "errors": errors, "s": round(time.time() - started, 1),
            "last": lines[-1][:160] if done.returncode and lines else ""}


def main() -> None:
    import boto3

    model = os.path.abspath(sys.argv[1])
    trees = {name: os.path.abspath(path) for name, path in (t.split("=", 1) for t in sys.argv[2].split(","))}
    shutil.rmtree(ROOT, ignore_errors=True)
    build(f"{ROOT}/frames")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    results = {}
    try:
        client = boto3.client("s3")
        bucket = f"hostile-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        s3_frames = upload_tree(client, bucket, f"{ROOT}/frames", "frames")
        for name, tree in trees.items():
            key = name.split(" ")[0]
            results[(name, "local")] = run(model, tree, f"{ROOT}/frames", f"{ROOT}/out-{key}", "")
            results[(name, "S3")] = run(model, tree, s3_frames, f"s3://{bucket}/out-{key}", f"{ROOT}/s3-out-{key}")
            for where in ("local", "S3"):
                print(name, where, json.dumps(results[(name, where)]), flush=True)
    finally:
        server.terminate()
    print("\n| input | " + " | ".join(f"{name}, {where}" for name, where in results) + " |")
    print("|---|" + "---|" * len(results))
    print("| the job | " + " | ".join(f"exit {r['rc']}" + (f": {r['last']}" if r["last"] else "") + f" ({r['s']} s)"
                                      for r in results.values()) + " |")
    for episode, shown in INPUTS.items():
        print(f"| {shown} | " + " | ".join(f"{r['rows'].get(episode, 0)} rows, {r['errors'].get(episode, 0)} error rows"
                                          for r in results.values()) + " |")


if __name__ == "__main__":
    main()
