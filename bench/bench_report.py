"""The HTML report on a whole series: build time, peak memory and file size.

Generates labels datasets in the layout the labeling job writes (the query benchmark's
generator: 30,000 frames per episode, 20 characters in runs of 1-10 s, zstd Parquet),
at 100 and 750 episodes by default, then builds ``simpsons-ray report`` on each in a
fresh Python process and prints, per size:

- build s: wall-clock of ``report.build_report`` alone, after imports (median of --repeats);
- peak MiB: the process's peak resident set (ru_maxrss) at the end;
- HTML MB: the size of the file written;
- beside it, the three queries a user would otherwise run one by one (screen-time,
  segments, summary), each in its own fresh process, summed: the same reads, three times.

The generated frames' sources are ``s3://`` URIs that do not exist, so the report is
built with ``--thumbnails 0`` (it reads no frame): thumbnails cost a fixed number of
reads (characters x --thumbnails, 160 here), whatever the number of episodes.

    python bench/bench_report.py                          # 100 and 750 episodes in temp dirs (generation: ~10 min)
    python bench/bench_report.py --episodes 10 --frames 3000 --repeats 1   # smoke run
    python bench/bench_report.py --dir /data/report-bench --keep           # reuse generated datasets
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_query import dataset_size, generate  # noqa: E402


def _child(what: str, root: str, output: str) -> None:
    """One measurement in this fresh process; prints one JSON line."""
    import resource

    import numpy  # noqa: F401  the imports both sides pay, outside the timing
    import pandas  # noqa: F401
    import pyarrow.dataset  # noqa: F401

    from simpsons_ray import query, report

    start = time.perf_counter()
    if what == "report":
        result = report.build_report(report.ReportConfig(labels_uri=root, output_uri=output, thumbnails=0))
        check = result.episodes
    elif what == "screen_time":
        check = len(query.screen_time(root))
    elif what == "segments":
        check = len(query.segments(root))
    else:
        check = len(query.summary(root))
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib, "check": check}))


def measure(what: str, root: str, output: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", what, "--dir", root, "--output", output],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{what} failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"seconds": statistics.median(r["seconds"] for r in runs), "all_seconds": [r["seconds"] for r in runs],
            "peak_mib": max(r["peak_mib"] for r in runs), "check": runs[0]["check"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, nargs="+", default=[100, 750])
    parser.add_argument("--frames", type=int, default=30_000, help="frames per episode")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per measurement (median time)")
    parser.add_argument("--dir", help="parent folder of the datasets (generated when missing; default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated datasets and reports")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        _child(args.measure, args.dir, args.output)
        return

    parent = args.dir or tempfile.mkdtemp(prefix="report-bench-")
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; {args.repeats} fresh process(es) per cell\n")
    results = []
    try:
        for episodes in args.episodes:
            root = os.path.join(parent, f"labels-{episodes}x{args.frames}")
            if not os.path.isdir(root):
                started = time.perf_counter()
                generate(root, episodes, args.frames)
                print(f"generated {episodes} episodes x {args.frames:,} frames in {time.perf_counter() - started:.0f} s")
            size, _ = dataset_size(root)
            html = os.path.join(parent, f"report-{episodes}.html")
            built = measure("report", root, html, args.repeats)
            assert built["check"] == episodes, built
            queries = {q: measure(q, root, html, args.repeats) for q in ("screen_time", "segments", "summary")}
            row = {
                "episodes": episodes, "rows": episodes * args.frames, "parquet_mib": size / 2**20,
                "report_s": built["seconds"], "report_runs_s": built["all_seconds"], "report_peak_mib": built["peak_mib"],
                "html_mb": os.path.getsize(html) / 1e6,
                "queries_s": sum(q["seconds"] for q in queries.values()), "queries_peak_mib": max(q["peak_mib"] for q in queries.values()),
            }
            results.append(row)
            print(f"{episodes} episodes: report {row['report_s']:.1f} s (runs {', '.join(f'{s:.1f}' for s in row['report_runs_s'])}), "
                  f"peak {row['report_peak_mib']:.0f} MiB, {row['html_mb']:.1f} MB of HTML")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(parent, ignore_errors=True)

    header = f"{'episodes':>9}{'rows':>13}{'Parquet MiB':>13}{'report s':>10}{'peak MiB':>10}{'HTML MB':>9}{'3 queries s':>13}{'their peak':>12}"
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        print(f"{r['episodes']:>9}{r['rows']:>13,}{r['parquet_mib']:>13.0f}{r['report_s']:>10.1f}{r['report_peak_mib']:>10.0f}"
              f"{r['html_mb']:>9.1f}{r['queries_s']:>13.1f}{r['queries_peak_mib']:>12.0f}")
    print("\n(report: one pass over every episode, thumbnails off; 3 queries: screen-time + segments + summary, "
          "each a fresh process, summed; target for 750 episodes: under 30 s and 1 GiB on 2 cores)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
