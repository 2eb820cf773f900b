"""``simpsons-ray demo``: train, label and query end to end on data it generates.

Runs on a local Ray with local files and no cloud account; a few minutes on 2 CPUs.
Everything lands under ``--output``::

    data/train/<character>/*.jpg     generated training images (Kaggle layout), one character each
    data/train/annotation.csv        their characters' boxes, as the Kaggle dataset's author gives them
    frames/s01e01/frame_*.jpg        a frame dump: one episode as a folder,
    frames/s01e02.tar                one as a tar,
    frames/s01e03.tar.gz             one as a tar.gz (frames in a subfolder)
    model/                           the trained model artifact
    labels/episode=<id>/*.parquet    the labels
    screen_time.png                  the screen-time chart
    report.html                      the HTML report: totals, timelines, best frames, quality, the model's card
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass

import numpy as np

from simpsons_ray import query, report
from simpsons_ray.demo.synthetic import encode, scene_image, write_class_folders
from simpsons_ray.label.config import LabelConfig
from simpsons_ray.label.run import label
from simpsons_ray.query import charts as plots
from simpsons_ray.train.config import TrainConfig
from simpsons_ray.train.driver import train

FPS = 24.0
KEEP_EVERY = 6  # the dump keeps one frame in 6: 4 frames per second of video


@dataclass(frozen=True)
class DemoConfig:
    output_uri: str = "demo-output"
    characters: tuple[str, ...] = ("bart_simpson", "homer_simpson", "lisa_simpson", "marge_simpson")
    images_per_character: int = 60
    frames_per_episode: int = 96
    epochs: int = 5
    num_workers: int = 2


def episode_frames(characters: int, frames: int, seed: int) -> list[tuple[int, tuple[int, ...], bytes]]:
    """(frame number, characters on screen, jpeg) for one episode: scenes of 6-20 kept frames with nobody, one or two characters."""
    rng = np.random.default_rng(seed)
    out: list[tuple[int, tuple[int, ...], bytes]] = []
    number = 0
    while len(out) < frames:
        count = int(rng.choice(3, p=[0.15, 0.55, 0.3]))
        who = tuple(int(k) for k in rng.choice(characters, size=count, replace=False))
        for _ in range(int(rng.integers(6, 20))):
            if len(out) == frames:
                break
            out.append((number, who, encode(scene_image(list(who), rng, 48))))
            number += KEEP_EVERY
    return out


def write_frame_dump(frames_dir: str, characters: int, frames: int) -> dict[str, str]:
    """Three episodes, one per input kind; returns episode -> what it is."""
    kinds = {"s01e01": "folder", "s01e02": "tar", "s01e03": "tar.gz"}
    for seed, (episode, kind) in enumerate(kinds.items()):
        rows = episode_frames(characters, frames, seed)
        if kind == "folder":
            os.makedirs(os.path.join(frames_dir, episode), exist_ok=True)
            for number, _, data in rows:
                with open(os.path.join(frames_dir, episode, f"frame_{number:06d}.jpg"), "wb") as f:
                    f.write(data)
            continue
        with tarfile.open(os.path.join(frames_dir, f"{episode}.{kind}"), "w:gz" if kind == "tar.gz" else "w") as tar:
            for number, _, data in rows:
                info = tarfile.TarInfo(f"frames/frame_{number:06d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return kinds


def run_demo(config: DemoConfig) -> None:
    """Generate data, train, label, and print the screen time; reruns reuse what is done."""
    out = os.path.abspath(config.output_uri)
    train_dir, frames_dir = os.path.join(out, "data", "train"), os.path.join(out, "frames")
    model_dir, labels_dir, chart = os.path.join(out, "model"), os.path.join(out, "labels"), os.path.join(out, "screen_time.png")

    print(f"== 1/4 generating {len(config.characters)} characters x {config.images_per_character} images in {train_dir}")
    if not os.path.isdir(train_dir):
        write_class_folders(train_dir, list(config.characters), config.images_per_character, seed=0, size=48, boxes=True)
    print(f"== 2/4 training resnet18 on {config.num_workers} Ray workers -> {model_dir}")
    train(TrainConfig(data_uris=(train_dir,), output_uri=model_dir, arch="resnet18", weights="none", image_size=32,
                      num_workers=config.num_workers, batch_size=16, finetune_epochs=config.epochs, val_fraction=0.25))
    print(f"== 3/4 labeling a frame dump (a folder, a tar, a tar.gz) -> {labels_dir}")
    if not os.path.isdir(frames_dir):
        write_frame_dump(frames_dir, len(config.characters), config.frames_per_episode)
    label(LabelConfig(model_uri=model_dir, frames_uri=frames_dir, output_uri=labels_dir, fps=FPS))
    print("== 4/4 screen time per episode")
    result = query.screen_time(labels_dir)
    print(query.render(result, "table").decode())
    plots.screen_time_chart(result, chart)
    page = os.path.join(out, "report.html")
    built = report.build_report(report.ReportConfig(labels_uri=labels_dir, output_uri=page, model_uri=model_dir))
    print(f"labels:  {labels_dir}/episode=<id>/*.parquet   (errors in {labels_dir}/_errors, run summaries in {labels_dir}/_runs)")
    print(f"chart:   {chart}")
    print(f"report:  {page}   (open it in a browser; built in {built.seconds:.1f} s)")
    print(f"next:    simpsons-ray query together --labels {labels_dir} --plot together.png   # who shares the screen, and how long")
    print(f"         simpsons-ray query frames --labels {labels_dir} --character bart_simpson --contact-sheet bart.jpg")
    print(f"         python -c \"import pandas as pd; print(pd.read_parquet('{labels_dir}').head())\"")
    print(f"         duckdb -c \"SELECT episode, unnest(characters) AS who, count(*) FROM read_parquet('{labels_dir}/episode=*/*.parquet', "
          "hive_partitioning=true) GROUP BY ALL ORDER BY ALL\"")
