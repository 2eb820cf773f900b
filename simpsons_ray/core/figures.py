"""Charts as files: a matplotlib figure of a size in pixels, saved through storage.

Drawn with matplotlib's Agg renderer on a bare ``Figure``, never through pyplot, so
nothing needs a display or touches global matplotlib state. Sizes are set in pixels
by the caller, never by the data's extent, so a picture's size is known before it
is drawn.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Iterable

from simpsons_ray.core import storage

if TYPE_CHECKING:
    from matplotlib.figure import Figure


DPI = 100


def new_figure(width_px: int, height_px: int) -> Figure:
    """A bare Agg figure of that many pixels (matplotlib is imported here, when a chart is drawn: it takes seconds)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")


def save_figure(fig: Figure, uri: str) -> None:
    """Render with Agg to PNG (or whatever the extension names) and write it through storage."""
    fmt = storage.basename(uri).rsplit(".", 1)[-1].lower() if "." in storage.basename(uri) else "png"
    buffer = io.BytesIO()
    # No bbox_inches="tight": it would crop, and the size would depend on the data.
    fig.savefig(buffer, format=fmt, dpi=DPI)
    storage.write_bytes(uri, buffer.getvalue())


# matplotlib's "tab20" palette, written out: the HTML report colours characters as the
# PNG charts do without importing matplotlib (1.5 s for twenty colours).
TAB20 = ("#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd", "#c5b0d5",
         "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d", "#17becf", "#9edae5")


def character_colors(characters: Iterable[str]) -> dict[str, str]:
    """A stable colour per character, the same in every chart and in the report: sorted names down the palette."""
    return {name: TAB20[i % len(TAB20)] for i, name in enumerate(sorted(set(characters)))}
