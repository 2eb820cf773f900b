"""The ``simpsons-ray`` command: argparse subcommands -> config dataclasses -> one library call each.

``jobs/*.py`` call :func:`main` with their subcommand, so a job submitted with
``ray job submit`` takes exactly the flags of the matching subcommand.

Owns: ``args`` (argument types, shared flags, flags built from a config's fields)
and one module per family of subcommands (``train``: train and evaluate;
``label``; ``query``: query and report; ``review``: review export and import).

May import: every stage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from simpsons_ray.cli.args import positive_int
from simpsons_ray.cli.label import add_label
from simpsons_ray.cli.query import add_query, add_report
from simpsons_ray.cli.review import add_review
from simpsons_ray.cli.train import add_evaluate, add_train, train_config
from simpsons_ray.core.errors import find_user_error

EXIT_USER_ERROR = 2
VERBOSE_HELP = "debug logging, and Ray's own logs in the terminal (by default they stay in Ray's log files)"

__all__ = ["EXIT_USER_ERROR", "build_parser", "main", "train_config"]


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train, label and query end to end on generated data (local Ray, local files)")
    p.add_argument("--output", default="demo-output", help="where everything goes (default %(default)s)")
    p.add_argument("--num-workers", type=positive_int, default=2, help="Ray Train workers (default %(default)s)")
    p.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from simpsons_ray.demo import DemoConfig, run_demo

    run_demo(DemoConfig(output_uri=args.output, num_workers=args.num_workers))
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_train, add_evaluate, add_label, add_query, add_report, add_review, add_demo]


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
    from simpsons_ray.core import console

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
