"""Label the same frame dump with one or more checkouts of the pipeline and with the plain loop, alternating, each in a fresh process.

For finding where labeling speed went between versions: each ``name=path`` is a
checkout of this repository (old flat layout or the package in stages), run as
``label`` on a fresh local Ray with every CPU; the plain single-process loop and the
model-only forward are ``bench/bench_label.py``'s own, from the first checkout. Prints
one JSON line a run, then frames/s per version, best against the plain loop's best.

    python bench/bench_label_versions.py DUMP MODEL_DIR now=.,before=/path/to/old/checkout 2

DUMP is a folder of episodes (frame folders or tars) as ``label --frames`` takes it;
MODEL_DIR any artifact both checkouts load.
"""
import json
import os
import subprocess
import sys
import time

DUMP = os.path.abspath(sys.argv[1])  # episodes, as label --frames takes them
MODEL = os.path.abspath(sys.argv[2])  # a model artifact every version reads
TREES = [f"{name}={os.path.abspath(path)}" for name, path in (t.split("=", 1) for t in sys.argv[3].split(","))]  # name=path,...
REPEATS = int(sys.argv[4]) if len(sys.argv) > 4 else 2
BATCH = 64

PIPE = r'''
import json, os, shutil, sys, time, logging
logging.basicConfig(level=logging.WARNING)
sys.path.insert(0, os.path.join(sys.argv[1], "bench"))
import ray
try:
    from simpsons_ray.label.config import LabelConfig
    from simpsons_ray.label.run import label
except ImportError:
    from simpsons_ray.labeling import LabelConfig, label
out = sys.argv[4]
shutil.rmtree(out, ignore_errors=True)
ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
s = label(LabelConfig(model_uri=sys.argv[2], frames_uri=sys.argv[3], output_uri=out, batch_size=64))
ray.shutdown()
print(json.dumps({"fps": s["frames_per_s"], "wall": s["wall_time_s"], "frames": s["frames_labelled"], "first": s.get("first_batch_s")}))
'''
PLAIN = r'''
import json, os, sys, time
sys.path.insert(0, os.path.join(sys.argv[1], "bench"))
import torch
torch.set_num_threads(os.cpu_count())
import bench_label as b
print(json.dumps({"fps": b.bench_plain_loop(sys.argv[2], sys.argv[3], 64, "cpu")}))
'''
MODEL_ONLY = r'''
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "bench"))
import torch
torch.set_num_threads(os.cpu_count())
import bench_label as b
print(json.dumps({"fps": b.bench_model_only(sys.argv[2], sys.argv[3], 64, "cpu")}))
'''


def run(code, tree, *args):
    env = {**os.environ, "PYTHONPATH": tree, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", code, tree, *args], capture_output=True, text=True, env=env, cwd=tree)
    line = [text for text in done.stdout.splitlines() if text.startswith("{")]
    if not line:
        print(done.stdout[-2000:], done.stderr[-3000:])
        raise SystemExit("failed")
    return json.loads(line[-1])


first_tree = TREES[0].split("=")[1]
results = {}
for r in range(REPEATS):
    order = [("plain", first_tree)] + [tuple(t.split("=")) for t in TREES]
    if r % 2:
        order = order[::-1]
    for name, tree in order:
        if name == "plain":
            res = run(PLAIN, tree, MODEL, DUMP)
        else:
            res = run(PIPE, tree, MODEL, DUMP, f"/tmp/label-versions-{name}")
        results.setdefault(name, []).append(res)
        print(time.strftime("%H:%M:%S"), name, r + 1, json.dumps(res), flush=True)
res = run(MODEL_ONLY, first_tree, MODEL, DUMP)
print("model only", res, flush=True)
plain = max(x["fps"] for x in results["plain"])
for name, runs in results.items():
    print(f"{name:10} " + "  ".join(f"{x['fps']:.1f}" for x in runs) + f"   best/plain-best {max(x['fps'] for x in runs) / plain:.3f}"
          + f"   best/model {max(x['fps'] for x in runs) / res['fps']:.3f}")
