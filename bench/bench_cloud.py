"""Cloud-scale benchmark: the driver's memory against the number of frames, the elastic pool, the first batch.

Three parts, each printing a table:

- ``listing``: the labeling driver's peak RSS and wall time on local dumps of
  empty frame files (every frame an error row: the listing, planning and
  bookkeeping are what is measured, not the model), from ``--small`` to
  ``--large`` frames in 100 folder episodes, for this checkout and, with
  ``--baseline DIR``, for another checkout of the project (e.g. a clone of the
  commit before). Each run is its own process with its own local Ray; the peak is
  the driver's ``ru_maxrss`` only (Ray's daemons and workers are other processes).
- ``autoscale``: a labeling job on Ray's fake autoscaler (tests/cluster_fixtures.py),
  a head with no CPUs and up to ``--max-nodes`` worker nodes of 2 CPUs: worker
  nodes and predictor actors over time, sampled every second.
- ``startup``: a 12,000-frame dump of real frames (../shared/data/simpsons-mnist)
  on a fresh local Ray: seconds from the call to the first labelled batch (Ray's
  start-up included) and the whole run, for this checkout and the baseline.

    python bench/bench_cloud.py listing                              # 10,000 and 1,000,000 frames
    python bench/bench_cloud.py autoscale
    python bench/bench_cloud.py startup
    # the commit before as a baseline, each in its own runs (no two Rays at once on 2 cores)
    git clone -q . /tmp/before && git -C /tmp/before checkout -q <commit>
    python bench/bench_cloud.py listing --baseline /tmp/before --baseline-only
    python bench/bench_cloud.py startup --baseline /tmp/before --baseline-only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "simpsons-mnist", "train")

# Runs in a fresh process with the checkout under test first on sys.path.
DRIVER = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
t0 = time.monotonic()
from simpsons_ray.label.config import LabelConfig
from simpsons_ray.label.run import label
summary = label(LabelConfig(model_uri=sys.argv[2], frames_uri=sys.argv[3], output_uri=sys.argv[4], batch_size=64))
print("RESULT " + json.dumps({
    "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "wall_s": time.monotonic() - t0,
    "frames": summary["frames_labelled"], "errors": summary["errors"],
    "first_batch_s": summary.get("first_batch_s"),
}))
"""


def save_model(path: str, classes: list[str], image_size: int = 32) -> None:
    import torch

    from simpsons_ray.model.artifact import save_artifact
    from simpsons_ray.model.network import build_model
    from simpsons_ray.model.preprocess import PreprocessConfig

    torch.manual_seed(0)
    save_artifact(path, build_model("resnet18", len(classes)), "resnet18", classes, PreprocessConfig(image_size=image_size))


def run_driver(checkout: str, model: str, frames: str, output: str) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": checkout}
    # cwd: Ray puts the driver's working directory on its workers' sys.path, ahead of PYTHONPATH.
    done = subprocess.run([sys.executable, "-c", DRIVER, checkout, model, frames, output], capture_output=True, text=True, env=env,
                          cwd=checkout)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"the labeling run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def empty_dump(root: str, frames: int, episodes: int = 100) -> float:
    """``frames`` empty files in ``episodes`` folders; returns the seconds it took."""
    started = time.monotonic()
    shutil.rmtree(root, ignore_errors=True)
    per = frames // episodes
    for e in range(episodes):
        folder = os.path.join(root, f"s01e{e:03d}")
        os.makedirs(folder)
        for i in range(per):
            open(os.path.join(folder, f"frame_{i:06d}.jpg"), "wb").close()
    return time.monotonic() - started


def bench_listing(args: argparse.Namespace, work: str) -> None:
    model = os.path.join(work, "model")
    save_model(model, ["a", "b"])
    checkouts = _checkouts(args)
    rows = []
    for frames in (args.small, args.large):
        dump = os.path.join(work, f"dump-{frames}")
        made = empty_dump(dump, frames)
        print(f"{frames:,} empty frames in 100 episodes written in {made:.0f} s", flush=True)
        for name, checkout in checkouts:
            result = run_driver(checkout, model, dump, os.path.join(work, "labels"))
            rows.append((name, frames, result))
            print(f"  {name:14s} {frames:>10,} frames  driver peak {result['peak_mib']:8.1f} MiB  wall {result['wall_s']:7.1f} s  "
                  f"error rows {result['errors']:,}", flush=True)
        shutil.rmtree(dump)
    print("\n| checkout | frames | error rows (one per empty frame) | driver peak RSS (MiB) | wall (s) |\n|---|---:|---:|---:|---:|")
    for name, frames, r in rows:
        print(f"| {name} | {frames:,} | {r['errors']:,} | {r['peak_mib']:.0f} | {r['wall_s']:.1f} |")
    for name, _ in checkouts:
        small, large = (r for n, _, r in rows if n == name)
        print(f"{name}: peak at {args.large:,} frames is {large['peak_mib'] / small['peak_mib']:.2f}x the peak at {args.small:,}")


def _checkouts(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The checkouts to run (each driver runs in its checkout: Ray's workers import from the driver's working directory)."""
    if args.baseline_only:
        return [("baseline", args.baseline)]
    return [("this checkout", REPO)] + ([("baseline", args.baseline)] if args.baseline else [])


def bench_autoscale(args: argparse.Namespace, work: str) -> None:
    import numpy as np

    from cluster_fixtures import FakeAutoscalingCluster
    from imagegen import write_tar
    from simpsons_ray.demo.synthetic import class_image, encode

    model = os.path.join(work, "model")
    save_model(model, ["a", "b", "c"])
    frames = os.path.join(work, "frames")
    os.makedirs(frames)
    rng = np.random.default_rng(0)
    for e in range(args.episodes):
        write_tar(os.path.join(frames, f"s01e{e:02d}.tar"),
                  {f"{i:05d}.jpg": encode(class_image(i % 3, rng, 40)) for i in range(args.frames_per_episode)})
    autoscaling = FakeAutoscalingCluster(worker_cpus=2, max_workers=args.max_nodes)
    timeline = []
    try:
        autoscaling.start()
        started = time.monotonic()
        with open(os.path.join(work, "job.log"), "w") as log:
            job = subprocess.Popen(
                [sys.executable, os.path.join(REPO, "jobs", "label.py"), "--model", model, "--frames", frames,
                 "--output", os.path.join(work, "labels"), "--batch-size", "16"],
                env=autoscaling.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            while job.poll() is None:
                timeline.append((time.monotonic() - started, autoscaling.worker_nodes(), autoscaling.actors("FramePredictor")))
                time.sleep(1.0)
        if job.returncode != 0:
            raise SystemExit(open(os.path.join(work, "job.log")).read()[-4000:])
    finally:
        autoscaling.stop()
    total = args.episodes * args.frames_per_episode
    print(f"\n{total:,} frames in {args.episodes} tar episodes, head with 0 CPUs, up to {args.max_nodes} worker nodes of 2 CPUs; "
          f"job wall {timeline[-1][0]:.0f} s")
    print("| t (s) | worker nodes | predictor actors |\n|---:|---:|---:|")
    last = None
    for t, nodes, actors in timeline:
        if (nodes, actors) != last:
            print(f"| {t:.0f} | {nodes} | {actors} |")
            last = (nodes, actors)
    print(f"most worker nodes {max(n for _, n, _ in timeline)}, most actors {max(a for _, _, a in timeline)}")


def bench_startup(args: argparse.Namespace, work: str) -> None:
    from bench_label import build_dump, source_images

    classes, images = source_images(args.data)
    model = os.path.join(work, "model")
    save_model(model, classes, 64)
    dump = os.path.join(work, "frames")
    n = build_dump(dump, images, 4, 3000)
    checkouts = _checkouts(args)
    print(f"{n:,} frames (4 episodes, half folders, half tars), resnet18 at 64 px, {os.cpu_count()} CPUs")
    print("| checkout | run | first labelled batch (s) | whole run (s) | frames/s |\n|---|---:|---:|---:|---:|")
    for repeat in range(args.repeats):
        for name, checkout in checkouts:
            r = run_driver(checkout, model, dump, os.path.join(work, "labels"))
            first = f"{r['first_batch_s']:.1f}" if r.get("first_batch_s") is not None else "n/a"
            print(f"| {name} | {repeat + 1} | {first} | {r['wall_s']:.1f} | {r['frames'] / r['wall_s']:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["listing", "autoscale", "startup"])
    parser.add_argument("--baseline", help="another checkout of the project to compare with (listing, startup)")
    parser.add_argument("--baseline-only", action="store_true", help="run only the baseline")
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--frames-per-episode", type=int, default=1500)
    parser.add_argument("--max-nodes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", default=DEFAULT_DATA)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-cloud-")
    try:
        {"listing": bench_listing, "autoscale": bench_autoscale, "startup": bench_startup}[args.part](args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
