"""Pictures of results: charts of the labels, and a contact sheet to check them by eye.

Every function takes a result table (a pandas DataFrame as :mod:`simpsons_ray.query`
returns it) and a destination URI (local path or ``s3://``), and writes one image
through :mod:`simpsons_ray.core.storage`. Charts are drawn with matplotlib's Agg
renderer on a bare ``Figure``, never through pyplot, so nothing here needs a
display or touches global matplotlib state; the contact sheet is assembled with PIL.

Sizes are set in pixels by the constants below (the timeline grows by a fixed
height per episode and character lane), never by the data's extent, so a
picture's size is known before it is drawn.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from simpsons_ray.core import storage
from simpsons_ray.core.clock import frame_time
from simpsons_ray.core.errors import UserError
from simpsons_ray.core.figures import character_colors, new_figure, save_figure
from simpsons_ray.labels.thumbnails import fetch_sources, thumbnail

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ shared helpers


# ============================================================ query pictures
SCREEN_TIME_CHART_PX = (1200, 600)
SCREEN_TIME_TOP_CHARACTERS = 12  # the rest share one "other" band, or the legend is unreadable
OTHER = "other"


def screen_time_chart(screen_time: pd.DataFrame, uri: str, title: str = "Screen time per episode") -> None:
    """A stacked bar per episode, one band per character (``query.screen_time``'s table).

    Bars are in seconds when every episode has timestamps, in frames otherwise
    (seconds of some episodes and frames of others would not add up).
    """
    fig = new_figure(*SCREEN_TIME_CHART_PX)
    ax = fig.subplots()
    if screen_time.empty:
        ax.text(0.5, 0.5, "no labelled frames", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        use_seconds = screen_time["seconds"].notna().all()
        value = "seconds" if use_seconds else "frames"
        table = screen_time.pivot_table(index="episode", columns="character", values=value, aggfunc="sum", fill_value=0)
        ranked = table.sum().sort_values(ascending=False).index.tolist()
        top = ranked[:SCREEN_TIME_TOP_CHARACTERS]
        if len(ranked) > len(top):
            table[OTHER] = table[ranked[len(top):]].sum(axis=1)
            top = top + [OTHER]
        colors = character_colors(ranked[:SCREEN_TIME_TOP_CHARACTERS])
        colors[OTHER] = "#bfbfbf"
        positions = np.arange(len(table.index))
        bottom = np.zeros(len(table.index))
        for name in top:
            heights = table[name].to_numpy(dtype=float)
            ax.bar(positions, heights, bottom=bottom, color=colors[name], label=name, width=0.8)
            bottom += heights
        ax.set_xticks(positions, table.index.tolist(), rotation=90 if len(positions) > 12 else 0, fontsize=8)
        ax.set_xlim(-0.6, len(positions) - 0.4)
        ax.set_ylabel("seconds on screen" if use_seconds else "frames on screen")
        ax.set_xlabel("episode")
        handles, names = ax.get_legend_handles_labels()
        # Top band first, as the bars read from the top.
        ax.legend(handles[::-1], names[::-1], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    ax.set_title(title)
    save_figure(fig, uri)


TIMELINE_WIDTH_PX = 1200
TIMELINE_LANE_PX = 28
TIMELINE_PANEL_EXTRA_PX = 70  # axis labels and the panel title
TIMELINE_MAX_EPISODES = 8


def timeline_size(episodes: int, lanes: int) -> tuple[int, int]:
    """Pixel size of :func:`segments_timeline` for that many episode panels and character lanes."""
    return TIMELINE_WIDTH_PX, max(1, episodes) * (TIMELINE_PANEL_EXTRA_PX + TIMELINE_LANE_PX * max(1, lanes))


def segments_timeline(segments: pd.DataFrame, uri: str) -> None:
    """One panel per episode, one lane per character, a bar per on-screen segment.

    The x axis is seconds; for an episode labelled without timestamps it is frame
    numbers. Lanes are ordered by total time on screen, the same in every panel.
    """
    episodes = sorted(segments["episode"].unique()) if not segments.empty else []
    if len(episodes) > TIMELINE_MAX_EPISODES:
        raise UserError(
            f"A timeline of {len(episodes)} episodes is unreadable: pick at most {TIMELINE_MAX_EPISODES} with --episode."
        )
    timed = segments["start_s"].notna()
    length = np.where(timed, segments["duration_s"], segments["last_frame"] - segments["first_frame"] + 1)
    lanes = segments.assign(length=length).groupby("character")["length"].sum().sort_values(ascending=False).index.tolist()
    fig = new_figure(*timeline_size(len(episodes), len(lanes)))
    if not episodes:
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no segments", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        save_figure(fig, uri)
        return
    colors = character_colors(lanes)
    axes = np.atleast_1d(fig.subplots(len(episodes), 1, squeeze=False)[:, 0])
    for ax, episode in zip(axes, episodes):
        rows = segments[segments["episode"] == episode]
        episode_timed = bool(rows["start_s"].notna().all())
        for lane, name in enumerate(lanes):
            mine = rows[rows["character"] == name]
            if mine.empty:
                continue
            if episode_timed:
                ranges = list(zip(mine["start_s"].to_numpy(float), mine["duration_s"].to_numpy(float)))
            else:
                ranges = list(zip(mine["first_frame"].to_numpy(float), (mine["last_frame"] - mine["first_frame"] + 1).to_numpy(float)))
            ax.broken_barh(ranges, (lane - 0.4, 0.8), facecolors=colors[name])
        ax.set_yticks(range(len(lanes)), lanes, fontsize=8)
        ax.set_ylim(len(lanes) - 0.5, -0.5)
        ax.set_xlabel("seconds" if episode_timed else "frame", fontsize=8)
        ax.set_title(f"episode {episode}", fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    save_figure(fig, uri)


TOGETHER_MAX_CHARACTERS = 30  # the characters longest on screen with others; more cells are unreadable
TOGETHER_ANNOTATE_UP_TO = 15  # characters; beyond this the numbers no longer fit their cells
TOGETHER_CELL_PX = 36
TOGETHER_MARGIN_PX = 260  # names on both axes, the title and the colour bar


def together_heatmap_size(characters: int) -> tuple[int, int]:
    """Pixel size of :func:`together_heatmap` for that many characters (before TOGETHER_MAX_CHARACTERS applies)."""
    n = min(max(characters, 2), TOGETHER_MAX_CHARACTERS)
    side = TOGETHER_MARGIN_PX + TOGETHER_CELL_PX * n
    return side + 120, side  # the colour bar takes the extra width


def together_heatmap(together: pd.DataFrame, uri: str, title: str = "On screen together") -> None:
    """A symmetric character x character grid of the time each pair shares the screen (``query.together``'s table).

    Cells are seconds when every pair has seconds, frames otherwise (as in
    :func:`screen_time_chart`); the diagonal is blank. Characters are ordered by
    their total time with others, and only the TOGETHER_MAX_CHARACTERS first are
    drawn; with up to TOGETHER_ANNOTATE_UP_TO of them each cell shows its number.
    """
    names = pd.concat([together["a"], together["b"]]).unique() if len(together) else []
    fig = new_figure(*together_heatmap_size(len(names)))
    ax = fig.subplots()
    if together.empty:
        ax.text(0.5, 0.5, "no characters on screen together", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title(title)
        save_figure(fig, uri)
        return
    use_seconds = bool(together["seconds"].notna().all())
    value = "seconds" if use_seconds else "frames"
    both_ways = pd.concat([together[["a", "b", value]], together[["b", "a", value]].set_axis(["a", "b", value], axis=1)])
    matrix = both_ways.pivot_table(index="a", columns="b", values=value, aggfunc="sum", fill_value=0.0)
    order = matrix.sum(axis=1).sort_values(ascending=False, kind="stable").index[:TOGETHER_MAX_CHARACTERS].tolist()
    matrix = np.array(matrix.reindex(index=order, columns=order, fill_value=0.0), dtype=float)  # a writable copy
    np.fill_diagonal(matrix, np.nan)
    image = ax.imshow(matrix, cmap="Oranges", vmin=0, vmax=np.nanmax(matrix) or 1.0)
    n = len(order)
    ax.set_xticks(range(n), order, rotation=90, fontsize=8)
    ax.set_yticks(range(n), order, fontsize=8)
    fig.colorbar(image, ax=ax, label="seconds together" if use_seconds else "frames together", shrink=0.8)
    if n <= TOGETHER_ANNOTATE_UP_TO:
        top = np.nanmax(matrix) or 1.0
        for i in range(n):
            for j in range(n):
                if i != j and matrix[i, j] > 0:
                    text = f"{matrix[i, j]:.0f}" if not use_seconds or matrix[i, j] >= 10 else f"{matrix[i, j]:.1f}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if matrix[i, j] > top / 2 else "black")
    shown = f" (the {n} of {len(names)} characters longest on screen with others)" if n < len(names) else ""
    ax.set_title(title + shown)
    save_figure(fig, uri)


CONTACT_SHEET_THUMB_PX = (240, 180)  # 4:3; wider frames are letterboxed inside
CONTACT_SHEET_CAPTION_PX = 36
CONTACT_SHEET_TITLE_PX = 32
CONTACT_SHEET_COLUMNS = 6


def contact_sheet_size(frames: int, columns: int = CONTACT_SHEET_COLUMNS) -> tuple[int, int]:
    """Pixel size of :func:`contact_sheet` for that many frames."""
    columns = max(1, min(columns, frames))
    rows = max(1, math.ceil(frames / columns))
    thumb_w, thumb_h = CONTACT_SHEET_THUMB_PX
    return columns * thumb_w, CONTACT_SHEET_TITLE_PX + rows * (thumb_h + CONTACT_SHEET_CAPTION_PX)


def contact_sheet(frames: pd.DataFrame, uri: str, title: str = "", columns: int = CONTACT_SHEET_COLUMNS) -> None:
    """A grid of the frames' thumbnails, in the table's order, captioned with episode, time and confidence.

    Thumbnails are read from each row's ``source``: a file URI, ``<archive
    URI>#<member>`` for a member of a tar or tar.gz archive (each archive is
    streamed once, and only until its last wanted member), or ``<video
    URI>#t=<seconds>`` for a video frame (each video opened once, seeking to each time). A source that can't be
    read or decoded becomes a grey tile saying so, rather than failing the sheet.
    """
    sources = frames["source"].tolist()
    images = fetch_sources(sources)
    width, height = contact_sheet_size(len(sources), columns)
    columns = max(1, min(columns, len(sources)))
    thumb_w, thumb_h = CONTACT_SHEET_THUMB_PX
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(14)
    draw.text((8, 8), title or f"{len(sources)} frames", fill=(0, 0, 0), font=font)
    for i, row in enumerate(frames.itertuples(index=False)):
        x = (i % columns) * thumb_w
        y = CONTACT_SHEET_TITLE_PX + (i // columns) * (thumb_h + CONTACT_SHEET_CAPTION_PX)
        thumb = thumbnail(images.get(row.source), CONTACT_SHEET_THUMB_PX)
        if thumb is None:
            draw.rectangle((x + 2, y + 2, x + thumb_w - 3, y + thumb_h - 3), fill=(200, 200, 200))
            draw.text((x + 10, y + thumb_h // 2 - 8), "unreadable source", fill=(90, 0, 0), font=font)
        else:
            sheet.paste(thumb, (x + (thumb_w - thumb.width) // 2, y + (thumb_h - thumb.height) // 2))
        caption = f"{row.episode}  {frame_time(row.timestamp_s, row.frame)}\nconfidence {row.confidence:.3f}"
        draw.multiline_text((x + 6, y + thumb_h + 2), caption, fill=(0, 0, 0), font=_font(13), spacing=2)
    buffer = io.BytesIO()
    fmt = "PNG" if storage.basename(uri).lower().endswith(".png") else "JPEG"
    sheet.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    storage.write_bytes(uri, buffer.getvalue())


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1, or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


# ============================================================ training pictures
# (learning curves and the confusion matrix go here)


# --------------------------------------------------------------------- training


