"""``simpsons-ray review export`` and ``simpsons-ray review import``: flags -> ExportConfig / ImportConfig -> one export or one training set."""

from __future__ import annotations

import argparse

from simpsons_ray.cli.args import non_negative_float, positive_int, whole_number


def add_review(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("review", help="send frames the model is unsure of to people (Label Studio or folders), and read their answers "
                                      "back as training data")
    actions = p.add_subparsers(dest="review_action", required=True, metavar="ACTION")
    _add_export(actions)
    _add_import(actions)


def _add_export(actions: argparse._SubParsersAction) -> None:
    from simpsons_ray import review

    p = actions.add_parser("export", help="pick frames of a labels output and write them for review")
    p.add_argument("--labels", required=True, help="labels output of `simpsons-ray label` (local path or s3://)")
    p.add_argument("--model", required=True, help="the model artifact that labelled them: its characters, objective and thresholds")
    p.add_argument("--output", required=True, help="the export folder to write (local path or s3://); must be empty, or --overwrite")
    p.add_argument("--limit", type=positive_int, default=review.DEFAULT_LIMIT, help="frames to export (default %(default)s)")
    p.add_argument("--pick", default="uncertain", metavar="uncertain|random|character:NAME",
                   help="uncertain: the frames closest to the model's decision, one per shot before a second; random: a uniform "
                        "sample (--seed); character:NAME: the frames that name NAME, weakest first (default %(default)s)")
    p.add_argument("--format", choices=review.FORMATS, default="labelstudio",
                   help="labelstudio: pictures, tasks.json and labeling_config.xml to import into Label Studio; folders: one "
                        "folder per answer, to sort by hand (default %(default)s)")
    p.add_argument("--seed", type=whole_number, default=0, help="random: the same seed picks the same frames (default %(default)s)")
    p.add_argument("--min-gap-s", type=non_negative_float, default=review.DEFAULT_MIN_GAP_S,
                   help="two picked frames of one episode at least this many seconds apart (default %(default)s)")
    p.add_argument("--image-url-prefix", help="labelstudio: tasks show PREFIX + images/<name>.jpg (an http server or a bucket "
                                              "URL) instead of Label Studio's local files")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from simpsons_ray.review import ExportConfig, run_export

    run_export(ExportConfig(
        labels_uri=args.labels,
        model_uri=args.model,
        output_uri=args.output,
        limit=args.limit,
        pick=args.pick,
        format=args.format,
        seed=args.seed,
        min_gap_s=args.min_gap_s,
        image_url_prefix=args.image_url_prefix,
        overwrite=args.overwrite,
    ))
    return 0


def _add_import(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser("import", help="read the reviews of an export back as a training folder for `simpsons-ray train`")
    p.add_argument("--from", dest="export", required=True, help="the export folder (`review export --output`; local path or s3://)")
    p.add_argument("--annotations", help="labelstudio exports: the JSON file of Label Studio's Export -> JSON")
    p.add_argument("--output", required=True, help="the training folder to write: <character>/*.jpg, _nobody/, annotation.csv, "
                                                   "review.csv, skipped.csv; must be empty, or --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier import in --output")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    p.set_defaults(run=run_import)


def run_import(args: argparse.Namespace) -> int:
    from simpsons_ray.review import ImportConfig, run_import

    run_import(ImportConfig(export_uri=args.export, output_uri=args.output, annotations_uri=args.annotations, overwrite=args.overwrite))
    return 0
