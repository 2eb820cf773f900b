"""``simpsons-ray query`` and ``simpsons-ray report``: flags -> QueryConfig / ReportConfig -> one answer or one page."""

from __future__ import annotations

import argparse

from simpsons_ray.cli.args import add_episodes, listed, non_negative_float, non_negative_int, positive_float, positive_int, probability


def add_query(sub: argparse._SubParsersAction) -> None:
    from simpsons_ray import query as q

    p = sub.add_parser("query", help="screen time, a character's frames, on-screen segments, who is on screen together, or a summary of labels")
    p.add_argument("question", choices=q.QUESTIONS, help="what to ask of the labels")
    p.add_argument("--labels", required=True, help="labels output of `simpsons-ray label` (local path or s3://)")
    p.add_argument("--min-confidence", type=float, default=q.DEFAULT_MIN_CONFIDENCE,
                   help="count a character on a frame only at this score (a single label's confidence) or more (default %(default)s)")
    add_episodes(p, "only these episodes")
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
    p.add_argument("--limit", type=positive_int, help="at most N rows (frames: the best N)")
    p.add_argument("--time", help="at: the moment, as seconds (754.2), MM:SS (12:34) or HH:MM:SS")
    p.add_argument("--frame", type=non_negative_int, help="at: a frame number, for episodes labelled without timestamps")
    p.add_argument("--per-frame", action="store_true",
                   help="answer from each frame alone (`frame_characters`) instead of the answer pooled over its shot "
                        "(`characters`, the default); the same for labels made before shots")
    p.add_argument("--timecode-fps", type=positive_float,
                   help="segments: add SMPTE start/end/duration timecodes at this rate (29.97 and 59.94 drop-frame); "
                        "the rate of --format edl (default 24)")
    p.set_defaults(run=run_query)


def run_query(args: argparse.Namespace) -> int:
    from simpsons_ray.query import QueryConfig, run_query

    run_query(QueryConfig(
        question=args.question,
        labels_uri=args.labels,
        min_confidence=args.min_confidence,
        episodes=listed(args.episodes),
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
        per_frame=args.per_frame,
    ))
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    from simpsons_ray import query, report

    p = sub.add_parser("report", help="one self-contained HTML report of a labels output: totals, timelines, best frames, quality")
    p.add_argument("--labels", required=True, help="labels output of `simpsons-ray label` (local path or s3://)")
    p.add_argument("--output", required=True, help="the HTML file to write (local path or s3://)")
    p.add_argument("--model", help="the model artifact: adds its card (test metrics, confusion matrix, calibration)")
    add_episodes(p, "only these episodes")
    p.add_argument("--characters", nargs="+", action="extend", default=[], metavar="NAME",
                   help="only these characters (space- or comma-separated, repeatable)")
    p.add_argument("--min-confidence", type=probability, default=query.DEFAULT_MIN_CONFIDENCE,
                   help="count a character only at this confidence or more (default %(default)s)")
    p.add_argument("--low-confidence", type=probability, default=report.DEFAULT_LOW_CONFIDENCE,
                   help="quality: the share of frames under this top-1 confidence (default %(default)s)")
    p.add_argument("--max-gap-s", type=non_negative_float, default=query.DEFAULT_MAX_GAP_S,
                   help="timelines: join appearances this close (default %(default)s)")
    p.add_argument("--thumbnails", type=non_negative_int, default=report.DEFAULT_THUMBNAILS,
                   help="best frames shown per character; 0: none, and no frame is read (default %(default)s)")
    p.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    from simpsons_ray.report import ReportConfig, build_report

    result = build_report(ReportConfig(
        labels_uri=args.labels,
        output_uri=args.output,
        model_uri=args.model,
        episodes=listed(args.episodes),
        characters=listed(args.characters),
        min_confidence=args.min_confidence,
        low_confidence=args.low_confidence,
        max_gap_s=args.max_gap_s,
        thumbnails=args.thumbnails,
    ))
    print(f"report of {result.episodes} episode(s), {result.bytes / 1e6:.1f} MB, built in {result.seconds:.1f} s: {result.output_uri}")
    return 0
