"""The report's page: sections of HTML, inline SVG charts, thumbnails and a small script, from :mod:`simpsons_ray.report`'s facts.

Nothing here reads labels. The page carries everything it shows (styles, script,
charts, JPEG thumbnails in base64), so it needs no server and no network; the
timelines travel as compact JSON and the browser draws each one when it is opened.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd

from simpsons_ray import query, storage
from simpsons_ray.console import duration
from simpsons_ray.report import (
    TABLE_CHARACTERS,
    THUMBNAIL_PX,
    EpisodeFacts,
    ReportConfig,
    best_frames,
    quality_table,
    screen_table,
    together_table,
)

log = logging.getLogger("simpsons_ray.report")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


# matplotlib's "tab20", the palette of plots.character_colors, written out: importing
# matplotlib would cost the report 1.5 s for twenty colours.
_TAB20 = ("#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd", "#c5b0d5",
          "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d", "#17becf", "#9edae5")


def _colors(characters: Iterable[str]) -> dict[str, str]:
    """The same colour per character as the PNG charts: sorted names down the palette."""
    return {name: _TAB20[i % len(_TAB20)] for i, name in enumerate(sorted(set(characters)))}


def _table(df: pd.DataFrame, formats: dict[str, Any], table_id: str, sortable: bool = True) -> str:
    """A table whose cells carry their raw value (``data-v``) so the page's script can sort them."""
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for column, value in zip(df.columns, row):
            shown = formats[column](value) if column in formats else _e(value)
            raw = value if isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating)) and not math.isnan(value)) else ""
            sort_value = f' data-v="{raw}"' if raw != "" else ""
            cells.append(f"<td{sort_value}>{shown}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = ' class="sortable"' if sortable else ""
    return f'<table id="{table_id}"{cls}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _bars_svg(values: pd.Series, colors: dict[str, str], unit: str, width: int = 900) -> str:
    """A horizontal bar per character (series totals)."""
    if values.empty:
        return "<p>No character on screen.</p>"
    top = float(values.max()) or 1.0
    row_h, label_w = 20, 170
    height = row_h * len(values) + 10
    bars = []
    for i, (name, value) in enumerate(values.items()):
        w = max(1.0, (width - label_w - 80) * float(value) / top)
        y = 5 + i * row_h
        bars.append(
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{_e(name)}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row_h - 5}" fill="{colors.get(name, "#888")}">'
            f"<title>{_e(name)}: {_num(float(value))} {unit}</title></rect>"
            f'<text x="{label_w + w + 4:.1f}" y="{y + 14}">{_num(float(value))}</text>'
        )
    return f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}">{"".join(bars)}</svg>'


def _stacked_svg(pivot: pd.DataFrame, colors: dict[str, str], unit: str, width: int = 1100, height: int = 260) -> str:
    """One stacked bar per episode (rows of ``pivot``), a colour per character (columns)."""
    if pivot.empty:
        return ""
    totals = pivot.sum(axis=1)
    top = float(totals.max()) or 1.0
    left, bottom = 50, 20
    bar_w = (width - left - 10) / len(pivot)
    rects = []
    for i, (episode, row) in enumerate(pivot.iterrows()):
        y = height - bottom
        for name, value in row.items():
            if not value or math.isnan(value):
                continue
            h = (height - bottom - 10) * float(value) / top
            y -= h
            rects.append(f'<rect x="{left + i * bar_w:.2f}" y="{y:.2f}" width="{max(bar_w - 0.5, 0.5):.2f}" height="{h:.2f}" '
                         f'fill="{colors.get(name, "#bbb")}"><title>{_e(episode)} {_e(name)}: {_num(float(value))} {unit}</title></rect>')
    axis = (f'<text x="{left - 4}" y="16" text-anchor="end">{_num(top, 0)}</text>'
            f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">0</text>'
            f'<text x="{left}" y="{height - 4}">{_e(pivot.index[0])}</text>'
            f'<text x="{width - 10}" y="{height - 4}" text-anchor="end">{_e(pivot.index[-1])}</text>')
    return f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}">{axis}{"".join(rects)}</svg>'


def _heatmap_svg(together: pd.DataFrame, names: list[str], value: str) -> str:
    """Pairs on screen together as a symmetric grid, darker for longer."""
    index = {n: i for i, n in enumerate(names)}
    n = len(names)
    if n < 2 or together.empty:
        return ""
    cell, label_w = 22, 160
    size = label_w + cell * n + 10
    top = float(together[value].max()) or 1.0
    parts = []
    for i, name in enumerate(names):
        parts.append(f'<text x="{label_w - 4}" y="{label_w + i * cell + 15}" text-anchor="end">{_e(name)}</text>')
        parts.append(f'<text transform="translate({label_w + i * cell + 15},{label_w - 4}) rotate(-60)">{_e(name)}</text>')
    for row in together.itertuples(index=False):
        if row.a not in index or row.b not in index:
            continue
        v = getattr(row, value)
        shade = 0.15 + 0.85 * float(v) / top if v == v else 0.15
        for i, j in ((index[row.a], index[row.b]), (index[row.b], index[row.a])):
            parts.append(f'<rect x="{label_w + j * cell}" y="{label_w + i * cell}" width="{cell - 1}" height="{cell - 1}" '
                         f'fill="rgba(200,60,20,{shade:.3f})"><title>{_e(row.a)} + {_e(row.b)}: {_num(float(v))}</title></rect>')
    return f'<svg class="chart" width="{size}" height="{size}" viewBox="0 0 {size} {size}">{"".join(parts)}</svg>'


def _thumbnails(best: pd.DataFrame) -> dict[str, str | None]:
    """source -> a base64 JPEG thumbnail (None where the source can't be read)."""
    if best.empty:
        return {}
    from PIL import ImageOps

    from simpsons_ray.plots import fetch_sources, thumbnail

    out: dict[str, str | None] = {}
    problems: list[str] = []
    fetched = fetch_sources(best["source"].tolist(), warn=problems.append)
    if problems:  # one line, not one per frame: a moved dump would otherwise flood the terminal
        log.warning("report: %d thumbnail source(s) could not be read, shown as grey tiles; the first: %s", len(problems), problems[0])
    for source, data in fetched.items():
        image = thumbnail(data)
        if image is None:
            out[source] = None
            continue
        image = ImageOps.contain(image, THUMBNAIL_PX)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        out[source] = base64.b64encode(buffer.getvalue()).decode()
    return out


def _model_card(model_uri: str) -> str:
    """The model's own scores: test beside validation, calibration, and its pictures."""
    metrics_uri = storage.join(model_uri, "metrics.json")  # build_report checked that it is an artifact
    if not storage.exists(metrics_uri):
        return f"<p>The model at {_e(model_uri)} has no metrics.json: it was not trained by this version of <code>train</code>.</p>"
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
            "ece_before": cal.get("ece_before", math.nan),
            "ece_after": cal.get("ece_after", math.nan),
            "temperature": cal.get("temperature", math.nan),
        })
    f3 = lambda v: _num(v, 3)  # noqa: E731
    parts = [f"<p>model <code>{_e(metrics.get('model_id', '?'))}</code>, best epoch {_e(metrics.get('best_epoch', '?'))} "
             f"of {_e(metrics.get('epochs_run', '?'))}</p>",
             _table(pd.DataFrame(rows), {c: f3 for c in ("accuracy", "macro_f1", "nobody_recall", "ece_before", "ece_after", "temperature")},
                    "model-scores", sortable=False)]
    if any(str(r["split"]).endswith("thresholds)") for r in rows):
        parts.append("<p>A multi-label model, scored on frames composed of 0-3 characters: <em>images</em> counts those frames, "
                     "<em>accuracy</em> is the share whose set of characters is exactly right, <em>nobody_recall</em> the share of "
                     "empty frames it called empty.</p>")
    for name, title in (("confusion_matrix.png", "confusion matrix"), ("reliability.png", "calibration"), ("curves.png", "training curves")):
        uri = storage.join(model_uri, name)
        if storage.exists(uri):
            data = base64.b64encode(storage.read_bytes(uri)).decode()
            parts.append(f'<figure class="model-picture"><img alt="{title}" src="data:image/png;base64,{data}"><figcaption>{title}</figcaption></figure>')
    return "".join(parts)


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 2em 3em;color:#222}
h1{margin-top:.8em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
nav a{margin-right:1em}
.cards{display:flex;flex-wrap:wrap;gap:.8em}.card{border:1px solid #ddd;border-radius:6px;padding:.5em 1em}
.card b{display:block;font-size:1.4em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}
table.sortable th{cursor:pointer}table.sortable th.asc:after{content:" \\25B2"}table.sortable th.desc:after{content:" \\25BC"}
.scroll{max-height:32em;overflow:auto}
svg.chart text{font-size:11px}
details{margin:.3em 0}summary{cursor:pointer}
.sheet{display:flex;flex-wrap:wrap;gap:6px}.sheet figure{margin:0;width:160px;font-size:11px}
.sheet img,.sheet .missing{width:160px;height:120px;object-fit:contain;background:#eee;display:block}
.sheet .missing{display:flex;align-items:center;justify-content:center;color:#900}
.model-picture img{max-width:560px}.model-picture{display:inline-block;margin:.5em}
.legend span{display:inline-block;margin-right:1em}.legend i{display:inline-block;width:10px;height:10px;margin-right:3px}
"""

_SCRIPT = r"""
(function () {
  function value(cell) { var v = cell.getAttribute('data-v'); return v === null ? cell.textContent : parseFloat(v); }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('th').forEach(function (th) {
      th.addEventListener('click', function () {
        var col = th.cellIndex, asc = !th.classList.contains('asc');
        table.querySelectorAll('th').forEach(function (h) { h.classList.remove('asc', 'desc'); });
        th.classList.add(asc ? 'asc' : 'desc');
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (r1, r2) {
          var a = value(r1.cells[col]), b = value(r2.cells[col]);
          if (typeof a === 'number' && typeof b === 'number') { return asc ? a - b : b - a; }
          return asc ? String(a).localeCompare(String(b)) : String(b).localeCompare(String(a));
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  var data = JSON.parse(document.getElementById('timeline-data').textContent);
  var NS = 'http://www.w3.org/2000/svg';
  function draw(details) {
    var episode = details.getAttribute('data-episode'), info = data.episodes[episode];
    if (!info || details.querySelector('svg')) { return; }
    var lanes = data.lanes, lane = 18, left = 170, width = 1100, end = Math.max(info.end, 1e-9);
    var svg = document.createElementNS(NS, 'svg');
    svg.setAttribute('class', 'chart timeline');
    svg.setAttribute('width', width); svg.setAttribute('height', lanes.length * lane + 24);
    lanes.forEach(function (name, i) {
      var t = document.createElementNS(NS, 'text');
      t.setAttribute('x', left - 6); t.setAttribute('y', i * lane + 13); t.setAttribute('text-anchor', 'end');
      t.textContent = name; svg.appendChild(t);
    });
    info.segments.forEach(function (s) {
      var r = document.createElementNS(NS, 'rect');
      r.setAttribute('x', left + (width - left - 10) * s[1] / end);
      r.setAttribute('width', Math.max(1, (width - left - 10) * s[2] / end));
      r.setAttribute('y', s[0] * lane + 2); r.setAttribute('height', lane - 4);
      r.setAttribute('fill', data.colors[lanes[s[0]]] || '#888');
      var title = document.createElementNS(NS, 'title');
      title.textContent = lanes[s[0]] + ' ' + s[1].toFixed(1) + '-' + (s[1] + s[2]).toFixed(1) + ' ' + info.unit;
      r.appendChild(title); svg.appendChild(r);
    });
    var axis = document.createElementNS(NS, 'text');
    axis.setAttribute('x', left); axis.setAttribute('y', lanes.length * lane + 18);
    axis.textContent = '0 - ' + info.end.toFixed(1) + ' ' + info.unit;
    svg.appendChild(axis);
    details.appendChild(svg);
  }
  document.querySelectorAll('details.timeline').forEach(function (d) {
    d.addEventListener('toggle', function () { if (d.open) { draw(d); } });
    if (d.open) { draw(d); }
  });
  document.getElementById('open-all').addEventListener('click', function () {
    document.querySelectorAll('details.timeline').forEach(function (d) { d.open = true; draw(d); });
  });
})();
"""


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
        episodes[f.episode] = {"end": round(end, 2), "unit": "s" if timed else "frames", "segments": items}
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
    page = _Page(config, labels.uri, facts, screen, quality_table(facts), timed, totals, _colors(totals.index))
    sections = [_header, _summary, _series_totals, _season_totals, _per_episode, _together, _timelines, _characters, _quality]
    out = [section(page) for section in sections]
    if config.model_uri:
        out.append("<h2 id='model'>Model</h2>" + _model_card(config.model_uri))
    elapsed = time.monotonic() - started
    out.append(f"<footer><p id='build-time'>Built by simpsons-ray in {elapsed:.1f} s on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.</p></footer>")
    out.append(f"<script>{_SCRIPT}</script></body></html>")
    return "".join(out)


def _header(page: _Page) -> str:
    config = page.config
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>simpsons-ray report: {_e(page.labels_uri)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>Who is on screen</h1><p>Labels <code>{_e(page.labels_uri)}</code>: {len(page.facts)} episode(s)"
            + (f", characters {_e(', '.join(config.characters))}" if config.characters else "")
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
             ("mean confidence", _num(mean_conf, 3)), (f"confidence < {page.config.low_confidence:g}", _num(100 * low, 1) + "%"),
             ("characters", f"{len(page.characters):,}"), ("model(s)", ", ".join(models) or "-")]
    return ("<h2 id='summary'>Summary</h2><div class='cards'>"
            + "".join(f"<div class='card' data-name='{_e(k)}'><b>{_e(v)}</b>{_e(k)}</div>" for k, v in cards) + "</div>")


def _series_totals(page: _Page) -> str:
    out = f"<h2 id='totals'>Series totals</h2><p>Time on screen per character, all selected episodes ({page.unit}).</p>"
    if not len(page.screen):
        return out + "<p>No character on screen in these labels.</p>"
    series = page.screen.groupby("character").agg(frames=("frames", "sum"), seconds=("seconds", lambda s: s.sum(min_count=1)),
                                                  episodes=("episode", "nunique"))
    series["share_of_labelled"] = series["frames"] / page.labelled if page.labelled else math.nan
    series = series.loc[page.characters].reset_index()
    return (out + _bars_svg(page.totals, page.colors, page.unit)
            + _table(series, {"seconds": duration, "share_of_labelled": lambda v: _num(100 * v, 1) + "%"}, "series-totals"))


def _season_totals(page: _Page) -> str:
    out = f"<h2 id='seasons'>Season totals</h2><p>{page.unit} per character and season; seasons come from episode ids like s01e05.</p>"
    if not len(page.screen):
        return out
    season = page.screen.pivot_table(index="season", columns="character", values=page.measure, aggfunc="sum", fill_value=0)
    season = season[[c for c in page.characters if c in season.columns]].reset_index()
    fmt = duration if page.timed else (lambda v: f"{int(v):,}")
    return out + _table(season, {c: fmt for c in page.characters}, "season-totals")


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
    legend = "<div class='legend'>" + "".join(f"<span><i style='background:{page.colors[c]}'></i>{_e(c)}</span>" for c in shown) + "</div>"
    fmt = (lambda v: _num(float(v), 1)) if page.timed else (lambda v: f"{int(v):,}")
    table = _table(per_episode.reset_index(), {c: fmt for c in per_episode.columns}, "episode-screen-time")
    return out + legend + _stacked_svg(per_episode, page.colors, page.unit) + "<div class='scroll'>" + table + "</div>"


def _together(page: _Page) -> str:
    out = "<h2 id='together'>On screen together</h2>"
    if not any(f.multi_label for f in page.facts):
        return out + ("<p>These labels name one character per frame (no <code>characters</code> column), so no two characters "
                      "share a frame. Label with a multi-label model to see who appears with whom.</p>")
    together = together_table(page.facts)
    if together.empty:
        return out + "<p>No two characters shared a frame.</p>"
    names = [c for c in page.characters if c in set(together["a"]) | set(together["b"])]
    return (out + "<div class='heatmap'>" + _heatmap_svg(together, names, page.measure) + "</div>"
            + "<div class='scroll'>" + _table(together, {"seconds": duration}, "together-table") + "</div>")


def _timelines(page: _Page) -> str:
    out = [f"<h2 id='timelines'>Timelines</h2><p>Every episode, one lane per character; open one to draw it. "
           f"<button id='open-all' type='button'>open all {len(page.facts)}</button></p>"]
    for i, f in enumerate(page.facts):
        opened = " open" if i == 0 else ""
        out.append(f"<details class='timeline' data-episode='{_e(f.episode)}'{opened}><summary>{_e(f.episode)}: "
                   f"{len(f.segments):,} segments, {f.labelled:,} labelled of {f.rows:,} frames</summary></details>")
    out.append(f"<script type='application/json' id='timeline-data'>{_timeline_data(page.facts, page.characters, page.colors)}</script>")
    return "".join(out)


def _characters(page: _Page) -> str:
    out = [f"<h2 id='characters'>Characters</h2><p>Each character's {page.config.thumbnails} most confident frames.</p>"]
    best = best_frames(page.facts, page.config.thumbnails)
    if best.empty:
        return out[0]
    from simpsons_ray.plots import clock

    thumbs = _thumbnails(best)
    for name in page.characters:
        figures = []
        for row in best[best["character"] == name].itertuples(index=False):
            caption = f"{row.episode} {clock(row.timestamp_s, row.frame)} · {row.score:.3f}"
            data = thumbs.get(row.source)
            picture = (f"<img alt='{_e(name)}' src='data:image/jpeg;base64,{data}'>" if data
                       else "<div class='missing'>unreadable source</div>")
            figures.append(f"<figure title='{_e(row.source)}'>{picture}<figcaption>{_e(caption)}</figcaption></figure>")
        if figures:
            out.append(f"<h3 id='character-{_e(name)}'>{_e(name)}</h3><div class='sheet'>{''.join(figures)}</div>")
    return "".join(out)


def _quality(page: _Page) -> str:
    f3 = lambda v: _num(v, 3)  # noqa: E731
    percent = lambda v: _num(100 * v, 1) + "%"  # noqa: E731
    table = _table(page.quality, {"mean_confidence": f3, "low_confidence_share": percent, "minutes": lambda v: _num(v, 1)}, "quality-table")
    return (f"<h2 id='quality'>Quality</h2><p>Per episode: frames labelled, frames with nobody, error rows (frames that "
            f"could not be read), mean top-1 confidence and the share under {page.config.low_confidence:g}.</p>"
            f"<div class='scroll'>{table}</div>")
