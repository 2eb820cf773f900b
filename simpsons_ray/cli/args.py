"""Argument types that say what is wrong in one sentence, and the flags several subcommands share."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable


def csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text}") from None


def _bounded(parse: Callable[[str], Any], allowed: Callable[[Any], bool], wanted: str) -> Callable[[str], Any]:
    """An argument type: ``parse`` the text, then refuse a value ``allowed`` rejects, saying it ``must be`` ``wanted``."""
    def convert(text: str) -> Any:
        value = parse(text)
        if not allowed(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return convert


positive_int = _bounded(whole_number, lambda v: v > 0, "a positive integer")
non_negative_int = _bounded(whole_number, lambda v: v >= 0, "0 or more")
positive_float = _bounded(_number, lambda v: v > 0, "a positive number")
non_negative_float = _bounded(_number, lambda v: v >= 0, "0 or more")
unit_interval = _bounded(_number, lambda v: 0.0 <= v < 1.0, "at least 0 and below 1")
fraction = _bounded(_number, lambda v: 0.0 < v < 1.0, "between 0 and 1")
probability = _bounded(_number, lambda v: 0.0 <= v <= 1.0, "between 0 and 1")


def sample_fps(text: str) -> float | None:
    if text.strip().lower() == "all":
        return None
    return positive_float(text)


def add_episodes(parser: argparse.ArgumentParser, help: str) -> None:
    """``--episodes ID [ID ...]``, space- or comma-separated and repeatable; ``--episode`` is the same flag (its older spelling)."""
    parser.add_argument("--episodes", "--episode", dest="episodes", nargs="+", action="extend", default=[], metavar="ID",
                        help=help + " (space- or comma-separated, repeatable)")


def listed(values: list[str]) -> tuple[str, ...]:
    """Values of an ``extend`` flag, each of which may hold several, comma-separated."""
    return tuple(v for item in values for v in csv(item))


# The argparse type of each kind of TrainConfig setting (simpsons_ray.train.config).
KINDS: dict[str, Callable[[str], Any]] = {
    "positive_int": positive_int, "int": whole_number, "optional_int": whole_number, "fraction": fraction,
    "unit_interval": unit_interval, "positive_float": positive_float, "non_negative_float": non_negative_float,
    "stages": lambda text: tuple(csv(text)), "text": str,
}


def add_config_flags(parser: argparse.ArgumentParser, config: type, groups: dict[str, argparse._ArgumentGroup]) -> None:
    """One flag per field of a config dataclass that has a help, from its metadata (see ``train.config.setting``).

    A field's default shows in its help. Fields marked ``recipe`` go into the
    ``recipe`` group and default to None ("not given"), so the recipe decides them;
    so do fields marked ``parent``, so that a model the run starts from decides them.
    A ``uris`` field's flag is repeated, once per value.
    """
    for f in dataclasses.fields(config):
        meta = f.metadata
        if "help" not in meta:
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kind = meta.get("kind", "text")
        target = groups["recipe"] if meta.get("recipe") else parser
        shown = "" if meta.get("required") or f.default in (None, "") else f" (default {_shown(f.default)})"
        options: dict[str, Any] = {"dest": f.name, "help": meta["help"] + shown}
        if kind == "switch":
            options["action"] = "store_true"
        elif kind == "uris":
            options["action"] = "append"
            options["metavar"] = meta.get("metavar")
        elif kind == "on_off":
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = KINDS[kind]
            if meta.get("choices"):
                options["choices"] = meta["choices"]
            if meta.get("metavar"):
                options["metavar"] = meta["metavar"]
        if meta.get("required"):
            options["required"] = True
        elif meta.get("recipe") or meta.get("parent") or kind == "on_off":
            options["default"] = None
        elif kind != "switch":
            options["default"] = f.default
        target.add_argument(flag, **options)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)
