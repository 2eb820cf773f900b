"""Pictures of results: charts of the labels, and a contact sheet to check them by eye.

Every function takes a result table (a pandas DataFrame as :mod:`simpsons_ray.query`
returns it) and a destination URI (local path or ``s3://``), and writes one image
through :mod:`simpsons_ray.storage`. Charts are drawn with matplotlib's Agg
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
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont, ImageOps

from simpsons_ray import storage
from simpsons_ray.errors import UserError
from simpsons_ray.video import VIDEO_SUFFIXES

log = logging.getLogger(__name__)

DPI = 100


# ------------------------------------------------------------------ shared helpers
def _new_figure(width_px: int, height_px: int) -> Figure:
    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout="constrained")


def _save_figure(fig: Figure, uri: str) -> None:
    """Render with Agg to PNG (or whatever the extension names) and write it through storage."""
    fmt = storage.basename(uri).rsplit(".", 1)[-1].lower() if "." in storage.basename(uri) else "png"
    buffer = io.BytesIO()
    # No bbox_inches="tight": it would crop, and the size would depend on the data.
    fig.savefig(buffer, format=fmt, dpi=DPI)
    storage.write_bytes(uri, buffer.getvalue())


def character_colors(characters: Iterable[str]) -> dict[str, tuple]:
    """A stable colour per character: the same name gets the same colour in every chart."""
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(set(characters)))}


# ============================================================ query pictures
SCREEN_TIME_CHART_PX = (1200, 600)
SCREEN_TIME_TOP_CHARACTERS = 12  # the rest share one "other" band, or the legend is unreadable
OTHER = "other"


def screen_time_chart(screen_time: pd.DataFrame, uri: str, title: str = "Screen time per episode") -> None:
    """A stacked bar per episode, one band per character (``query.screen_time``'s table).

    Bars are in seconds when every episode has timestamps, in frames otherwise
    (seconds of some episodes and frames of others would not add up).
    """
    fig = _new_figure(*SCREEN_TIME_CHART_PX)
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
        colors[OTHER] = (0.75, 0.75, 0.75)
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
    _save_figure(fig, uri)


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
    fig = _new_figure(*timeline_size(len(episodes), len(lanes)))
    if not episodes:
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no segments", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        _save_figure(fig, uri)
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
    _save_figure(fig, uri)


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
    fig = _new_figure(*together_heatmap_size(len(names)))
    ax = fig.subplots()
    if together.empty:
        ax.text(0.5, 0.5, "no characters on screen together", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title(title)
        _save_figure(fig, uri)
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
    _save_figure(fig, uri)


CONTACT_SHEET_THUMB_PX = (240, 180)  # 4:3; wider frames are letterboxed inside
CONTACT_SHEET_CAPTION_PX = 36
CONTACT_SHEET_TITLE_PX = 32
CONTACT_SHEET_COLUMNS = 6
_FETCH_THREADS = 8  # sources are independent objects; on S3 the threads wait on the network


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
        thumb = thumbnail(images.get(row.source))
        if thumb is None:
            draw.rectangle((x + 2, y + 2, x + thumb_w - 3, y + thumb_h - 3), fill=(200, 200, 200))
            draw.text((x + 10, y + thumb_h // 2 - 8), "unreadable source", fill=(90, 0, 0), font=font)
        else:
            sheet.paste(thumb, (x + (thumb_w - thumb.width) // 2, y + (thumb_h - thumb.height) // 2))
        caption = f"{row.episode}  {clock(row.timestamp_s, row.frame)}\nconfidence {row.confidence:.3f}"
        draw.multiline_text((x + 6, y + thumb_h + 2), caption, fill=(0, 0, 0), font=_font(13), spacing=2)
    buffer = io.BytesIO()
    fmt = "PNG" if storage.basename(uri).lower().endswith(".png") else "JPEG"
    sheet.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    storage.write_bytes(uri, buffer.getvalue())


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1, or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def clock(timestamp_s: float | None, frame: int) -> str:
    """``12:34.5`` (or ``1:02:03.4``), and ``frame N`` when the frame has no timestamp."""
    if timestamp_s is None or (isinstance(timestamp_s, float) and math.isnan(timestamp_s)):
        return f"frame {frame}"
    minutes, seconds = divmod(float(timestamp_s), 60.0)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{seconds:04.1f}" if hours else f"{minutes}:{seconds:04.1f}"


def thumbnail(data: "bytes | Image.Image | None") -> Image.Image | None:
    """A contact-sheet-sized picture of an image's bytes or of a decoded frame; None where there is nothing to show."""
    if data is None:
        return None
    if isinstance(data, Image.Image):
        return ImageOps.contain(data.convert("RGB"), CONTACT_SHEET_THUMB_PX)
    from simpsons_ray.preprocess import ImageDecodeError, decode_rgb  # torch comes with it: import only when drawing

    try:
        image = decode_rgb(data)
    except ImageDecodeError as exc:
        log.warning("contact sheet: %s", exc)
        return None
    return ImageOps.contain(image, CONTACT_SHEET_THUMB_PX)


def fetch_sources(sources: list[str], warn: Callable[[str], None] | None = None) -> dict[str, "bytes | Image.Image | None"]:
    """Each source's image bytes, or its decoded picture for a video frame (None where unreadable).

    Files are read one by one, archives in one pass each, videos opened once each.
    ``warn`` gets one sentence per source that can't be read (default: a log warning).
    """
    warn = warn or (lambda message: log.warning("contact sheet: %s", message))
    from simpsons_ray.frames import ARCHIVE_ERRORS, iter_tar_members, split_source

    files: list[str] = []
    archives: dict[str, set[str]] = {}
    videos: dict[str, set[str]] = {}
    for source in dict.fromkeys(sources):
        container, member = split_source(source)
        if member is None:
            files.append(source)
        elif container.lower().endswith(VIDEO_SUFFIXES):
            videos.setdefault(container, set()).add(member)
        else:
            archives.setdefault(container, set()).add(member)

    def read_file(uri: str) -> dict[str, bytes | None]:
        try:
            return {uri: storage.read_bytes(uri)}
        except (OSError, UserError) as exc:
            warn(f"cannot read {uri}: {exc}")
            return {uri: None}

    def read_archive(item: tuple[str, set[str]]) -> dict[str, bytes | None]:
        archive, members = item
        found: dict[str, bytes | None] = {f"{archive}#{m}": None for m in members}
        wanted = {(m[2:] if m.startswith("./") else m): m for m in members}
        try:
            for tar, info in iter_tar_members(archive):
                name = info.name[2:] if info.name.startswith("./") else info.name
                if name in wanted:
                    handle = tar.extractfile(info)
                    found[f"{archive}#{wanted.pop(name)}"] = handle.read() if handle else None
                    if not wanted:
                        break
        except (OSError, UserError, *ARCHIVE_ERRORS) as exc:
            warn(f"cannot read {archive}: {exc}")
        for member in wanted.values():
            warn(f"{archive} has no member {member}")
        return found

    def read_video(item: tuple[str, set[str]]) -> dict[str, Image.Image | None]:
        from simpsons_ray import video

        uri, members = item
        times = {m: float(m[len("t="):]) for m in members}
        try:
            pictures = video.read_frames_at(uri, sorted(set(times.values())))
        except (OSError, UserError, video.VideoError) as exc:
            warn(f"cannot read {uri}: {exc}")
            pictures = {}
        return {f"{uri}#{m}": pictures.get(t) for m, t in times.items()}

    results: dict[str, bytes | Image.Image | None] = {}
    with ThreadPoolExecutor(max_workers=_FETCH_THREADS) as pool:
        for reader, items in ((read_file, files), (read_archive, archives.items()), (read_video, videos.items())):
            for part in pool.map(reader, items):
                results.update(part)
    return results


# ============================================================ training pictures
# (learning curves and the confusion matrix go here)


# --------------------------------------------------------------------- training
def training_curves(history: list[dict], uri: str) -> None:
    """Loss and accuracy per epoch, train beside validation, phases marked."""
    frame = pd.DataFrame(history)
    fig = _new_figure(1000, 400)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, metric, title in ((loss_ax, "loss", "Loss"), (acc_ax, "accuracy", "Accuracy")):
        if not frame.empty:
            ax.plot(frame["epoch"], frame[f"train_{metric}"], marker="o", label="train")
            ax.plot(frame["epoch"], frame[f"val_{metric}"], marker="o", label="validation")
            # A dotted line where fine-tuning starts.
            changes = frame.index[frame["phase"] != frame["phase"].shift()][1:]
            for i in changes:
                ax.axvline(frame.loc[i, "epoch"] - 0.5, color="grey", linestyle=":")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    _save_figure(fig, uri)


def confusion_matrix(matrix: np.ndarray, classes: list[str], uri: str, title: str = "") -> None:
    """Row-normalised confusion matrix (true rows, predicted columns) with counts."""
    n = len(classes)
    side = max(500, 40 * n + 250)
    fig = _new_figure(side, side)
    ax = fig.subplots()
    if title:
        ax.set_title(title)
    rows = np.asarray(matrix, dtype=np.float64)
    share = rows / np.maximum(rows.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i][j]:
                    ax.text(j, i, int(matrix[i][j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    _save_figure(fig, uri)


RELIABILITY_PX = (1000, 500)


def reliability_diagram(curves: dict, uri: str) -> None:
    """Accuracy against top-1 confidence per bin, one line per curve (``calibration.Reliability``), plus bin counts.

    A calibrated model lies on the diagonal; the legend gives each curve's ECE.
    """
    fig = _new_figure(*RELIABILITY_PX)
    ax, counts = fig.subplots(1, 2)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for name, rel in curves.items():
        used = rel.count > 0
        ax.plot(rel.confidence[used], rel.accuracy[used], marker="o", markersize=4, label=f"{name} (ECE {rel.ece:.3f})")
        centers = (rel.edges[:-1] + rel.edges[1:]) / 2
        counts.plot(centers, rel.count, marker=".", label=name)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy", title="Reliability")
    ax.legend(fontsize=8, loc="upper left")
    counts.set(xlim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="images per bin", title="Confidence histogram")
    counts.legend(fontsize=8, loc="upper left")
    _save_figure(fig, uri)
