"""The pictures behind labels rows, read back from their sources for contact sheets and the report.

Files are read one by one, archives streamed once each (only until their last
wanted member), videos opened once each and sought to every wanted time. A source
that can't be read or decoded is None, and a sentence says why.

A ``source`` comes from a Parquet row, which anyone who can write to the output
could have written, and it is read with the reader's credentials: so it is read
through one bounded reader. Only the kinds of source labeling writes are read (an
image file, an image member of a .tar/.tar.gz, a ``#t=`` frame of a video); a file or
member over MAX_SOURCE_BYTES is refused before it is read, an archive whose inflated
stream runs past MAX_ARCHIVE_BYTES before the wanted members is given up, and
pictures and video frames over the pixel limits are refused by their headers
(images.MAX_PIXELS, video.MAX_FRAME_PIXELS).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from PIL import Image, ImageOps

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError
from simpsons_ray.media import video
from simpsons_ray.media.archives import ARCHIVE_ERRORS, iter_tar_members
from simpsons_ray.media.images import ImageDecodeError, decode_rgb, is_image_name
from simpsons_ray.media.sources import VIDEO_SUFFIXES, frame_seconds, split_source

log = logging.getLogger(__name__)


_FETCH_THREADS = 8  # sources are independent objects; on S3 the threads wait on the network

# A frame, even an 8K PNG, is a few tens of MB (labeling refuses past 256 MiB); a thumbnail
# needs far less, and 64 MiB bounds what one bad row can make the reader fetch.
MAX_SOURCE_BYTES = 64 * 1024 * 1024
# An episode's archive is a few GB of frames; past this much inflated tar the wanted member
# is not worth the read (a .gz of zeros inflates a thousandfold).
MAX_ARCHIVE_BYTES = 8 * 1024 * 1024 * 1024
# Thumbnails and contact sheets never show a frame larger than this (video.read_frames_at's default).
VIDEO_THUMBNAIL_SIDE = 480


def thumbnail(data: "bytes | Image.Image | None", size: tuple[int, int]) -> Image.Image | None:
    """An image's bytes or a decoded frame, fitted inside ``size`` (aspect kept); None where there is nothing to show."""
    if data is None:
        return None
    if isinstance(data, Image.Image):
        return ImageOps.contain(data.convert("RGB"), size)
    try:
        image = decode_rgb(data)
    except ImageDecodeError as exc:
        log.warning("thumbnail: %s", exc)
        return None
    return ImageOps.contain(image, size)


Warn = Callable[[str], None]


def fetch_sources(sources: list[str], warn: Warn | None = None,
                  video_max_side: int = VIDEO_THUMBNAIL_SIDE) -> dict[str, "bytes | Image.Image | None"]:
    """Each source's image bytes, or its decoded picture for a video frame (None where unreadable).

    Files are read one by one, archives in one pass each, videos opened once each.
    ``warn`` gets one sentence per source that can't be read (default: a log warning).
    A video frame comes back fitted inside ``video_max_side`` pixels a side (files as stored).
    """
    say: Warn = warn or (lambda message: log.warning("thumbnail: %s", message))
    files: list[str] = []
    archives: dict[str, set[str]] = {}
    videos: dict[str, set[str]] = {}
    results: dict[str, bytes | Image.Image | None] = {}
    for source in dict.fromkeys(sources):
        container, member = split_source(source)
        why = _not_a_source(source, container, member)
        if why:
            say(f"not read: {source!r} {why}")
            results[source] = None
        elif member is None:
            files.append(source)
        elif container.lower().endswith(VIDEO_SUFFIXES):
            videos.setdefault(container, set()).add(member)
        else:
            archives.setdefault(container, set()).add(member)
    with ThreadPoolExecutor(max_workers=_FETCH_THREADS) as pool:
        for read in pool.map(lambda uri: _read_file(uri, say), files):
            results.update(read)
        for found in pool.map(lambda item: _read_archive(item[0], item[1], say), archives.items()):
            results.update(found)
        for pictures in pool.map(lambda item: _read_video(item[0], item[1], say, video_max_side), videos.items()):
            results.update(pictures)
    return results


def _not_a_source(source: str, container: str, member: str | None) -> str:
    """'' for a source of a kind labeling writes, else why it is not read."""
    if not isinstance(source, str) or not source:
        return "is not a source"
    if member is None:
        return "" if is_image_name(container) else "is not an image file, an archive member or a video frame"
    if container.lower().endswith(VIDEO_SUFFIXES):
        return "" if frame_seconds(member) is not None else "names no time in its video"
    return "" if is_image_name(member) else "is not an image member of its archive"


def _read_file(uri: str, warn: Warn) -> dict[str, bytes | None]:
    try:
        size = storage.info(uri).size
        if size is not None and size > MAX_SOURCE_BYTES:
            warn(f"not read: {uri} holds {size:,} bytes, over the {MAX_SOURCE_BYTES:,}-byte limit of a picture")
            return {uri: None}
        with storage.open_input_raw(uri) as f:  # the bytes as stored: nothing inflated on the way
            data = f.read(MAX_SOURCE_BYTES + 1)  # the size a store reports may not be the bytes it sends
        if len(data) > MAX_SOURCE_BYTES:
            warn(f"not read: {uri} holds over {MAX_SOURCE_BYTES:,} bytes, the limit of a picture")
            return {uri: None}
        return {uri: data}
    except (OSError, UserError) as exc:
        warn(f"cannot read {uri}: {exc}")
        return {uri: None}


def _read_archive(archive: str, members: set[str], warn: Warn) -> dict[str, bytes | None]:
    """The wanted members of one archive, streamed once and only until the last of them."""
    found: dict[str, bytes | None] = {f"{archive}#{m}": None for m in members}
    wanted = {(m[2:] if m.startswith("./") else m): m for m in members}
    try:
        for tar, info in iter_tar_members(archive, MAX_ARCHIVE_BYTES):
            name = info.name[2:] if info.name.startswith("./") else info.name
            if name in wanted:
                member = wanted.pop(name)
                if info.size > MAX_SOURCE_BYTES:
                    warn(f"not read: {archive}#{member} holds {info.size:,} bytes, over the {MAX_SOURCE_BYTES:,}-byte limit of a picture")
                else:
                    handle = tar.extractfile(info)
                    found[f"{archive}#{member}"] = handle.read() if handle else None
                if not wanted:
                    break
    except (OSError, UserError, *ARCHIVE_ERRORS) as exc:
        warn(f"cannot read {archive}: {exc}")
    for member in wanted.values():
        warn(f"{archive} has no member {member}")
    return found


def _read_video(uri: str, members: set[str], warn: Warn, max_side: int) -> dict[str, Image.Image | None]:
    """The frames of one video at the wanted times (``t=<seconds>`` members), the video opened once."""
    times = {m: frame_seconds(m) for m in members}
    try:
        pictures = video.read_frames_at(uri, sorted({t for t in times.values() if t is not None}), max_side=max_side)
    except (OSError, UserError, video.VideoError) as exc:
        warn(f"cannot read {uri}: {exc}")
        pictures = {}
    return {f"{uri}#{m}": pictures.get(t) if t is not None else None for m, t in times.items()}
