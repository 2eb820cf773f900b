"""Queries on a big labels output: simpsons_ray.query beside a naive pandas.read_parquet.

Generates a labels dataset in the exact layout the labeling job writes (100 episodes
x 30,000 frames = 3 million rows by default; zstd Parquet, one file per episode,
five top labels per row), then measures each query in a fresh Python process:

- time: wall-clock of the query alone, after imports (median of --repeats runs);
- peak memory: the process's ru_maxrss (peak resident set) at the end, and the same
  minus the peak of a process that only did the imports ("above imports").

The naive side reads the whole dataset with ``pandas.read_parquet(OUT)`` and then
does the same groupby or filter in pandas; both sides' answers are compared before
any number is printed.

    python bench/bench_query.py                 # 3M rows in a temp dir (a few minutes)
    python bench/bench_query.py --quick         # 10 x 3,000 rows, one run each: a smoke test
    python bench/bench_query.py --dir /data/labels-bench --keep   # reuse a generated dataset
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CHARACTERS = [
    "homer_simpson", "marge_simpson", "bart_simpson", "lisa_simpson", "maggie_simpson",
    "abraham_grampa_simpson", "ned_flanders", "moe_szyslak", "krusty_the_clown", "milhouse_van_houten",
    "charles_montgomery_burns", "waylon_smithers", "chief_wiggum", "principal_skinner", "apu_nahasapeemapetilon",
    "sideshow_bob", "comic_book_guy", "edna_krabappel", "nelson_muntz", "lenny_leonard",
]
FPS = 24.0
MIN_CONFIDENCE = 0.5
FRAMES_EPISODE = "s03e07"  # the one-episode query: in the middle, not the first file listed
FRAMES_CHARACTER = "ned_flanders"


# ------------------------------------------------------------------------ dataset
def generate(root: str, episodes: int, frames_per_episode: int, seed: int = 0) -> None:
    """episode=<id>/part-0.parquet files in LABELS_FILE_SCHEMA, as the labeling job writes them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from simpsons_ray.labels import schema

    rng = np.random.default_rng(seed)
    classes = pa.array(CHARACTERS, pa.string())
    top_k = 5
    for e in range(episodes):
        episode = f"s{e // 22 + 1:02d}e{e % 22 + 1:02d}"
        n = frames_per_episode
        # Characters in runs of 1-10 s, a third of the time nobody sure enough.
        runs = rng.integers(24, 240, size=n // 24 + 1)
        who = rng.integers(0, len(CHARACTERS), size=len(runs))
        top1 = np.repeat(who, runs)[:n]
        confidence = rng.beta(5, 2, size=n).astype(np.float32)
        top_indices = (top1[:, None] + rng.integers(0, len(CHARACTERS), size=(n, top_k)) * (np.arange(top_k) > 0)) % len(CHARACTERS)
        scores = np.sort(rng.dirichlet(np.ones(top_k), size=n).astype(np.float32), axis=1)[:, ::-1].copy()
        scores[:, 0] = confidence
        labels = classes.take(pa.array(top1))
        labels = pc.if_else(pa.array(confidence >= 0.3), labels, pa.scalar(None, pa.string()))
        offsets = pa.array(np.arange(0, n * top_k + 1, top_k, dtype=np.int32))
        frame = np.arange(n, dtype=np.int64)
        archive = f"s3://simpsons-frames/dumps/season{e // 22 + 1:02d}/{episode}.tar.gz"
        table = pa.Table.from_arrays(
            [
                pa.array(frame),
                pa.array(frame / FPS),
                pa.array([f"{archive}#frames/{i:06d}.jpg" for i in range(n)], pa.string()),
                labels,
                pa.array(confidence),
                pa.ListArray.from_arrays(offsets, classes.take(pa.array(top_indices.reshape(-1)))),
                pa.ListArray.from_arrays(offsets, pa.array(scores.reshape(-1))),
                pa.array(["resnet50-3f9c2a1d"] * n, pa.string()),
            ],
            schema=schema.LABELS_FILE_SCHEMA,
        )
        folder = os.path.join(root, f"episode={episode}")
        os.makedirs(folder, exist_ok=True)
        # 16,384-row groups and zstd, as labeling.py writes them.
        pq.write_table(table, os.path.join(folder, "part-0.parquet"), compression="zstd", row_group_size=16_384)


# ------------------------------------------------------------------ measurements
def _naive_read(root: str):
    import pandas as pd

    return pd.read_parquet(root)


def _naive_interval(timestamps):
    import numpy as np

    values = np.unique(timestamps.dropna().to_numpy())
    return float(np.median(np.diff(values))) if len(values) >= 2 else float("nan")


def measure_naive_screen_time(root: str):
    df = _naive_read(root)
    df["episode"] = df["episode"].astype(str)
    intervals = df.groupby("episode")["timestamp_s"].apply(_naive_interval)
    labelled = df[df["label"].notna() & (df["confidence"] >= MIN_CONFIDENCE)]
    counts = labelled.groupby(["episode", "label"]).size().rename("frames").reset_index()
    counts["seconds"] = counts["frames"] * counts["episode"].map(intervals)
    counts["share"] = counts["frames"] / counts.groupby("episode")["frames"].transform("sum")
    return [int(counts["frames"].sum()), round(float(counts["seconds"].sum()), 3), len(counts)]


def measure_screen_time(root: str):
    from simpsons_ray import query

    result = query.screen_time(root, min_confidence=MIN_CONFIDENCE)
    return [int(result["frames"].sum()), round(float(result["seconds"].sum()), 3), len(result)]


def measure_naive_frames(root: str):
    df = _naive_read(root)
    mine = df[(df["episode"] == FRAMES_EPISODE) & (df["label"] == FRAMES_CHARACTER) & (df["confidence"] >= MIN_CONFIDENCE)]
    mine = mine.sort_values(["confidence", "frame"], ascending=[False, True])
    return [len(mine), int(mine["frame"].iloc[0]) if len(mine) else -1, int(mine["frame"].sum())]


def measure_frames(root: str):
    from simpsons_ray import query

    result = query.frames(root, FRAMES_CHARACTER, min_confidence=MIN_CONFIDENCE, episodes=[FRAMES_EPISODE])
    return [len(result), int(result["frame"].iloc[0]) if len(result) else -1, int(result["frame"].sum())]


def measure_segments(root: str):
    from simpsons_ray import query

    result = query.segments(root, min_confidence=MIN_CONFIDENCE)
    return [len(result), int(result["frames"].sum())]


def measure_summary(root: str):
    from simpsons_ray import query

    result = query.summary(root, min_confidence=MIN_CONFIDENCE)
    return [int(result["frames"].sum()), int(result["labelled_frames"].sum())]


def measure_imports(root: str):
    return []


MEASUREMENTS = {
    "imports": measure_imports,
    "screen_time": measure_screen_time,
    "naive_screen_time": measure_naive_screen_time,
    "frames": measure_frames,
    "naive_frames": measure_naive_frames,
    "segments": measure_segments,
    "summary": measure_summary,
}


def _child(name: str, root: str) -> None:
    """Run one measurement in this (fresh) process and print one JSON line."""
    import resource

    import numpy  # noqa: F401  everything both sides import, so that time is the query's alone
    import pandas  # noqa: F401
    import pyarrow.dataset  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    import simpsons_ray.query  # noqa: F401

    start = time.perf_counter()
    check = MEASUREMENTS[name](root)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_mib": peak_kib / 1024, "check": check}))


def run_measurement(name: str, root: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--measure", name, "--dir", root, "--episode", FRAMES_EPISODE],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            sys.exit(f"measurement {name} failed:\n{out.stderr}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    checks = {json.dumps(r["check"]) for r in runs}
    assert len(checks) == 1, f"{name} gave different answers across runs: {checks}"
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peak_mib": max(r["peak_mib"] for r in runs),
        "check": runs[0]["check"],
    }


def dataset_size(root: str) -> tuple[int, int]:
    total, files = 0, 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            total += os.path.getsize(os.path.join(dirpath, name))
            files += 1
    return total, files


def main() -> None:
    global FRAMES_EPISODE  # the children get it as --episode
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="dataset folder (generated when empty or missing; default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated dataset")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--frames", type=int, default=30_000, help="frames per episode")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement (median time)")
    parser.add_argument("--quick", action="store_true", help="10 episodes x 3,000 frames, one run each")
    parser.add_argument("--measure", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    parser.add_argument("--episode", default=FRAMES_EPISODE, help="episode of the one-episode query (default %(default)s)")
    args = parser.parse_args()
    FRAMES_EPISODE = args.episode
    if args.measure:
        _child(args.measure, args.dir)
        return
    if args.quick:
        args.episodes, args.frames, args.repeats = 10, 3_000, 1
    root = args.dir or tempfile.mkdtemp(prefix="labels-bench-")
    generated = False
    if not os.path.isdir(root) or not os.listdir(root):
        start = time.perf_counter()
        generate(root, args.episodes, args.frames)
        generated = True
        print(f"generated {args.episodes} episodes x {args.frames:,} frames in {time.perf_counter() - start:.1f} s")
    episodes = sorted(d.split("=", 1)[1] for d in os.listdir(root) if d.startswith("episode="))
    if FRAMES_EPISODE not in episodes:
        FRAMES_EPISODE = episodes[len(episodes) // 2]
    size, files = dataset_size(root)
    print(f"dataset {root}: {len(episodes)} episodes, {files} files, {size / 2**20:.0f} MiB on disk")
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; {args.repeats} fresh process(es) per row\n")

    results = {name: run_measurement(name, root, args.repeats) for name in MEASUREMENTS}
    assert results["screen_time"]["check"] == results["naive_screen_time"]["check"], "screen_time answers differ"
    assert results["frames"]["check"] == results["naive_frames"]["check"], "frames answers differ"
    floor = results["imports"]["peak_mib"]

    header = f"{'query':<34}{'time s':>9}{'peak MiB':>11}{'above imports':>15}{'faster':>9}{'leaner':>9}{'leaner*':>9}"
    print(header)
    print("-" * len(header))
    print(f"{'(imports only)':<34}{'':>9}{floor:>11.0f}")
    rows = [
        ("screen_time, all episodes", "screen_time", "naive_screen_time"),
        (f"frames, one episode ({FRAMES_EPISODE})", "frames", "naive_frames"),
        ("segments, all episodes", "segments", None),
        ("summary, all episodes", "summary", None),
    ]
    for label, ours, naive in rows:
        if naive:
            n = results[naive]
            print(f"{'  naive read_parquet + pandas':<34}{n['seconds']:>9.2f}{n['peak_mib']:>11.0f}{n['peak_mib'] - floor:>15.0f}")
        o = results[ours]
        line = f"{label:<34}{o['seconds']:>9.2f}{o['peak_mib']:>11.0f}{o['peak_mib'] - floor:>15.0f}"
        if naive:
            n = results[naive]
            above = max(o["peak_mib"] - floor, 1.0)
            line += f"{n['seconds'] / o['seconds']:>8.1f}x{n['peak_mib'] / o['peak_mib']:>8.1f}x{(n['peak_mib'] - floor) / above:>8.1f}x"
        print(line)
    print("\nfaster = naive time / query time; leaner = naive peak RSS / query peak RSS;")
    print("leaner* = the same on the memory above what the imports alone take.")
    print("Targets: screen_time >= 2x faster; one-episode frames >= 10x faster and >= 10x leaner.")
    if generated and not args.keep and not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
