"""The ``simpsons-ray`` command: argparse subcommands -> config dataclasses -> one library call each.

``jobs/*.py`` call :func:`main` with their subcommand, so a job submitted with
``ray job submit`` takes exactly the flags of the matching subcommand.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from simpsons_ray.errors import UserError, find_user_error

EXIT_USER_ERROR = 2
VERBOSE_HELP = "debug logging, and Ray's own logs in the terminal (by default they stay in Ray's log files)"


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


# --------------------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    from simpsons_ray.preprocess import AUGMENT_POLICIES
    from simpsons_ray.recipe import LR_SCHEDULES, OPTIMIZERS, RECIPES
    from simpsons_ray.training import TrainConfig as C

    # dest = the TrainConfig field each flag sets (see _run_train).
    p = sub.add_parser("train", help="fine-tune a ResNet on a Kaggle-layout folder with Ray Train")
    p.add_argument("--data", dest="data_uri", required=True, help="training images, ROOT/<character>/*.jpg (local path or s3://)")
    p.add_argument("--output", dest="output_uri", required=True, help="model artifact directory (local path or s3://); rerun to resume")
    p.add_argument("--objective", choices=("multilabel", "single"), default=C.objective,
                   help="multilabel: a sigmoid per character, trained on composed frames of 0-3 characters, so a frame can hold "
                        "several or nobody; single: a softmax, one character per picture (default %(default)s)")
    p.add_argument("--boxes", default=C.boxes, metavar="CSV",
                   help="multilabel: the pictures' bounding boxes (path,x1,y1,x2,y2,character; default: annotation.csv beside --data, "
                        "if there); 'none': whole pictures, flat backgrounds")
    p.add_argument("--arch", default=C.arch, help="resnet18, resnet34, resnet50 or resnet101 (default %(default)s)")
    p.add_argument("--weights", default=C.weights, help="imagenet, none, or a state dict PATH_OR_URI (default %(default)s)")
    p.add_argument("--image-size", type=_positive_int, default=C.image_size, help="square input size (default %(default)s)")
    p.add_argument("--num-workers", type=_positive_int, default=C.num_workers, help="Ray Train workers (default %(default)s)")
    p.add_argument("--gpu", dest="use_gpu", action="store_true", help="one GPU per worker, mixed precision")
    p.add_argument("--batch-size", type=_positive_int, default=C.batch_size, help="images per worker per step (default %(default)s)")
    p.add_argument("--frozen-epochs", type=int, default=C.frozen_epochs, help="phase 1: head only (default %(default)s)")
    p.add_argument("--finetune-epochs", type=int, default=C.finetune_epochs, help="phase 2: head + --unfreeze stages (default %(default)s)")
    p.add_argument("--unfreeze", type=lambda t: tuple(_csv(t)), default=C.unfreeze, help="stages trained in phase 2, e.g. layer3,layer4 (default layer4)")
    p.add_argument("--val-fraction", type=_fraction, default=C.val_fraction,
                   help="share per class for validation: early stopping, best epoch, LR schedule, calibration (default %(default)s)")
    p.add_argument("--test-fraction", type=_unit_interval, default=C.test_fraction,
                   help="share per class for test, scored once at the end and never used for a decision; 0: no test split (default %(default)s)")
    p.add_argument("--seed", type=int, default=C.seed, help="split and init seed (default %(default)s)")
    p.add_argument("--min-images-per-class", type=int, default=C.min_images_per_class, help="drop rarer characters (default %(default)s)")
    p.add_argument("--max-images-per-class", type=int, default=C.max_images_per_class, help="cap per character, for quick runs (default: no cap)")
    p.add_argument("--patience", type=int, default=C.patience, help="early stop after this many epochs without val-loss gain (default %(default)s)")
    p.add_argument("--max-failures", type=int, default=C.max_failures, help="worker failures to recover from (default %(default)s)")

    r = p.add_argument_group("recipe", "--recipe sets every knob below; a knob's own flag overrides it. "
                             "Defaults shown are the 'default' recipe's.")
    d = RECIPES["default"]
    r.add_argument("--recipe", choices=tuple(RECIPES), default="default",
                   help="default: AdamW, warm-up + cosine, label smoothing, linear head; notebook: the original notebook's "
                        "Adam with the LR divided on plateau and a Dense(512) + Dropout(0.5) head (default %(default)s)")
    r.add_argument("--optimizer", choices=OPTIMIZERS, help=f"(default {d['optimizer']})")
    r.add_argument("--lr", type=_positive_float, help=f"phase 1 learning rate, or the only phase's with --weights none (default {d['lr']})")
    r.add_argument("--finetune-lr", type=_positive_float, help=f"phase 2 learning rate (default {d['finetune_lr']})")
    r.add_argument("--weight-decay", type=_non_negative_float, help=f"decoupled with adamw, L2 with adam (default {d['weight_decay']})")
    r.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                   help=f"cosine: warm-up then anneal to 0 over each phase, per step; plateau: divide the LR by 10 after "
                        f"--lr-patience flat epochs (default {d['lr_schedule']})")
    r.add_argument("--warmup-epochs", type=_non_negative_float, help=f"cosine: linear warm-up length (default {d['warmup_epochs']})")
    r.add_argument("--lr-patience", type=int, help="plateau: flat epochs before the LR is divided (default 1)")
    r.add_argument("--label-smoothing", type=_unit_interval, help=f"(default {d['label_smoothing']})")
    r.add_argument("--head-hidden", type=int, help=f"units of a hidden layer in the head; 0: linear head (default {d['head_hidden']})")
    r.add_argument("--dropout", type=_unit_interval, help=f"before the head's last layer (default {d['dropout']})")
    r.add_argument("--augment", dest="augment_policy", choices=AUGMENT_POLICIES,
                   help=f"policy on top of rotation/shift/zoom/flip (default {d['augment_policy']})")
    r.add_argument("--random-erasing", type=_unit_interval, help=f"probability of erasing a rectangle (default {d['random_erasing']})")
    r.add_argument("--mixup-alpha", type=_non_negative_float, help=f"0: off (default {d['mixup_alpha']})")
    r.add_argument("--cutmix-alpha", type=_non_negative_float, help=f"0: off (default {d['cutmix_alpha']})")
    r.add_argument("--ema-decay", type=_unit_interval, help=f"weight moving average per step; 0: off (default {d['ema_decay']})")
    r.add_argument("--tta-flip", action=argparse.BooleanOptionalAction,
                   help=f"score each image and its mirror, in validation, evaluate and label (default {d['tta_flip']})")
    p.set_defaults(run=_run_train)


def train_config(args: argparse.Namespace):
    """The TrainConfig that ``train``'s parsed flags ask for: the recipe's knobs, then each flag given."""
    import dataclasses

    from simpsons_ray.training import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)} | {"augment_policy", "random_erasing"}
    return TrainConfig.for_recipe(args.recipe, **{k: v for k, v in vars(args).items() if k in names and k != "recipe"})


def _run_train(args: argparse.Namespace) -> int:
    from simpsons_ray.training import train

    train(train_config(args))
    return 0


# ------------------------------------------------------------------------ evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="accuracy, macro-F1 and confusion matrix of a model on a labelled set")
    p.add_argument("--model", required=True, help="model artifact directory (local path or s3://)")
    p.add_argument("--data", required=True, help="ROOT/<character>/*.jpg, or a flat folder of <character>_<N>.jpg")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (default %(default)s)")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line of the metrics")
    p.add_argument("--composites", type=_non_negative_int, default=0, metavar="N",
                   help="score N frames composed of 0-3 of the set's characters on real backgrounds (per-character F1, "
                        "exact sets, 'nobody', screen-time error) instead of the single pictures")
    p.add_argument("--seed", type=int, default=0, help="composites: which pictures and frames (default %(default)s)")
    p.add_argument("--boxes", default="", metavar="CSV",
                   help="composites: the pictures' boxes (default: annotation.csv beside --data, if there; 'none': whole pictures)")
    p.add_argument("--min-confidence", type=_probability, default=None,
                   help="composites: one probability cut for every character instead of the model's own thresholds")
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from simpsons_ray.evaluation import EvaluateConfig, evaluate_model

    if args.composites == 0 and (args.min_confidence is not None or args.boxes):
        raise UserError("--min-confidence and --boxes apply to --composites N only.")
    evaluate_model(EvaluateConfig(model_uri=args.model, data_uri=args.data, batch_size=args.batch_size, as_json=args.json,
                                  composites=args.composites, seed=args.seed, boxes=args.boxes, min_confidence=args.min_confidence))
    return 0


# --------------------------------------------------------------------------- query
def _add_query(sub: argparse._SubParsersAction) -> None:
    from simpsons_ray import query as q

    p = sub.add_parser("query", help="screen time, a character's frames, on-screen segments, who is on screen together, or a summary of labels")
    p.add_argument("question", choices=q.QUESTIONS, help="what to ask of the labels")
    p.add_argument("--labels", required=True, help="labels output of `simpsons-ray label` (local path or s3://)")
    p.add_argument("--min-confidence", type=float, default=q.DEFAULT_MIN_CONFIDENCE, help="count a character on a frame only at this score (a single label's confidence) or more (default %(default)s)")
    p.add_argument("--episode", nargs="+", action="extend", default=[], metavar="ID", help="only these episodes (space- or comma-separated, repeatable)")
    p.add_argument("--character", help="the character (frames: required unless --nobody; screen-time, segments: only this one; "
                                       "together: only the pairs it is in)")
    p.add_argument("--nobody", action="store_true",
                   help="the frames with no character on screen: screen-time: a (nobody) row per episode; segments: the "
                        "stretches with nobody; frames: those frames instead of a --character's")
    p.add_argument("--format", choices=q.FORMATS + q.SEGMENT_EXPORTS,
                   help="table, csv, json or parquet; segments also srt or vtt (a subtitle track of who is on screen) and edl "
                        "(an edit list) (default: from --output's extension, else table)")
    p.add_argument("--output", help="write the answer to this file or s3:// URI instead of the terminal; srt, vtt, edl: "
                                    "a folder ending in / gets one file per episode")
    p.add_argument("--plot", help="screen-time: stacked bar chart per episode; segments: timeline; together: heat map of "
                                  "the time each pair shares the screen (PNG)")
    p.add_argument("--contact-sheet", help="frames: grid of the best --limit frames' thumbnails (JPEG)")
    p.add_argument("--max-gap-s", type=float, default=q.DEFAULT_MAX_GAP_S, help="segments: join appearances this close (default %(default)s)")
    p.add_argument("--limit", type=_positive_int, help="at most N rows (frames: the best N)")
    p.add_argument("--time", help="at: the moment, as seconds (754.2), MM:SS (12:34) or HH:MM:SS")
    p.add_argument("--frame", type=_non_negative_int, help="at: a frame number, for episodes labelled without timestamps")
    p.add_argument("--timecode-fps", type=_positive_float,
                   help="segments: add SMPTE start/end/duration timecodes at this rate (29.97 and 59.94 drop-frame); "
                        "the rate of --format edl (default 24)")
    p.set_defaults(run=_run_query)


def _run_query(args: argparse.Namespace) -> int:
    from simpsons_ray.query import QueryConfig, run_query

    config = QueryConfig(
        question=args.question,
        labels_uri=args.labels,
        min_confidence=args.min_confidence,
        episodes=tuple(e for item in args.episode for e in _csv(item)),
        character=args.character,
        format=args.format,
        output_uri=args.output,
        plot_uri=args.plot,
        contact_sheet_uri=args.contact_sheet,
        max_gap_s=args.max_gap_s,
        limit=args.limit,
        time=args.time,
        frame=args.frame,
        timecode_fps=args.timecode_fps,
        nobody=args.nobody,
    )
    run_query(config)
    return 0


# -------------------------------------------------------------------------- report
def _add_report(sub: argparse._SubParsersAction) -> None:
    from simpsons_ray import report as r

    p = sub.add_parser("report", help="one self-contained HTML report of a labels output: totals, timelines, best frames, quality")
    p.add_argument("--labels", required=True, help="labels output of `simpsons-ray label` (local path or s3://)")
    p.add_argument("--output", required=True, help="the HTML file to write (local path or s3://)")
    p.add_argument("--model", help="the model artifact: adds its card (test metrics, confusion matrix, calibration)")
    p.add_argument("--episodes", nargs="+", action="extend", default=[], metavar="ID", help="only these episodes (space- or comma-separated)")
    p.add_argument("--characters", nargs="+", action="extend", default=[], metavar="NAME", help="only these characters (space- or comma-separated)")
    p.add_argument("--min-confidence", type=_probability, default=r.query.DEFAULT_MIN_CONFIDENCE,
                   help="count a character only at this confidence or more (default %(default)s)")
    p.add_argument("--low-confidence", type=_probability, default=r.DEFAULT_LOW_CONFIDENCE,
                   help="quality: the share of frames under this top-1 confidence (default %(default)s)")
    p.add_argument("--max-gap-s", type=_non_negative_float, default=r.query.DEFAULT_MAX_GAP_S,
                   help="timelines: join appearances this close (default %(default)s)")
    p.add_argument("--thumbnails", type=_non_negative_int, default=r.DEFAULT_THUMBNAILS,
                   help="best frames shown per character; 0: none, and no frame is read (default %(default)s)")
    p.set_defaults(run=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from simpsons_ray.report import ReportConfig, build_report

    result = build_report(ReportConfig(
        labels_uri=args.labels,
        output_uri=args.output,
        model_uri=args.model,
        episodes=tuple(e for item in args.episodes for e in _csv(item)),
        characters=tuple(c for item in args.characters for c in _csv(item)),
        min_confidence=args.min_confidence,
        low_confidence=args.low_confidence,
        max_gap_s=args.max_gap_s,
        thumbnails=args.thumbnails,
    ))
    print(f"report of {result.episodes} episode(s), {result.bytes / 1e6:.1f} MB, built in {result.seconds:.1f} s: {result.output_uri}")
    return 0


# --------------------------------------------------------------------------- label
def _sample_fps(text: str) -> float | None:
    if text.strip().lower() == "all":
        return None
    return _positive_float(text)


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _add_label(sub: argparse._SubParsersAction) -> None:
    from simpsons_ray.labeling import DECODE_CHOICES
    from simpsons_ray.labeling import LabelConfig as C

    p = sub.add_parser("label", help="label every frame of episodes (video files, frame folders or tar archives) into Parquet with Ray Data")
    p.add_argument("--model", required=True, help="model artifact directory from `simpsons-ray train` (local path or s3://)")
    p.add_argument("--frames", required=True,
                   help="episodes, in any mix: FRAMES/<episode>.mp4|.mkv|.mov|.webm|.avi|.ts videos, FRAMES/<episode>/*.jpg "
                        "folders, FRAMES/<episode>.tar[.gz] archives (or one video or archive)")
    p.add_argument("--output", required=True, help="labels dataset, OUTPUT/episode=<id>/*.parquet; rerun to resume")
    p.add_argument("--sample-fps", type=_sample_fps, default=C.sample_fps,
                   help="videos: frames kept per second of video, the first of each 1/F s, or 'all' for every frame "
                        f"(default {C.sample_fps:g}); timestamp_s comes from the video itself")
    p.add_argument("--fps", type=_positive_float, default=C.fps,
                   help="frame dumps: the rate the dump was made at, for timestamp_s = (frame - first frame number) / fps "
                        "(default: no timestamps for dumps)")
    p.add_argument("--first-frame-number", type=_non_negative_int, default=C.first_frame_number,
                   help="frame dumps: the number of the frame at time 0 (default %(default)s; ffmpeg's image2 numbers from 1)")
    p.add_argument("--episodes", nargs="+", default=[], metavar="ID", help="label only these episode ids (space- or comma-separated)")
    p.add_argument("--batch-size", type=_positive_int, default=C.batch_size, help="frames per forward pass (default %(default)s)")
    p.add_argument("--num-workers", type=_positive_int, default=C.num_workers,
                   help="the most predictor actors, one GPU each with --gpu; the pool starts with one per GPU or CPU the cluster has "
                        "and grows as the cluster does (default: no limit)")
    p.add_argument("--gpu", action="store_true", help="run the model on GPUs (bf16 autocast, channels_last)")
    p.add_argument("--wait-for-gpus", type=_non_negative_float, default=C.wait_for_gpus, metavar="SECONDS",
                   help="with --gpu on a cluster that has no GPU yet: how long to wait for its autoscaler to add one "
                        "(default %(default)s; a local Ray started by the job fails at once)")
    p.add_argument("--min-confidence", type=_probability, default=C.min_confidence,
                   help="the score a character needs to be listed in `characters` (and the top-1 to be `label`): a single-label "
                        "model's top-1 probability, a multi-label model's per-character sigmoid, replacing its own thresholds "
                        "(default: a multi-label model's thresholds; 0 for a single-label model)")
    p.add_argument("--top-k", type=_positive_int, default=C.top_k, help="labels and scores kept per frame (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="relabel episodes that are already done")
    p.add_argument("--decode", choices=DECODE_CHOICES, default=C.decode,
                   help="where frames are decoded: CPU tasks with PIL, or the predictor with torchvision.io.decode_jpeg "
                        "(nvJPEG on a GPU); auto: the predictor with --gpu, else tasks (default %(default)s)")
    p.set_defaults(run=_run_label)


def _run_label(args: argparse.Namespace) -> int:
    from simpsons_ray.labeling import LabelConfig, label

    episodes = tuple(e for item in args.episodes for e in _csv(item))
    label(
        LabelConfig(
            model_uri=args.model,
            frames_uri=args.frames,
            output_uri=args.output,
            fps=args.fps,
            first_frame_number=args.first_frame_number,
            sample_fps=args.sample_fps,
            episodes=episodes,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            use_gpu=args.gpu,
            wait_for_gpus=args.wait_for_gpus,
            min_confidence=args.min_confidence,
            top_k=args.top_k,
            overwrite=args.overwrite,
            decode=args.decode,
        )
    )
    return 0


# ---------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train, label and query end to end on generated data (local Ray, local files)")
    p.add_argument("--output", default="demo-output", help="where everything goes (default %(default)s)")
    p.add_argument("--num-workers", type=_positive_int, default=2, help="Ray Train workers (default %(default)s)")
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from simpsons_ray.demo import DemoConfig, run_demo

    run_demo(DemoConfig(output_uri=args.output, num_workers=args.num_workers))
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train, _add_evaluate, _add_label, _add_query, _add_report, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simpsons-ray",
        description="Find which Simpsons characters are on screen: train on Ray Train, label on Ray Data, query Parquet.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    # Also after the subcommand (`simpsons-ray demo -v`, `jobs/train.py ... --verbose`).
    for command in sub.choices.values():
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; user mistakes end in one sentence and exit status 2."""
    from simpsons_ray import console

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    console.set_verbose(args.verbose)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("simpsons-ray: interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None:
            raise
        print(f"simpsons-ray {args.command}: error: {user_error}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
