"""The CPU side of labeling: read tasks and decode tasks, without torch.

Ray starts a worker process for these tasks and imports this module there.
Nothing here imports torch or torchvision (about 2 s of a worker's start on a
small machine, paid again by every new worker), so the first frames reach the
predictor sooner; the predictor actors, which need torch anyway, live in
``labeling.py``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import numpy as np
import pyarrow as pa

from simpsons_ray.core import storage
from simpsons_ray.label import episodes as frames_lib
from simpsons_ray.label.episodes import JPEG, PIXELS
from simpsons_ray.media import sources, video
from simpsons_ray.media.images import ImageDecodeError, is_plain_jpeg
from simpsons_ray.model.preprocess import PreprocessConfig, load_resized, normalize_array

logger = logging.getLogger("simpsons_ray.label")

# The largest block of the labeling pipeline (Ray Data's default is 128 MiB), and
# the rows per decode batch: ~16 MiB of normalised float32 images whatever the
# image size. Small enough that one archive's frames spread over many decode
# tasks, large enough that per-block overhead stays small.
BLOCK_BYTES = 16 * 1024 * 1024
MAX_ROWS_PER_BLOCK = 256


# Videos probed at once while planning: each probe is a few reads of a file's header.
PROBE_THREADS = 16

# Columns every stage passes on unchanged, from the read task to the writer.
PASSED_ON = ("episode", "task", "task_end", "source", "frame", "timestamp", "fingerprint")


# ----------------------------------------------------------------------------- read
@dataclass(frozen=True)
class VideoRange:
    """A time range ``[start, end)`` of a video (``end`` None: to the end of the file), and how to sample it."""

    uri: str
    start: Fraction
    end: Fraction | None
    sample_fps: Fraction | None  # None: every frame
    image_size: int
    stated_duration_s: float | None


@dataclass(frozen=True)
class ReadSpec:
    """One read task: a whole folder or archive, or a time range of a video."""

    task_id: int
    episode_id: str
    archive_uri: str | None = None
    folder_uri: str | None = None  # listed by the read task itself, never on the driver
    video: VideoRange | None = None
    empty_reason: str = ""  # the error row to emit when the task yields no frame
    empty_source: str = ""  # and the source it names (default: the archive, or the first file)


@dataclass(frozen=True)
class VideoPlan:
    """How videos are read: frames kept per second (None: all), seconds per read task, the model's input size."""

    sample_fps: float | None
    seconds_per_task: float
    image_size: int


READ_BLOCK_SCHEMA = pa.schema(
    [
        ("episode", pa.string()),
        ("task", pa.int64()),
        ("task_end", pa.int64()),  # on a task's last row: how many rows it produced; else 0
        ("source", pa.string()),
        ("frame", pa.int64()),
        ("data", pa.binary()),
        ("error", pa.string()),  # "" for a readable frame
        ("timestamp", pa.float64()),  # a video frame's time in the container; NaN for dumps
        ("encoding", pa.string()),  # "" for an image file's bytes, PIXELS for decoded frames
        ("fingerprint", pa.string()),  # on a task's last row: its source as read (frames.fingerprint_files); else ""
    ]
)


def plan_read_tasks(episodes: list[frames_lib.Episode], videos: VideoPlan) -> list[ReadSpec]:
    """Split episodes into read tasks: one per folder or archive, one per time range of a video.

    The driver never lists the frames of an episode: a folder's read task lists
    them itself, so the plan (and the driver's memory) grows with the episodes,
    not with the frames (a 750-episode series is 750 folders, not 24 million
    paths). Videos are probed here (a few reads of each header); one that is not
    a video FFmpeg can decode becomes a task that emits its error row.
    """
    specs: list[ReadSpec] = []
    infos = _probe_videos([e.uri for e in episodes if e.kind == frames_lib.VIDEO])
    sample_fps = video.parse_sample_fps(videos.sample_fps)
    for episode in episodes:
        if episode.kind == frames_lib.VIDEO:
            info = infos[episode.uri]
            if isinstance(info, str):
                specs.append(ReadSpec(len(specs), episode.episode_id, empty_reason=info, empty_source=episode.uri))
                continue
            for start, end in video.plan_ranges(info.duration_s, videos.seconds_per_task, sample_fps):
                where = VideoRange(episode.uri, start, end, sample_fps, videos.image_size, info.duration_s)
                specs.append(ReadSpec(len(specs), episode.episode_id, video=where, empty_source=sources.frame_source(episode.uri, start),
                                      empty_reason=f"no frames in t=[{sources.format_seconds(start)}, "
                                                   f"{sources.format_seconds(end) if end is not None else 'end'}) s of the video"))
            continue
        if episode.kind == frames_lib.ARCHIVE:
            specs.append(ReadSpec(len(specs), episode.episode_id, archive_uri=episode.uri, empty_reason="empty archive: no frames"))
            continue
        specs.append(ReadSpec(len(specs), episode.episode_id, folder_uri=episode.uri, empty_reason="empty folder: no frames",
                              empty_source=episode.uri))
    return specs


def _probe_videos(uris: list[str]) -> dict[str, "video.VideoInfo | str"]:
    """VideoInfo of each video, or the error row's text for one that is not a readable video."""

    def probe(uri: str) -> "video.VideoInfo | str":
        try:
            return video.probe(uri)
        except video.VideoError as exc:
            return str(exc)

    if not uris:
        return {}
    found = dict(zip(uris, storage.in_threads(probe, uris, PROBE_THREADS)))
    logger.info("label: probed %d video(s), %d not readable", len(uris), sum(isinstance(v, str) for v in found.values()))
    return found


def rows_per_block(image_size: int) -> int:
    """Rows per block so that a block of normalised images stays near BLOCK_BYTES."""
    return int(max(8, min(MAX_ROWS_PER_BLOCK, BLOCK_BYTES // (3 * image_size * image_size * 4))))


def read_frames(spec: ReadSpec, block_rows: int) -> Iterator[pa.Table]:
    """Yield the task's frames as blocks of ``block_rows``; the last row carries the count."""
    if spec.video is not None:
        fingerprint = frames_lib.fingerprint_file(spec.video.uri)
        rows = _iter_video_frames(spec.video)
        empty_source = spec.empty_source
    elif spec.archive_uri is not None:
        fingerprint = frames_lib.fingerprint_file(spec.archive_uri)
        rows = frames_lib.iter_archive_frames(spec.archive_uri)
        empty_source = spec.empty_source or spec.archive_uri
    elif spec.folder_uri is not None:
        entries = frames_lib.list_folder_frames(spec.folder_uri)
        fingerprint = frames_lib.fingerprint_files(entries)
        rows = frames_lib.iter_folder_frames(entries)
        empty_source = spec.empty_source
    else:  # a video that would not probe: its error row only
        fingerprint = frames_lib.fingerprint_file(spec.empty_source)
        rows, empty_source = iter(()), spec.empty_source
    total = 0
    pending: list[frames_lib.RawFrame] = []
    for row in rows:
        pending.append(row)
        # Hold one row back: the task's last row must go out in the last block.
        if len(pending) > block_rows:
            yield _block(spec, pending[:block_rows], 0)
            total += block_rows
            pending = pending[block_rows:]
    if not pending and total == 0:
        pending = [frames_lib.RawFrame(empty_source, -1, b"", spec.empty_reason or "no frames")]
    total += len(pending)
    yield _block(spec, pending, total, fingerprint)


def _iter_video_frames(where: VideoRange) -> Iterator[frames_lib.RawFrame]:
    try:
        for f in video.iter_range(where.uri, where.start, where.end, where.sample_fps, where.image_size, where.stated_duration_s):
            yield frames_lib.RawFrame(f.source, f.frame, f.pixels, f.error, f.timestamp_s, PIXELS if f.pixels else "")
    except video.VideoError as exc:  # readable when planned, not now: replaced or deleted since
        yield frames_lib.RawFrame(sources.frame_source(where.uri, where.start), -1, b"", str(exc))


def _block(spec: ReadSpec, rows: list[frames_lib.RawFrame], task_end: int, fingerprint: str = "") -> pa.Table:
    n = len(rows)
    ends = [0] * n
    ends[-1] = task_end
    prints = [""] * n
    prints[-1] = fingerprint
    return pa.Table.from_arrays(
        [
            pa.array([spec.episode_id] * n, pa.string()),
            pa.array([spec.task_id] * n, pa.int64()),
            pa.array(ends, pa.int64()),
            pa.array([r.source for r in rows], pa.string()),
            pa.array([r.frame for r in rows], pa.int64()),
            pa.array([r.data for r in rows], pa.binary()),
            pa.array([r.error for r in rows], pa.string()),
            pa.array([r.timestamp_s for r in rows], pa.float64()),
            pa.array([r.encoding for r in rows], pa.string()),
            pa.array(prints, pa.string()),
        ],
        schema=READ_BLOCK_SCHEMA,
    )


def frame_dump_datasource(specs: list[ReadSpec], block_rows: int):
    """A Ray Data datasource with one read task per ReadSpec (built lazily: Ray is imported here)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class FrameDumpDatasource(Datasource):
        def get_name(self) -> str:
            return "FrameDump"

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
            # One task per spec whatever `parallelism` asks: a tar stream can't be split,
            # and the frames of a folder are not known until its task lists them.
            tasks = []
            for spec in specs:
                meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
                tasks.append(ReadTask(functools.partial(read_frames, spec, block_rows), meta, schema=READ_BLOCK_SCHEMA))
            return tasks

    return FrameDumpDatasource()


# --------------------------------------------------------------------------- decode
def decode_frames(batch: dict[str, np.ndarray], preprocess: PreprocessConfig) -> dict[str, np.ndarray]:
    """Raw bytes -> normalised float32 NHWC images; a frame that won't decode becomes an error."""
    size = preprocess.image_size
    errors = np.array(batch["error"], dtype=object)
    pixels = np.zeros((len(errors), size, size, 3), dtype=np.uint8)
    encodings = batch["encoding"]
    for i, data in enumerate(batch["data"]):
        if errors[i]:
            continue
        if encodings[i] == PIXELS:
            pixels[i] = np.frombuffer(data, dtype=np.uint8).reshape(size, size, 3)
            continue
        try:
            pixels[i] = load_resized(data, size)
        except ImageDecodeError as exc:
            errors[i] = str(exc)
    out = {k: batch[k] for k in PASSED_ON}
    out["error"] = errors
    out["image"] = normalize_array(pixels, preprocess)
    return out


def route_frames(batch: dict[str, np.ndarray], preprocess: PreprocessConfig) -> dict[str, np.ndarray]:
    """For decoding in the predictor: JPEGs go on as bytes, every other frame is decoded here.

    A JPEG is checked from its header (bombs, CMYK, progressive, truncated) so
    that only frames the predictor decodes as PIL would reach it; the rest are
    decoded and resized here, like decode_frames, and go on as raw pixels.
    Normalising happens in the predictor, on its device, for both.
    """
    size = preprocess.image_size
    errors = np.array(batch["error"], dtype=object)
    data = np.empty(len(errors), dtype=object)
    encoding = np.full(len(errors), "", dtype=object)
    for i, raw in enumerate(batch["data"]):
        data[i] = b""
        if errors[i]:
            continue
        if batch["encoding"][i] == PIXELS:
            data[i], encoding[i] = raw, PIXELS  # a video frame, decoded by its read task
            continue
        try:
            if is_plain_jpeg(raw):
                data[i], encoding[i] = raw, JPEG
            else:
                data[i], encoding[i] = load_resized(raw, size).tobytes(), PIXELS
        except ImageDecodeError as exc:
            errors[i] = str(exc)
    out = {k: batch[k] for k in PASSED_ON}
    out["error"], out["data"], out["encoding"] = errors, data, encoding
    return out
