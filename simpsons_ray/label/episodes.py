"""Episodes: folders and tar(.gz) streams of frames, and video files -> frame rows.

``--frames`` holds one entry per episode, in any mix::

    FRAMES/<episode>/<name>.jpg|png        a folder of frames (subfolders allowed)
    FRAMES/<episode>.tar|.tar.gz|.tgz      an archive of frames (subfolders allowed)
    FRAMES/<episode>.mp4|.mkv|.mov|...     a video file (video.py decodes it)

The episode id is the folder name, or the archive or video name without its
extension; in a dump, the frame number is the last run of digits in the file name
(``frame_000123.jpg`` -> 123). Archives are read as a stream (``tarfile`` mode
``r|*``) straight from storage: never whole in memory, never extracted.

A row's ``source`` says where its frame came from, and :func:`split_source` takes
it apart again: a file URI, ``<archive URI>#<member>``, or ``<video URI>#t=<seconds>``.

Readers yield :class:`RawFrame` rows. A frame that cannot be read (missing, too
big, no number in its name, a stray non-image file, a broken archive) is a row with
``error`` set, so one bad member never stops an episode.
"""

from __future__ import annotations

import hashlib
import logging
import math
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Sequence

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError, first_line
from simpsons_ray.labels.ids import check_episode_id
from simpsons_ray.media.archives import ARCHIVE_ERRORS, iter_tar_members
from simpsons_ray.media.images import is_image_name
from simpsons_ray.media.sources import ARCHIVE_SUFFIXES, VIDEO_SUFFIXES

FOLDER, ARCHIVE, VIDEO = "folder", "archive", "video"
# How a frame's bytes travel from its read task (RawFrame.encoding, and on to a predictor that decodes).
JPEG = "jpeg"  # the file's own bytes: the predictor decodes them (nvJPEG on a GPU)
PIXELS = "pixels"  # uint8 HWC pixels at the model's image size, decoded already

# A video frame, even an 8K PNG, is a few tens of MB; a bigger member is not a frame,
# and refusing it before reading keeps a worker from holding gigabytes.
MAX_FRAME_BYTES = 256 * 1024 * 1024

# Object stores answer one GET in tens of milliseconds; a few reads in flight keep a
# folder task busy decoding instead of waiting. Local disks need no help.
REMOTE_READ_THREADS = 16

_DIGITS = re.compile(r"\d+")

logger = logging.getLogger("simpsons_ray.label")


class RawFrame(NamedTuple):
    """One frame's bytes, or why there are none (``error`` set, ``data`` empty)."""

    source: str  # file URI, "<archive URI>#<member>" or "<video URI>#t=<seconds>"
    frame: int  # -1 when unknown
    data: bytes  # the image file's bytes, or (encoding PIXELS) uint8 HWC pixels at the model's size
    error: str
    timestamp_s: float = math.nan  # the container's time of a video frame; NaN for dumps
    encoding: str = ""  # "": an image file's bytes; PIXELS: decoded already (video frames)


@dataclass(frozen=True)
class Episode:
    """One episode: a folder or an archive of frames, or a video file."""

    episode_id: str
    uri: str
    kind: str  # FOLDER, ARCHIVE or VIDEO


def frame_number(name: str) -> int | None:
    """The last run of digits in a file's base name, without extension; None if none."""
    stem = posixpath.basename(name.replace("\\", "/"))
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    runs = _DIGITS.findall(stem)
    return int(runs[-1]) if runs else None


def _without_suffix(name: str, suffixes: tuple[str, ...]) -> str | None:
    """``name`` without the first of ``suffixes`` it ends with (any case), None if it ends with none."""
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def archive_episode_id(name: str) -> str | None:
    """Episode id of an archive file name (``S01E01.tar.gz`` -> ``S01E01``), None if not an archive."""
    return _without_suffix(name, ARCHIVE_SUFFIXES)


def episode_of_file(name: str) -> tuple[str, str] | None:
    """(episode id, kind) of a file name that is an episode (an archive or a video), else None."""
    episode_id = archive_episode_id(name)
    if episode_id is not None:
        return episode_id, ARCHIVE
    episode_id = _without_suffix(name, VIDEO_SUFFIXES)
    if episode_id is not None:
        return episode_id, VIDEO
    return None


def list_episodes(frames_uri: str, episodes: Sequence[str] = (), refused: list[str] | None = None) -> list[Episode]:
    """Episodes under ``frames_uri`` (sorted by id), optionally only those named.

    Raises UserError, before any work, for a missing path, a dump with no episodes,
    an episode that is both a folder and an archive, or an unknown ``episodes`` id.
    A name whose id is outside the alphabet of ``labels.ids`` is left out, with a
    warning, and goes to ``refused`` as "name: why"; naming one in ``episodes`` is a
    UserError, as is a dump where every episode is refused.
    """
    # Sources in the labels must name their file from any working directory.
    frames_uri = storage.absolute(frames_uri)
    if not storage.exists(frames_uri):
        raise UserError(f"--frames {frames_uri} does not exist: give the folder (local or s3://) that holds the episodes.")
    if storage.is_file(frames_uri):
        # A single archive or video is one episode.
        found_file = episode_of_file(storage.basename(frames_uri))
        if found_file is None:
            raise UserError(
                f"--frames {frames_uri} is a file but not a .tar/.tar.gz archive or a video ({' '.join(VIDEO_SUFFIXES)}): "
                "give a folder of episodes, one archive or one video."
            )
        found: dict[str, Episode] = {found_file[0]: Episode(found_file[0], frames_uri, found_file[1])}
    else:
        found = {}
        for name, is_dir in storage.list_dir(frames_uri):
            if name.startswith((".", "_")):
                continue  # hidden files and metadata folders are not episodes
            found_file = (name, FOLDER) if is_dir else episode_of_file(name)
            if found_file is None:
                continue
            episode_id, kind = found_file
            if episode_id in found:
                raise UserError(
                    f"Episode {episode_id!r} appears twice under {frames_uri} ({found[episode_id].kind} "
                    f"{storage.basename(found[episode_id].uri)} and {kind} {name}): keep one."
                )
            found[episode_id] = Episode(episode_id, storage.join(frames_uri, name), kind)
    found = _without_bad_ids(found, episodes, frames_uri, refused)
    if not found:
        raise UserError(
            f"No episodes under --frames {frames_uri}: expected <episode>/ folders of frames, <episode>.tar / .tar.gz archives "
            f"or video files ({' '.join(VIDEO_SUFFIXES)})."
        )
    if episodes:
        unknown = [e for e in episodes if e not in found]
        if unknown:
            raise UserError(
                f"--episodes {', '.join(unknown)} not found under {frames_uri} (it has {preview(sorted(found))}): check the ids."
            )
        found = {e: found[e] for e in episodes}
    return [found[e] for e in sorted(found)]


def _without_bad_ids(found: dict[str, Episode], episodes: Sequence[str], frames_uri: str, refused: list[str] | None) -> dict[str, Episode]:
    """``found`` less the episodes whose id is outside the alphabet (labels.ids), each named in a warning and in ``refused``."""
    bad = {e: why for e in found if (why := check_episode_id(e))}
    if not bad:
        return found
    for episode_id, why in bad.items():
        logger.warning("label: %s is not labelled: %r is not an episode id (%s; see simpsons_ray.labels.ids)",
                       found[episode_id].uri, episode_id, why)
    if refused is not None:
        refused.extend(f"{storage.basename(found[e].uri)}: {why}" for e, why in sorted(bad.items()))
    asked = [e for e in episodes if e in bad]
    if asked:
        raise UserError(f"--episodes {asked[0]!r} is not an episode id ({bad[asked[0]]}): rename its file or folder.")
    if len(bad) == len(found):
        raise UserError(f"No episode under --frames {frames_uri} has a usable id ({preview(sorted(bad))}: {next(iter(bad.values()))}): "
                        "rename the files or folders (letters, digits, space, _ . - + ( ) [ ]).")
    return {e: v for e, v in found.items() if e not in bad}


def list_folder_frames(folder_uri: str) -> list[storage.Entry]:
    """Files of a folder episode, sorted by path (hidden files left out); listed by its read task."""
    return storage.list_files(folder_uri, recursive=True)


def fingerprint_files(entries: Iterable[storage.Entry]) -> str:
    """What an episode's source looked like: a digest of every file's path, size and modification time.

    Kept in the episode's marker, so that a rerun notices frames or a video that
    changed since they were labelled.
    """
    digest = hashlib.sha256()
    count = 0
    for entry in entries:
        digest.update(f"{entry.relpath}\t{entry.size}\t{entry.mtime_ns}\n".encode())
        count += 1
    return f"{count}:{digest.hexdigest()[:32]}"


def fingerprint_file(uri: str) -> str:
    """The fingerprint of an archive or a video: its size and modification time."""
    found = storage.info(uri)
    return fingerprint_files([storage.Entry(uri, storage.basename(uri), found.size or 0, found.mtime_ns or 0)])


def fingerprint(episode: Episode) -> str:
    """The fingerprint of an episode's source as it is now (a folder is listed: a rerun's check, not a plan's)."""
    if episode.kind == FOLDER:
        return fingerprint_files(list_folder_frames(episode.uri))
    return fingerprint_file(episode.uri)


def _check_name(name: str) -> tuple[int, str]:
    """(frame number, "") for a usable frame name, else (-1, why it is skipped)."""
    if not is_image_name(name):
        return -1, "skipped: not an image file name"
    number = frame_number(name)
    if number is None:
        return -1, "no frame number (digits) in the file name"
    return number, ""


def _read_entry(entry: storage.Entry) -> RawFrame:
    number, why = _check_name(entry.relpath)
    if why:
        return RawFrame(entry.uri, number, b"", why)
    if entry.size > MAX_FRAME_BYTES:
        return RawFrame(entry.uri, number, b"", f"file of {entry.size:,} bytes exceeds the {MAX_FRAME_BYTES:,}-byte frame limit")
    try:
        return RawFrame(entry.uri, number, storage.read_bytes(entry.uri), "")
    except (FileNotFoundError, PermissionError) as exc:  # vanished since listing, no permission
        return RawFrame(entry.uri, number, b"", f"cannot read file: {first_line(exc)}")
    # Any other OSError (storage unreachable after the S3 client's retries) fails the
    # read task: Ray Data retries it, and a job that still fails is resumed by a
    # rerun. Recording it as an error row would make a passing outage permanent.


def iter_folder_frames(entries: Iterable[storage.Entry], window: int = 256) -> Iterator[RawFrame]:
    """Read the given folder files in order; remote reads overlap in a few threads."""
    entries = list(entries)
    if not entries:
        return
    threads = REMOTE_READ_THREADS if storage.is_remote(entries[0].uri) else 1
    if threads == 1:
        yield from map(_read_entry, entries)
        return
    with ThreadPoolExecutor(threads) as pool:
        # Bounded lookahead: at most `window` files in memory ahead of the consumer.
        for start in range(0, len(entries), window):
            yield from pool.map(_read_entry, entries[start : start + window])


def iter_archive_frames(archive_uri: str) -> Iterator[RawFrame]:
    """Stream the frames of a tar / tar.gz archive in order, never holding it whole."""
    member_name = ""
    try:
        for tar, member in iter_tar_members(archive_uri):
            source = f"{archive_uri}#{member.name}"
            number, why = _check_name(member.name)
            if why:
                yield RawFrame(source, number, b"", why)
                continue
            if member.size > MAX_FRAME_BYTES:
                yield RawFrame(source, number, b"", f"member of {member.size:,} bytes exceeds the {MAX_FRAME_BYTES:,}-byte frame limit")
                continue
            member_name = member.name  # a read that fails now is this member's fault
            handle = tar.extractfile(member)
            data = handle.read() if handle is not None else b""
            member_name = ""
            yield RawFrame(source, number, data, "")
    except ARCHIVE_ERRORS as exc:
        where = f"{archive_uri}#{member_name}" if member_name else archive_uri
        yield RawFrame(where, -1, b"", f"unreadable archive: {first_line(exc)}")


def preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
