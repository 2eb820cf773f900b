"""`simpsons-ray report`: read and reduce the labels (facts.py), write the one HTML page (html.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError
from simpsons_ray.report.facts import ReportConfig, collect


@dataclass
class ReportResult:
    output_uri: str
    episodes: int
    bytes: int
    seconds: float


def build_report(config: ReportConfig) -> ReportResult:
    """Read the labels, write the HTML report, and say how long it took."""
    if config.thumbnails < 0:
        raise UserError(f"--thumbnails must be 0 or more, got {config.thumbnails}.")
    started = time.monotonic()
    if config.model_uri and not storage.exists(storage.join(config.model_uri, "config.json")):  # before any label is read
        raise UserError(f"{config.model_uri} is not a model artifact: it has no config.json; pass the --output of `simpsons-ray train`.")
    labels, facts = collect(config)
    from simpsons_ray.report.html import build_html  # the page; this module reads and reduces the labels

    page = build_html(config, labels, facts, started).encode()
    storage.write_bytes(config.output_uri, page)
    return ReportResult(config.output_uri, len(facts), len(page), time.monotonic() - started)
