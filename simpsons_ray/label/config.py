"""What one labeling run is asked to do: :class:`LabelConfig`, the CLI's ``label`` flags as one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from simpsons_ray.core.errors import UserError
from simpsons_ray.label.pooling import POOL_CHOICES, POOL_WINDOW_S
from simpsons_ray.media import video

# Where frames are decoded: "tasks" (PIL in CPU tasks), "predictor" (torchvision's
# decode_jpeg on the predictor's device: nvJPEG on a GPU), or "auto" (the predictor
# with --gpu, else tasks: see resources.decode_in_predictor).
DECODE_CHOICES = ("auto", "tasks", "predictor")


# How long --gpu waits, by default, for an autoscaler to add a GPU node: a cloud GPU
# node takes a few minutes to boot and join.
WAIT_FOR_GPUS_S = 600.0


@dataclass(frozen=True)
class LabelConfig:
    """Everything one labeling run needs; the CLI builds it from its flags."""

    model_uri: str
    frames_uri: str  # frame dumps and video files (episodes.py)
    output_uri: str
    fps: float | None = None  # frame dumps: timestamp_s = (frame - first_frame_number) / fps; null without it
    first_frame_number: int = 0  # the number of a dump's first frame (ffmpeg's image2 muxer starts at 1)
    sample_fps: float | None = video.DEFAULT_SAMPLE_FPS  # videos: frames kept per second of video; None: every frame
    episodes: tuple[str, ...] = ()  # empty: every episode under frames_uri
    batch_size: int = 64  # frames per forward pass
    num_workers: int | None = None  # the most predictor actors; None: as many as the cluster holds (see resources.predictor_pool)
    use_gpu: bool = False
    wait_for_gpus: float = WAIT_FOR_GPUS_S  # --gpu on a cluster with none yet: seconds to wait for its autoscaler
    # The score a character needs to be on screen: it replaces a multi-label model's own
    # per-character thresholds; None: those thresholds, and 0.0 for a single-label model.
    min_confidence: float | None = None
    top_k: int = 3
    overwrite: bool = False  # relabel episodes already done
    decode: str = "auto"  # where frames are decoded: "tasks" (PIL, CPU tasks), "predictor", or "auto" (see resources.decode_in_predictor)
    seconds_per_read_task: float = video.SECONDS_PER_READ_TASK  # a video is decoded in time ranges this long
    pool: str = "shot"  # "shot": who is on screen is pooled within each shot (pooling.py); "none": every frame alone
    pool_window_s: float = POOL_WINDOW_S  # seconds of a long shot pooled around each frame


def validate(config: LabelConfig) -> None:
    """One sentence for a setting no labeling run can use, before any work."""
    if config.batch_size <= 0 or (config.num_workers is not None and config.num_workers <= 0) or config.top_k <= 0:
        raise UserError("--batch-size, --num-workers and --top-k must be positive integers.")
    if config.decode not in DECODE_CHOICES:
        raise UserError(f"--decode {config.decode} is not one of {', '.join(DECODE_CHOICES)}.")
    if config.min_confidence is not None and not 0.0 <= config.min_confidence <= 1.0:
        raise UserError(f"--min-confidence {config.min_confidence} is not a probability: give a value between 0 and 1.")
    if config.fps is not None and config.fps <= 0:
        raise UserError(f"--fps {config.fps} must be a positive number of frames per second.")
    if config.sample_fps is not None and config.sample_fps <= 0:
        raise UserError(f"--sample-fps {config.sample_fps} must be a positive number of frames per second, or 'all'.")
    if config.first_frame_number < 0:
        raise UserError(f"--first-frame-number {config.first_frame_number} must be 0 or more.")
    if config.wait_for_gpus < 0:
        raise UserError(f"--wait-for-gpus {config.wait_for_gpus} must be 0 or more seconds.")
    if config.pool not in POOL_CHOICES:
        raise UserError(f"--pool {config.pool} is not one of {', '.join(POOL_CHOICES)}.")
    if config.pool_window_s <= 0:
        raise UserError(f"--pool-window {config.pool_window_s} must be a positive number of seconds.")
    if config.seconds_per_read_task <= 0:
        raise UserError("seconds_per_read_task must be positive.")
