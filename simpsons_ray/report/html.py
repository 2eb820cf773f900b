"""The report's page: sections of HTML, inline SVG charts, thumbnails and a small script, from :mod:`simpsons_ray.report`'s facts.

Nothing here reads labels. The page carries everything it shows (styles, script,
charts, JPEG thumbnails in base64), so it needs no server and no network; the
timelines travel as compact JSON and the browser draws each one when it is opened.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import time
from dataclasses import dataclass

import pandas as pd

from simpsons_ray import query
from simpsons_ray.core import storage
from simpsons_ray.core.clock import clock, frame_time
from simpsons_ray.core.figures import character_colors
from simpsons_ray.labels.thumbnails import fetch_sources, thumbnail
from simpsons_ray.report.assets import SCRIPT, STYLE
from simpsons_ray.report.facts import (
    TABLE_CHARACTERS,
    THUMBNAIL_PX,
    EpisodeFacts,
    ReportConfig,
    best_frames,
    quality_table,
    screen_table,
    together_table,
)
from simpsons_ray.report.parts import bars_svg, escape, heatmap_svg, html_table, number, stacked_svg

log = logging.getLogger("simpsons_ray.report")


def _thumbnails(best: pd.DataFrame) -> dict[str, str | None]:
    """source -> a base64 JPEG thumbnail (None where the source can't be read)."""
    if best.empty:
        return {}
    out: dict[str, str | None] = {}
    problems: list[str] = []
    fetched = fetch_sources(best["source"].tolist(), warn=problems.append)
    if problems:  # one line, not one per frame: a moved dump would otherwise flood the terminal
        log.warning("report: %d thumbnail source(s) could not be read, shown as grey tiles; the first: %s", len(problems), problems[0])
    for source, data in fetched.items():
        image = thumbnail(data, THUMBNAIL_PX)
        if image is None:
            out[source] = None
            continue
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        out[source] = base64.b64encode(buffer.getvalue()).decode()
    return out


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _model_card(model_uri: str) -> str:
    """The model's own scores: test beside validation, calibration, and its pictures."""
    metrics_uri = storage.join(model_uri, "metrics.json")  # build_report checked that it is an artifact
    if not storage.exists(metrics_uri):
        return f"<p>The model at {escape(model_uri)} has no metrics.json: it was not trained by this version of <code>train</code>.</p>"
    metrics = storage.read_json(metrics_uri)
    rows = []
    for split in ("test", "validation"):
        result = metrics.get(split)
        if not result:
            continue
        cal = result.get("calibration") or {}
        multi = result.get("objective") == "multilabel"  # scored on composed frames: exact sets, and who is nobody
        rows.append({
            "split": split + (" (reported only)" if split == "test" else
                              " (chose the epoch, temperature and thresholds)" if multi else " (chose the epoch and temperature)"),
            "images": result.get("num_frames") if multi else result.get("num_images"),
            "accuracy": result.get("accuracy"),
            "macro_f1": result.get("macro_f1"),
            "nobody_recall": (result.get("nobody") or {}).get("recall", math.nan),
            "picture_accuracy": (result.get("pictures") or {}).get("accuracy", math.nan) if multi else result.get("accuracy"),
            "false_name_rate": _or_nan((result.get("strangers") or {}).get("false_name_rate")),
            "ece_before": cal.get("ece_before", math.nan),
            "ece_after": cal.get("ece_after", math.nan),
            "temperature": cal.get("temperature", math.nan),
        })
    f3 = lambda v: number(v, 3)  # noqa: E731
    parts = [f"<p>model <code>{escape(metrics.get('model_id', '?'))}</code>, best epoch {escape(metrics.get('best_epoch', '?'))} "
             f"of {escape(metrics.get('epochs_run', '?'))}</p>",
             html_table(pd.DataFrame(rows), {c: f3 for c in ("accuracy", "macro_f1", "nobody_recall", "picture_accuracy", "false_name_rate",
                                                              "ece_before", "ece_after", "temperature")},
                    "model-scores", sortable=False)]
    if any(str(r["split"]).endswith("thresholds)") for r in rows):
        parts.append("<p>A multi-label model, scored on frames composed of 0-3 characters: <em>images</em> counts those frames, "
                     "<em>accuracy</em> is the share whose set of characters is exactly right, <em>nobody_recall</em> the share of "
                     "empty frames it called empty; <em>picture_accuracy</em> is its top-1 on the pictures as they are, "
                     "<em>false_name_rate</em> the share of pictures of characters it does not name (strangers) given a name.</p>")
    for name, title in (("confusion_matrix.png", "confusion matrix"), ("reliability.png", "calibration"), ("curves.png", "training curves")):
        uri = storage.join(model_uri, name)
        if storage.exists(uri):
            data = base64.b64encode(storage.read_bytes(uri)).decode()
            parts.append(f'<figure class="model-picture"><img alt="{title}" src="data:image/png;base64,{data}"><figcaption>{title}</figcaption></figure>')
    return "".join(parts)


def _timeline_data(facts: list[EpisodeFacts], lanes: list[str], colors: dict[str, str]) -> str:
    lane_of = {name: i for i, name in enumerate(lanes)}
    episodes = {}
    for f in facts:
        seg = f.segments
        timed = f.interval is not None
        if timed:
            starts, lengths = seg["start_s"].to_numpy(float), seg["duration_s"].to_numpy(float)
            end = f.seconds(f.rows) if f.rows else 0.0
            if len(seg):
                end = max(end, float(seg["end_s"].max()))
        else:
            starts = seg["first_frame"].to_numpy(float)
            lengths = (seg["last_frame"] - seg["first_frame"] + 1).to_numpy(float)
            end = float((seg["last_frame"] + 1).max()) if len(seg) else 1.0
        items = [[lane_of[c], round(float(s), 2), round(float(d), 2)] for c, s, d in zip(seg["character"], starts, lengths) if c in lane_of]
        episodes[f.episode] = {"end": round(end, 2), "unit": "s" if timed else "frames", "segments": items,
                               "cuts": [round(float(c), 2) for c in f.cuts]}
    text = json.dumps({"lanes": lanes, "colors": colors, "episodes": episodes}, separators=(",", ":"))
    return text.replace("</", "<\\/")  # never close the script element early


@dataclass
class _Page:
    """What every section of the page shares, computed once."""

    config: ReportConfig
    labels_uri: str
    facts: list[EpisodeFacts]
    screen: pd.DataFrame
    quality: pd.DataFrame
    timed: bool  # every episode has timestamps: times in seconds, else frame counts
    totals: pd.Series  # per character, longest on screen first
    colors: dict[str, str]

    @property
    def measure(self) -> str:
        return "seconds" if self.timed else "frames"

    @property
    def unit(self) -> str:
        return "s" if self.timed else "frames"

    @property
    def characters(self) -> list[str]:
        return list(self.totals.index)

    @property
    def rows(self) -> int:
        return int(self.quality["frames"].sum()) if len(self.quality) else 0

    @property
    def labelled(self) -> int:
        return int(self.quality["labelled"].sum()) if len(self.quality) else 0


def build_html(config: ReportConfig, labels: query.LabelsDataset, facts: list[EpisodeFacts], started: float) -> str:
    """The report as one HTML string."""
    screen = screen_table(facts)
    timed = bool(len(screen)) and screen["seconds"].notna().all()
    measure = "seconds" if timed else "frames"
    totals = screen.groupby("character")[measure].sum().sort_values(ascending=False, kind="stable") if len(screen) else pd.Series(dtype=float)
    page = _Page(config, labels.uri, facts, screen, quality_table(facts), timed, totals, character_colors(totals.index))
    sections = [_header, _summary, _series_totals, _season_totals, _per_episode, _together, _timelines, _characters, _quality]
    out = [section(page) for section in sections]
    if config.model_uri:
        out.append("<h2 id='model'>Model</h2>" + _model_card(config.model_uri))
    elapsed = time.monotonic() - started
    out.append(f"<footer><p id='build-time'>Built by simpsons-ray in {elapsed:.1f} s on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.</p></footer>")
    out.append(f"<script>{SCRIPT}</script></body></html>")
    return "".join(out)


def _header(page: _Page) -> str:
    config = page.config
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>simpsons-ray report: {escape(page.labels_uri)}</title><style>{STYLE}</style></head><body>"
            f"<h1>Who is on screen</h1><p>Labels <code>{escape(page.labels_uri)}</code>: {len(page.facts)} episode(s)"
            + (f", characters {escape(', '.join(config.characters))}" if config.characters else "")
            + (f", confidence at least {config.min_confidence:g}" if config.min_confidence else "") + ".</p>"
            "<nav><a href='#summary'>summary</a><a href='#totals'>totals</a><a href='#seasons'>seasons</a>"
            "<a href='#episodes'>episodes</a><a href='#together'>together</a><a href='#timelines'>timelines</a>"
            "<a href='#characters'>characters</a><a href='#quality'>quality</a>"
            + ("<a href='#model'>model</a>" if config.model_uri else "") + "</nav>")


def _summary(page: _Page) -> str:
    facts, rows, labelled = page.facts, page.rows, page.labelled
    confidences = [(f.mean_confidence, f.rows) for f in facts if not math.isnan(f.mean_confidence)]
    mean_conf = sum(c * n for c, n in confidences) / sum(n for _, n in confidences) if confidences else math.nan
    low = sum(f.low_confidence for f in facts) / rows if rows else math.nan
    models = sorted({m for f in facts for m in f.model_ids})
    errors = int(page.quality["error_rows"].sum()) if len(page.quality) else 0
    cards = [("episodes", f"{len(facts):,}"), ("frames", f"{rows:,}"), ("labelled frames", f"{labelled:,}"),
             ("nobody on screen", f"{rows - labelled:,}"), ("error rows", f"{errors:,}"),
             ("mean confidence", number(mean_conf, 3)), (f"confidence < {page.config.low_confidence:g}", number(100 * low, 1) + "%"),
             ("characters", f"{len(page.characters):,}"), ("model(s)", ", ".join(models) or "-")]
    return ("<h2 id='summary'>Summary</h2><div class='cards'>"
            + "".join(f"<div class='card' data-name='{escape(k)}'><b>{escape(v)}</b>{escape(k)}</div>" for k, v in cards) + "</div>")


def _series_totals(page: _Page) -> str:
    out = f"<h2 id='totals'>Series totals</h2><p>Time on screen per character, all selected episodes ({page.unit}).</p>"
    if not len(page.screen):
        return out + "<p>No character on screen in these labels.</p>"
    series = page.screen.groupby("character").agg(frames=("frames", "sum"), seconds=("seconds", lambda s: s.sum(min_count=1)),
                                                  episodes=("episode", "nunique"))
    series["share_of_labelled"] = series["frames"] / page.labelled if page.labelled else math.nan
    series = series.loc[page.characters].reset_index()
    return (out + bars_svg(page.totals, page.colors, page.unit)
            + html_table(series, {"seconds": clock, "share_of_labelled": lambda v: number(100 * v, 1) + "%"}, "series-totals"))


def _season_totals(page: _Page) -> str:
    out = f"<h2 id='seasons'>Season totals</h2><p>{page.unit} per character and season; seasons come from episode ids like s01e05.</p>"
    if not len(page.screen):
        return out
    season = page.screen.pivot_table(index="season", columns="character", values=page.measure, aggfunc="sum", fill_value=0)
    season = season[[c for c in page.characters if c in season.columns]].reset_index()
    fmt = clock if page.timed else (lambda v: f"{int(v):,}")
    return out + html_table(season, {c: fmt for c in page.characters}, "season-totals")


def _per_episode(page: _Page) -> str:
    characters = page.characters
    out = (f"<h2 id='episodes'>Screen time per episode</h2><p>{page.unit}; the {min(TABLE_CHARACTERS, len(characters))} "
           "characters longest on screen have a column, the rest are summed. Click a column to sort.</p>")
    if not len(page.screen):
        return out
    shown = characters[:TABLE_CHARACTERS]
    pivot = page.screen.pivot_table(index="episode", columns="character", values=page.measure, aggfunc="sum", fill_value=0)
    others = [c for c in pivot.columns if c not in shown]
    per_episode = pivot.reindex(columns=shown, fill_value=0)
    if others:
        per_episode["others"] = pivot[others].sum(axis=1)
    per_episode = per_episode.reindex([f.episode for f in page.facts], fill_value=0)
    legend = "<div class='legend'>" + "".join(f"<span><i style='background:{page.colors[c]}'></i>{escape(c)}</span>" for c in shown) + "</div>"
    fmt = (lambda v: number(float(v), 1)) if page.timed else (lambda v: f"{int(v):,}")
    table = html_table(per_episode.reset_index(), {c: fmt for c in per_episode.columns}, "episode-screen-time")
    return out + legend + stacked_svg(per_episode, page.colors, page.unit) + "<div class='scroll'>" + table + "</div>"


def _together(page: _Page) -> str:
    out = "<h2 id='together'>On screen together</h2>"
    if not any(f.multi_label for f in page.facts):
        return out + ("<p>These labels name one character per frame (no <code>characters</code> column), so no two characters "
                      "share a frame. Label with a multi-label model to see who appears with whom.</p>")
    together = together_table(page.facts)
    if together.empty:
        return out + "<p>No two characters shared a frame.</p>"
    names = [c for c in page.characters if c in set(together["a"]) | set(together["b"])]
    return (out + "<div class='heatmap'>" + heatmap_svg(together, names, page.measure) + "</div>"
            + "<div class='scroll'>" + html_table(together, {"seconds": clock}, "together-table") + "</div>")


def _timelines(page: _Page) -> str:
    out = [f"<h2 id='timelines'>Timelines</h2><p>Every episode, one lane per character, grey lines where shots change; open one to draw it. "
           f"<button id='open-all' type='button'>open all {len(page.facts)}</button></p>"]
    for i, f in enumerate(page.facts):
        opened = " open" if i == 0 else ""
        out.append(f"<details class='timeline' data-episode='{escape(f.episode)}'{opened}><summary>{escape(f.episode)}: "
                   f"{len(f.segments):,} segments, {f.labelled:,} labelled of {f.rows:,} frames"
                   f"{f', {f.shots:,} shots' if f.shots else ''}</summary></details>")
    out.append(f"<script type='application/json' id='timeline-data'>{_timeline_data(page.facts, page.characters, page.colors)}</script>")
    return "".join(out)


def _characters(page: _Page) -> str:
    out = [f"<h2 id='characters'>Characters</h2><p>Each character's {page.config.thumbnails} most confident frames.</p>"]
    best = best_frames(page.facts, page.config.thumbnails)
    if best.empty:
        return out[0]
    thumbs = _thumbnails(best)
    for name in page.characters:
        figures = []
        for row in best[best["character"] == name].itertuples(index=False):
            caption = f"{row.episode} {frame_time(row.timestamp_s, row.frame)} · {row.score:.3f}"
            data = thumbs.get(row.source)
            picture = (f"<img alt='{escape(name)}' src='data:image/jpeg;base64,{data}'>" if data
                       else "<div class='missing'>unreadable source</div>")
            figures.append(f"<figure title='{escape(row.source)}'>{picture}<figcaption>{escape(caption)}</figcaption></figure>")
        if figures:
            out.append(f"<h3 id='character-{escape(name)}'>{escape(name)}</h3><div class='sheet'>{''.join(figures)}</div>")
    return "".join(out)


def _quality(page: _Page) -> str:
    f3 = lambda v: number(v, 3)  # noqa: E731
    percent = lambda v: number(100 * v, 1) + "%"  # noqa: E731
    table = html_table(page.quality, {"mean_confidence": f3, "low_confidence_share": percent, "minutes": lambda v: number(v, 1)}, "quality-table")
    return (f"<h2 id='quality'>Quality</h2><p>Per episode: frames labelled, frames with nobody, error rows (frames that "
            f"could not be read), mean top-1 confidence and the share under {page.config.low_confidence:g}.</p>"
            f"<div class='scroll'>{table}</div>")
