"""The page's building blocks: escaped text, numbers, sortable tables and inline SVG charts.

Every value that reaches the page goes through :func:`escape` (names, ids and
sources are data, never markup).
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import pandas as pd


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def number(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def html_table(df: pd.DataFrame, formats: dict[str, Any], table_id: str, sortable: bool = True) -> str:
    """A table whose cells carry their raw value (``data-v``) so the page's script can sort them."""
    head = "".join(f"<th>{escape(c)}</th>" for c in df.columns)
    body = []
    for row in df.itertuples(index=False):
        cells = []
        for column, value in zip(df.columns, row):
            shown = formats[column](value) if column in formats else escape(value)
            raw = value if isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating)) and not math.isnan(value)) else ""
            sort_value = f' data-v="{raw}"' if raw != "" else ""
            cells.append(f"<td{sort_value}>{shown}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = ' class="sortable"' if sortable else ""
    return f'<table id="{table_id}"{cls}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def bars_svg(values: pd.Series, colors: dict[str, str], unit: str, width: int = 900) -> str:
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
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{escape(name)}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row_h - 5}" fill="{colors.get(name, "#888")}">'
            f"<title>{escape(name)}: {number(float(value))} {unit}</title></rect>"
            f'<text x="{label_w + w + 4:.1f}" y="{y + 14}">{number(float(value))}</text>'
        )
    return f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}">{"".join(bars)}</svg>'


def stacked_svg(pivot: pd.DataFrame, colors: dict[str, str], unit: str, width: int = 1100, height: int = 260) -> str:
    """One stacked bar per episode (rows of ``pivot``), a colour per character (columns)."""
    if pivot.empty:
        return ""
    totals = pivot.sum(axis=1)
    top = float(totals.max()) or 1.0
    left, bottom = 50, 20
    bar_w = (width - left - 10) / len(pivot)
    rects = []
    for i, (episode, row) in enumerate(pivot.iterrows()):
        y = float(height - bottom)
        for name, value in row.items():
            if not value or math.isnan(value):
                continue
            h = (height - bottom - 10) * float(value) / top
            y -= h
            rects.append(f'<rect x="{left + i * bar_w:.2f}" y="{y:.2f}" width="{max(bar_w - 0.5, 0.5):.2f}" height="{h:.2f}" '
                         f'fill="{colors.get(name, "#bbb")}"><title>{escape(episode)} {escape(name)}: {number(float(value))} {unit}</title></rect>')
    axis = (f'<text x="{left - 4}" y="16" text-anchor="end">{number(top, 0)}</text>'
            f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end">0</text>'
            f'<text x="{left}" y="{height - 4}">{escape(pivot.index[0])}</text>'
            f'<text x="{width - 10}" y="{height - 4}" text-anchor="end">{escape(pivot.index[-1])}</text>')
    return f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}">{axis}{"".join(rects)}</svg>'


def heatmap_svg(together: pd.DataFrame, names: list[str], value: str) -> str:
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
        parts.append(f'<text x="{label_w - 4}" y="{label_w + i * cell + 15}" text-anchor="end">{escape(name)}</text>')
        parts.append(f'<text transform="translate({label_w + i * cell + 15},{label_w - 4}) rotate(-60)">{escape(name)}</text>')
    for row in together.itertuples(index=False):
        if row.a not in index or row.b not in index:
            continue
        v = getattr(row, value)
        shade = 0.15 + 0.85 * float(v) / top if v == v else 0.15
        for i, j in ((index[row.a], index[row.b]), (index[row.b], index[row.a])):
            parts.append(f'<rect x="{label_w + j * cell}" y="{label_w + i * cell}" width="{cell - 1}" height="{cell - 1}" '
                         f'fill="rgba(200,60,20,{shade:.3f})"><title>{escape(row.a)} + {escape(row.b)}: {number(float(v))}</title></rect>')
    return f'<svg class="chart" width="{size}" height="{size}" viewBox="0 0 {size} {size}">{"".join(parts)}</svg>'
