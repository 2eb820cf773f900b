"""``simpsons-ray label``: flags -> LabelConfig -> one labeling run."""

from __future__ import annotations

import argparse

from simpsons_ray.cli.args import add_episodes, listed, non_negative_float, non_negative_int, positive_float, positive_int, probability, sample_fps


def add_label(sub: argparse._SubParsersAction) -> None:
    from simpsons_ray.label.config import DECODE_CHOICES
    from simpsons_ray.label.config import LabelConfig as C
    from simpsons_ray.label.pooling import POOL_CHOICES

    p = sub.add_parser("label", help="label every frame of episodes (video files, frame folders or tar archives) into Parquet with Ray Data")
    p.add_argument("--model", required=True, help="model artifact directory from `simpsons-ray train` (local path or s3://)")
    p.add_argument("--frames", required=True,
                   help="episodes, in any mix: FRAMES/<episode>.mp4|.mkv|.mov|.webm|.avi|.ts videos, FRAMES/<episode>/*.jpg "
                        "folders, FRAMES/<episode>.tar[.gz] archives (or one video or archive)")
    p.add_argument("--output", required=True, help="labels dataset, OUTPUT/episode=<id>/*.parquet; rerun to resume")
    p.add_argument("--sample-fps", type=sample_fps, default=C.sample_fps,
                   help="videos: frames kept per second of video, the first of each 1/F s, or 'all' for every frame "
                        f"(default {C.sample_fps:g}); timestamp_s comes from the video itself")
    p.add_argument("--fps", type=positive_float, default=C.fps,
                   help="frame dumps: the rate the dump was made at, for timestamp_s = (frame - first frame number) / fps "
                        "(default: no timestamps for dumps)")
    p.add_argument("--first-frame-number", type=non_negative_int, default=C.first_frame_number,
                   help="frame dumps: the number of the frame at time 0 (default %(default)s; ffmpeg's image2 numbers from 1)")
    add_episodes(p, "label only these episode ids")
    p.add_argument("--batch-size", type=positive_int, default=C.batch_size, help="frames per forward pass (default %(default)s)")
    p.add_argument("--num-workers", type=positive_int, default=C.num_workers,
                   help="the most predictor actors, one GPU each with --gpu; the pool starts with one per GPU or CPU the cluster has "
                        "and grows as the cluster does (default: no limit)")
    p.add_argument("--gpu", action="store_true", help="run the model on GPUs (bf16 autocast, channels_last)")
    p.add_argument("--wait-for-gpus", type=non_negative_float, default=C.wait_for_gpus, metavar="SECONDS",
                   help="with --gpu on a cluster that has no GPU yet: how long to wait for its autoscaler to add one "
                        "(default %(default)s; a local Ray started by the job fails at once)")
    p.add_argument("--min-confidence", type=probability, default=C.min_confidence,
                   help="the score a character needs to be listed in `characters` (and the top-1 to be `label`): a single-label "
                        "model's top-1 probability, a multi-label model's per-character sigmoid, replacing its own thresholds "
                        "(default: a multi-label model's thresholds; 0 for a single-label model)")
    p.add_argument("--top-k", type=positive_int, default=C.top_k, help="labels and scores kept per frame (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="relabel episodes that are already done")
    p.add_argument("--pool", choices=POOL_CHOICES, default=C.pool,
                   help="shot: cut each episode into shots and pool who is on screen within a shot, so that appearances hold "
                        "through it (`characters`); none: every frame alone. The frame's own answer is kept in "
                        "`frame_characters` either way (default %(default)s)")
    p.add_argument("--pool-window", type=positive_float, default=C.pool_window_s, metavar="SECONDS",
                   help="with --pool shot: the seconds pooled around each frame, centred on it and never crossing its shot "
                        "(default %(default)s)")
    p.add_argument("--decode", choices=DECODE_CHOICES, default=C.decode,
                   help="where frames are decoded: CPU tasks with PIL, or the predictor with torchvision.io.decode_jpeg "
                        "(nvJPEG on a GPU); auto: the predictor with --gpu, else tasks (default %(default)s)")
    p.set_defaults(run=run_label)


def run_label(args: argparse.Namespace) -> int:
    from simpsons_ray.label.config import LabelConfig
    from simpsons_ray.label.run import label

    label(LabelConfig(
        model_uri=args.model,
        frames_uri=args.frames,
        output_uri=args.output,
        fps=args.fps,
        first_frame_number=args.first_frame_number,
        sample_fps=args.sample_fps,
        episodes=listed(args.episodes),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        use_gpu=args.gpu,
        wait_for_gpus=args.wait_for_gpus,
        min_confidence=args.min_confidence,
        top_k=args.top_k,
        overwrite=args.overwrite,
        decode=args.decode,
        pool=args.pool,
        pool_window_s=args.pool_window,
    ))
    return 0
