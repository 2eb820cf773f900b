"""One active-learning round on real Kaggle pictures: review the frames the model is unsure of, or random ones, and train on.

The loop a user runs, through the ``simpsons-ray`` commands, on
``../shared/data/simpsons-kaggle`` (the 19 characters with at least 200 pictures):

1. **split** (per character, seed-drawn): ``--labelled`` pictures (40) to start from,
   ``--test`` pictures (80) held out and never seen by any model or pick, and the rest
   (at most ``--pool`` a character) as unlabelled frames, shuffled into 10 episodes of
   ``frame_NNNNNN.jpg`` so that neither the episode nor the order says who is on a frame;
2. ``train`` the starting model on the labelled part;
3. ``label`` the unlabelled frames with it;
4. for each pick, ``uncertain`` and ``random``: ``review export`` of ``--limit`` (400)
   frames in Label Studio's format; a scripted reviewer answers every task with the
   frame's true character (from its folder name), in the JSON that Label Studio's
   "Export -> JSON" gives; ``review import`` makes it a training set; ``train
   --init-from`` the starting model on the labelled part plus the reviewed frames;
5. ``evaluate`` each model on the held-out pictures: macro-F1 and top-1 accuracy.

Prints one JSON line per seed and a table; the times of export, import and training
are wall-clock seconds of each command, Ray's start included.

    python bench/bench_review.py --seeds 0 1      # about 15 minutes a seed on 2 cores
    python bench/bench_review.py --quick          # smoke run: 4 characters, 32 px, 1 epoch
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pandas as pd

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "simpsons-kaggle")
EPISODES = 10


def cli(*args: str) -> tuple[str, float]:
    """Run ``simpsons-ray ARGS``; its stdout and wall seconds. A failure stops the benchmark with the command's output."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "simpsons_ray.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"simpsons-ray {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done.stdout, time.perf_counter() - t0


def split(root: str, characters: list[str], seed: int, labelled: int, test: int, pool: int, work: str) -> dict[tuple[str, int], str]:
    """Copy the labelled and test pictures as ROOT/<character>/ folders and the pool as episodes; the pool's truth."""
    rng = np.random.default_rng(seed)
    pooled: list[tuple[str, str]] = []
    for character in characters:
        names = sorted(os.listdir(os.path.join(root, "train", character)))
        rng.shuffle(names)
        for part, chosen in (("labelled", names[:labelled]), ("test", names[labelled:labelled + test])):
            os.makedirs(os.path.join(work, part, character))
            for name in chosen:
                shutil.copy(os.path.join(root, "train", character, name), os.path.join(work, part, character, name))
        pooled += [(character, name) for name in names[labelled + test:labelled + test + pool]]
    # The author's boxes of the labelled pictures, which train reads from annotation.csv in the data folder.
    boxes = pd.read_csv(os.path.join(root, "annotation.csv"))
    keys = {f"{c}/{n}" for c in characters for n in os.listdir(os.path.join(work, "labelled", c))}
    boxes[boxes["path"].map(lambda p: "/".join(p.split("/")[-2:])).isin(keys)].to_csv(
        os.path.join(work, "labelled", "annotation.csv"), index=False)
    order = rng.permutation(len(pooled))
    truth: dict[tuple[str, int], str] = {}
    for k, i in enumerate(order):
        character, name = pooled[i]
        episode, frame = f"E{k % EPISODES + 1:02d}", k // EPISODES
        os.makedirs(os.path.join(work, "frames", episode), exist_ok=True)
        shutil.copy(os.path.join(root, "train", character, name), os.path.join(work, "frames", episode, f"frame_{frame:06d}.jpg"))
        truth[(episode, frame)] = character
    return truth


def review(export_dir: str, truth: dict[tuple[str, int], str], out_json: str) -> dict[str, int]:
    """A scripted reviewer: every task answered with the frame's true character, as Label Studio exports it."""
    tasks = json.load(open(os.path.join(export_dir, "tasks.json")))
    exported = []
    for task_id, task in enumerate(tasks, start=1):
        data = task["data"]
        answer = truth[(data["episode"], int(data["frame"]))]
        exported.append({
            "id": task_id,
            "data": data,
            "annotations": [{"id": task_id, "completed_by": 1, "was_cancelled": False, "result": [
                {"from_name": "characters", "to_name": "image", "type": "choices", "value": {"choices": [answer]}}]}],
            "predictions": task.get("predictions", []),
        })
    json.dump(exported, open(out_json, "w"))
    agreed = sum(1 for task, done in zip(tasks, exported) if set(_predicted(task)) == {
        done["annotations"][0]["result"][0]["value"]["choices"][0]})
    return {"tasks": len(tasks), "model_was_right": agreed, "characters": len({truth[(t["data"]["episode"], int(t["data"]["frame"]))]
                                                                                   for t in tasks})}


def _predicted(task: dict) -> list[str]:
    for prediction in task.get("predictions", []):
        for item in prediction.get("result", []):
            if item.get("type") == "choices":
                return item["value"]["choices"]
    return []


def scores(model: str, test_dir: str) -> dict[str, float]:
    out, _ = cli("evaluate", "--model", model, "--data", test_dir, "--json")
    metrics = json.loads(out.strip().splitlines()[-1])
    return {"macro_f1": metrics["macro_f1"], "accuracy": metrics["accuracy"]}


def one_seed(args: argparse.Namespace, seed: int, characters: list[str]) -> dict:
    work = os.path.join(args.work, f"seed{seed}")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    # The split is the seed's: a rerun keeps it, and train and label resume or skip what is done.
    truth_file = os.path.join(work, "truth.json")
    if not os.path.exists(truth_file):
        shutil.rmtree(work, ignore_errors=True)
        found = split(args.root, characters, seed, args.labelled, args.test, args.pool, work)
        json.dump([[e, f, c] for (e, f), c in found.items()], open(truth_file, "w"))
    truth = {(e, int(f)): c for e, f, c in json.load(open(truth_file))}
    common = ["--num-workers", "2", "--test-fraction", "0", "--seed", str(seed)]
    from_scratch = ["--arch", args.arch, "--image-size", str(args.image_size), "--weights", "none"]
    start = os.path.join(work, "model-start")
    _, t_train = cli("train", "--data", os.path.join(work, "labelled"), "--output", start, "--finetune-epochs", str(args.epochs),
                     *from_scratch, *common)
    labels = os.path.join(work, "labels")
    _, t_label = cli("label", "--model", start, "--frames", os.path.join(work, "frames"), "--output", labels)
    result: dict = {"seed": seed, "characters": len(characters), "pool_frames": len(truth), "start": scores(start, os.path.join(work, "test")),
                    "seconds": {"train_start": round(t_train, 1), "label_pool": round(t_label, 1)}}
    for pick in ("uncertain", "random"):
        for made in ("export", "reviewed", "model"):
            shutil.rmtree(os.path.join(work, f"{made}-{pick}"), ignore_errors=True)
        export = os.path.join(work, f"export-{pick}")
        _, t_export = cli("review", "export", "--labels", labels, "--model", start, "--output", export, "--limit", str(args.limit),
                          "--pick", pick, "--format", "labelstudio", "--seed", str(seed))
        reviewed_json = os.path.join(work, f"reviewed-{pick}.json")
        t0 = time.perf_counter()
        reviewed = review(export, truth, reviewed_json)
        t_review = time.perf_counter() - t0
        data = os.path.join(work, f"reviewed-{pick}")
        _, t_import = cli("review", "import", "--from", export, "--annotations", reviewed_json, "--output", data)
        model = os.path.join(work, f"model-{pick}")
        _, t_more = cli("train", "--init-from", start, "--data", os.path.join(work, "labelled"), "--data", data, "--output", model,
                        "--finetune-epochs", str(args.more_epochs), "--unfreeze", args.more_unfreeze, "--finetune-lr", args.more_lr,
                        *common)
        result[pick] = {**scores(model, os.path.join(work, "test")), "review": reviewed}
        result["seconds"] |= {f"{pick}_export": round(t_export, 1), f"{pick}_review_script": round(t_review, 2),
                              f"{pick}_import": round(t_import, 1), f"{pick}_train": round(t_more, 1)}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=ROOT)
    p.add_argument("--work", default="/tmp/bench-review")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--labelled", type=int, default=40, help="pictures a character to start from")
    p.add_argument("--test", type=int, default=80, help="held-out pictures a character")
    p.add_argument("--pool", type=int, default=300, help="at most this many unlabelled frames a character")
    p.add_argument("--limit", type=int, default=400, help="frames reviewed a round")
    p.add_argument("--min-pictures", type=int, default=200, help="characters with at least this many pictures")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=20, help="the starting model's")
    p.add_argument("--more-epochs", type=int, default=10, help="training on from it")
    p.add_argument("--more-unfreeze", default="layer1,layer2,layer3,layer4",
                   help="stages trained on from the starting model (it was trained whole, from no weights)")
    p.add_argument("--more-lr", default="5e-4", help="their learning rate")
    p.add_argument("--fresh", action="store_true", help="split again and retrain the starting model")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    counts = {c: len(os.listdir(os.path.join(args.root, "train", c))) for c in sorted(os.listdir(os.path.join(args.root, "train")))}
    characters = [c for c, n in counts.items() if n >= args.min_pictures]
    if args.quick:
        characters, args.labelled, args.test, args.pool, args.limit = characters[:4], 10, 10, 20, 20
        args.image_size, args.epochs, args.more_epochs = 32, 1, 1
    results = []
    for seed in args.seeds:
        results.append(one_seed(args, seed, characters))
        print(json.dumps(results[-1]), flush=True)
    rows = []
    for r in results:
        for arm in ("start", "uncertain", "random"):
            rows.append({"seed": r["seed"], "model": arm, "macro-F1": r[arm]["macro_f1"], "top-1": r[arm]["accuracy"]})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format="%.3f"))
    gains = [(r["uncertain"]["macro_f1"] - r["start"]["macro_f1"], r["uncertain"]["macro_f1"] - r["random"]["macro_f1"]) for r in results]
    for r, (over_start, over_random) in zip(results, gains):
        print(f"seed {r['seed']}: uncertain over start {100 * over_start:+.1f} points of macro-F1, over random {100 * over_random:+.1f}")


if __name__ == "__main__":
    main()
