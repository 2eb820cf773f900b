"""Video episodes: probe a video file, cut it into time ranges, decode a range into sampled frames.

A video file under ``--frames`` (``.mp4 .mkv .mov .webm .avi .ts``) is one episode,
read with PyAV (FFmpeg's libraries, shipped inside its wheels: nothing to install
beside it) through ``storage.open_input_file``: seekable ranged reads of local
files or S3 objects, never a download of the whole file, never frames on disk.

One long episode must not keep one core busy while the others wait, so a video is
cut into time ranges of ``seconds_per_task``, each decoded by its own read task: the
task seeks to the keyframe at or before its range, decodes from there and keeps
the frames whose presentation time falls in ``[start, end)``. Each frame has one
presentation time, so each frame belongs to exactly one range.

Sampling (``--sample-fps F``) keeps the first frame of every ``1/F``-second interval
``[k/F, (k+1)/F)``. Range boundaries fall on those intervals' edges, so which frames
are kept does not depend on how the video was cut. Times are exact fractions of the
stream's time base all the way; a frame's row gets:

- ``timestamp_s``: its presentation time in seconds from the start of the video
  stream (the container's own timestamps: exact for variable frame rates too);
- ``frame``: ``round(timestamp_s x the stream's average frame rate)``, the frame's
  index at the video's own rate (exact for constant frame rates);
- ``source``: ``<video URI>#t=<seconds>``, which a contact sheet seeks to.

Decoded frames are scaled to the model's square input by FFmpeg's bilinear scaler
(swscale), three times faster than PIL here; against PIL's bilinear resize of the same
frame the pixels differ by 0.9 (224 px) to 1.7 (64 px) levels of 255 on average.

Damage is an error row, never a lost job: a file that is not a video, has no video
stream, or whose codec FFmpeg cannot decode is one error row for the episode; a
truncated or corrupt file keeps every frame before the damage and records where it
starts.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Iterator

from simpsons_ray.core import storage
from simpsons_ray.core.errors import first_line
from simpsons_ray.media.sources import format_seconds, frame_source

if TYPE_CHECKING:
    from PIL import Image

# 4 frames/s: a shot of the show lasts seconds, so a character on screen for half a
# second is still seen twice, and a 24 fps episode costs 6x less model time than every frame.
DEFAULT_SAMPLE_FPS = 4.0
# A 22-minute episode becomes 22 read tasks: enough to spread one episode over a
# cluster's cores, few enough that the keyframe seek at each range start (at most
# one GOP decoded for nothing, ~2-10 s of video) costs a few percent.
SECONDS_PER_READ_TASK = 60.0
# PyAV asks its file for small pieces (32 KiB); on S3 each would be one GET. A
# buffer of this size turns them into a few ranged GETs per second of HD video.
READ_BUFFER_BYTES = 4 * 1024 * 1024
# A range whose frames stop this much before its end (or before the stated duration
# of the stream) is cut short: the file is truncated. Audio tracks that outlast the
# picture by a little must not count, hence a second rather than a frame.
TRUNCATION_SLACK_S = 1.0
# If a seek lands after the range start (formats without an index, such as MPEG-TS,
# seek by estimated byte position), seek again this much earlier, then further.
RESEEK_BACKOFF_S = (2.0, 10.0, 60.0)

# 8K UHD is 33 Mpx a frame; a stream that claims more is refused when probed, before a
# read task allocates frames of that size (as images are refused by header: images.MAX_PIXELS).
MAX_FRAME_PIXELS = 64_000_000


class VideoError(Exception):
    """The file is not a video we can decode; the message is the error row's text."""


@dataclass(frozen=True)
class VideoInfo:
    """What a read plan needs to know about a video."""

    duration_s: float | None  # None when the container does not say
    frame_rate: float
    width: int
    height: int
    codec: str


def parse_sample_fps(value: float | None) -> Fraction | None:
    """The sampling rate as an exact fraction (4 -> 4, 2.5 -> 5/2); None: every frame."""
    if value is None:
        return None
    return Fraction(str(float(value))).limit_denominator(1000)


# ----------------------------------------------------------------------------- open
class _RangedReader(io.RawIOBase):
    """A pyarrow random-access file as a raw stream, so io.BufferedReader can batch PyAV's small reads.

    It seeks as a local file does: past the end is allowed, and reads there return
    nothing. pyarrow's S3 file refuses such a seek ("Cannot seek past end of file"),
    which FFmpeg asks for when a truncated file's index points beyond its data; the
    range of a cut video on S3 then failed its whole job, where a local copy gave its
    frames and an error row.
    """

    def __init__(self, handle):
        self._handle = handle
        self._size = handle.size()
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._position >= self._size:
            return 0
        data = self._handle.read_at(min(len(buffer), self._size - self._position), self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if not self.closed:
            self._handle.close()
        super().close()


class _Video:
    """An open video: container, its first video stream, and the stream's clock."""

    def __init__(self, uri: str, threads: int = 1):
        import av

        self.uri = uri
        self._file = io.BufferedReader(_RangedReader(storage.open_input_file(uri)), buffer_size=READ_BUFFER_BYTES)
        try:
            self.container = av.open(self._file, mode="r")
        except av.FFmpegError as exc:
            self.close()
            raise VideoError(f"not a video file FFmpeg can read: {_first_line(exc)}") from None
        except (EOFError, ValueError) as exc:  # empty file, or nothing FFmpeg recognises
            self.close()
            raise VideoError(f"not a video file FFmpeg can read: {_first_line(exc) or 'no data'}") from None
        if not self.container.streams.video:
            kinds: list[str] = sorted({str(s.type) for s in self.container.streams}) or ["no streams"]
            self.close()
            raise VideoError(f"no video stream in the file (it has {', '.join(kinds)})")
        self.stream = self.container.streams.video[0]
        if self.stream.codec_context is None:
            self.close()
            raise VideoError("the video stream's codec is not one this FFmpeg build can decode")
        self.stream.thread_count = threads
        self.time_base: Fraction = self.stream.time_base or Fraction(1, 1_000_000)
        self.start_pts: int = self.stream.start_time if self.stream.start_time is not None else 0
        rate = self.stream.average_rate or self.stream.guessed_rate or self.stream.base_rate
        self.frame_rate: Fraction = Fraction(rate) if rate else Fraction(0)

    def seconds(self, pts: int) -> Fraction:
        """A time stamp of the stream in seconds from its start, exactly."""
        return (pts - self.start_pts) * self.time_base

    def time_of(self, frame) -> Fraction:
        """A decoded frame's presentation time; one frame after the last one for the rare frame without a time stamp."""
        if frame.pts is not None:
            self._last = self.seconds(frame.pts)
        else:
            last = getattr(self, "_last", None)
            self._last = Fraction(0) if last is None else last + (1 / self.frame_rate if self.frame_rate else Fraction(1, 1000))
        return self._last

    def duration_s(self) -> float | None:
        if self.stream.duration is not None:
            return float(self.stream.duration * self.time_base)
        if self.container.duration is not None:
            import av

            return max(0.0, self.container.duration / av.time_base)
        return None

    def seek(self, seconds: Fraction) -> None:
        """To the keyframe at or before ``seconds``."""
        target = self.start_pts + math.floor(max(seconds, Fraction(0)) / self.time_base)
        self.container.seek(target, stream=self.stream, backward=True, any_frame=False)

    def close(self) -> None:
        container = getattr(self, "container", None)
        if container is not None:
            container.close()
        self._file.close()

    def __enter__(self) -> "_Video":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def probe(uri: str) -> VideoInfo:
    """Duration, frame rate, size and codec of a video; raises VideoError for anything that is not one."""
    import av

    # FFmpeg says only "invalid data" of an empty file. Checked here, once per video,
    # not in every range task's open (a HEAD request each on S3).
    if storage.info(uri).size == 0:
        raise VideoError("the file is empty (0 bytes)")
    with _Video(uri) as video:
        codec = video.stream.codec_context.name
        duration = video.duration_s()
        if duration is not None and duration <= 0:
            raise VideoError("the video has zero length")
        width, height = video.stream.codec_context.width, video.stream.codec_context.height
        if width * height > MAX_FRAME_PIXELS:
            raise VideoError(f"frames of {width}x{height} pixels exceed the {MAX_FRAME_PIXELS:,}-pixel limit")
        # Decode the first frame: a codec FFmpeg only knows by name, or a file
        # whose header is fine but whose data is not, fails here, before any task.
        try:
            first = next(video.container.decode(video.stream), None)
        except av.FFmpegError as exc:
            raise VideoError(f"cannot decode the {codec} video stream: {_first_line(exc)}") from None
        if first is None:
            raise VideoError(f"no frame could be decoded from the {codec} video stream")
        return VideoInfo(
            duration_s=duration,
            frame_rate=float(video.frame_rate),
            width=width,
            height=height,
            codec=codec,
        )


def plan_ranges(duration_s: float | None, seconds_per_task: float, sample_fps: Fraction | None) -> list[tuple[Fraction, Fraction | None]]:
    """``[start, end)`` time ranges covering the video; the last is open-ended (to the end of the file).

    With sampling, every boundary is a multiple of 1/sample_fps, so no sampling
    interval straddles two ranges.
    """
    if duration_s is None or duration_s <= seconds_per_task:
        return [(Fraction(0), None)]
    step = Fraction(str(seconds_per_task)).limit_denominator(1000)
    if sample_fps is not None:
        step = max(1, round(step * sample_fps)) / sample_fps
    count = math.ceil(Fraction(str(duration_s)) / step)
    bounds = [step * k for k in range(count)]
    return [(start, bounds[i + 1] if i + 1 < count else None) for i, start in enumerate(bounds)]


# --------------------------------------------------------------------------- decode
@dataclass(frozen=True)
class DecodedFrame:
    """One sampled frame of a range, or the damage that ended it (``error`` set, ``pixels`` empty)."""

    source: str
    frame: int
    timestamp_s: float
    pixels: bytes  # uint8 HWC at image_size x image_size
    error: str = ""


def iter_range(
    uri: str,
    start: Fraction,
    end: Fraction | None,
    sample_fps: Fraction | None,
    image_size: int,
    stated_duration_s: float | None = None,
    threads: int = 1,
) -> Iterator[DecodedFrame]:
    """Decode the frames of ``[start, end)`` (sampled), scaled to the model's input, in time order.

    Raises VideoError only when the file cannot be opened at all; damage after
    that ends the range with one error row after the frames before it.
    """
    import av
    from av.video.reformatter import VideoReformatter

    # One scaler for the whole range: frame.reformat() builds a new one for every
    # frame, which made scaling 640x480 to 64 px 7.6x slower than decoding.
    scaler = VideoReformatter()
    with _Video(uri, threads) as video:
        last_t: Fraction | None = None
        last_bucket: int | None = None
        try:
            frames = _frames_from(video, start)
            for frame in frames:
                t = video.time_of(frame)
                if t < start:
                    continue
                if end is not None and t >= end:
                    return
                last_t = t
                if sample_fps is not None:
                    bucket = math.floor(t * sample_fps)
                    if bucket == last_bucket:
                        continue
                    last_bucket = bucket
                pixels = scaler.reformat(frame, width=image_size, height=image_size, format="rgb24", interpolation="BILINEAR").to_ndarray()
                yield DecodedFrame(frame_source(uri, t), round(t * video.frame_rate), float(t), pixels.tobytes())
        except av.FFmpegError as exc:
            at = format_seconds(last_t) if last_t is not None else format_seconds(start)
            yield DecodedFrame(frame_source(uri, last_t if last_t is not None else start), -1, math.nan, b"",
                               f"corrupt video data after t={at} s: {_first_line(exc)}")
            return
        # The stream ended. Before the range's end, or well before the duration the
        # file states for its last range, it was cut short.
        expected_end = float(end) if end is not None else stated_duration_s
        reached = float(last_t) if last_t is not None else float(start)
        frame_s = float(1 / video.frame_rate) if video.frame_rate else 0.0
        if expected_end is not None and reached + frame_s + TRUNCATION_SLACK_S < expected_end:
            yield DecodedFrame(
                frame_source(uri, reached), -1, math.nan, b"",
                f"truncated video: frames stop at t={format_seconds(reached)} s, but the file says it lasts "
                f"{format_seconds(stated_duration_s or expected_end)} s",
            )


def _frames_from(video: _Video, start: Fraction):
    """Decoded frames from the keyframe at or before ``start`` (the very start for 0)."""
    if start <= 0:
        yield from video.container.decode(video.stream)
        return
    for backoff in (0.0, *RESEEK_BACKOFF_S):
        video.seek(start - Fraction(str(backoff)))
        frames = video.container.decode(video.stream)
        first = next(frames, None)
        if first is None:
            return
        if video.time_of(first) <= start or backoff == RESEEK_BACKOFF_S[-1]:
            yield first
            yield from frames
            return


def read_frames_at(uri: str, times: list[float], max_side: int = 480) -> dict[float, "Image.Image | None"]:
    """PIL images of the frames shown at the given times (None where there is none), for contact sheets."""
    from PIL import Image

    found: dict[float, Image.Image | None] = {t: None for t in times}
    with _Video(uri) as video:
        width, height = video.stream.codec_context.width, video.stream.codec_context.height
        if width * height > MAX_FRAME_PIXELS:
            raise VideoError(f"frames of {width}x{height} pixels exceed the {MAX_FRAME_PIXELS:,}-pixel limit")
        frame_s = 1 / video.frame_rate if video.frame_rate else Fraction(1, 1000)
        for t in sorted(times):
            target = Fraction(str(t))
            for frame in _frames_from(video, target):
                # Sources round times to microseconds: the frame is the one within half a frame.
                if video.time_of(frame) >= target - frame_s / 2:
                    image = frame.to_image()
                    image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
                    found[t] = image
                    break
    return found


def _first_line(exc: BaseException) -> str:
    strerror = getattr(exc, "strerror", None)
    if strerror:  # FFmpeg's errors: the message without errno and file name
        return str(strerror)
    return first_line(exc)
