"""Video episodes: .mp4/.mkv files labelled straight from storage, sampled, with the container's timestamps.

The videos are written here with PyAV (H.264): each second shows one generated
shape, so the truth of every frame is known, and the shapes model
(imagegen.train_shapes_model) tells the shapes apart.
"""

from __future__ import annotations

import dataclasses
import math
import os
from fractions import Fraction

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
from PIL import Image

from imagegen import SHAPE_CLASSES, class_image, encode, upload_tree, write_audio_only, write_video
from simpsons_ray.core.errors import UserError
from simpsons_ray.label.config import LabelConfig
from simpsons_ray.label.episodes import VIDEO, list_episodes
from simpsons_ray.label.pooling import PoolSettings
from simpsons_ray.label.run import label
from simpsons_ray.label.settings import LabelSettings
from simpsons_ray.labels import schema
from simpsons_ray.media import sources, video
from simpsons_ray.media.sources import split_source

FPS = 12
SECONDS = 8


def second_pictures(seed: int, seconds: int = SECONDS) -> list[Image.Image]:
    """One generated shape per second: second s shows class s % 4."""
    rng = np.random.default_rng(seed)
    return [class_image(s % len(SHAPE_CLASSES), rng, 128) for s in range(seconds)]


def make_video(path: str, seed: int = 0, seconds: int = SECONDS) -> list[Image.Image]:
    pictures = second_pictures(seed, seconds)
    write_video(path, [pictures[i // FPS] for i in range(seconds * FPS)], fps=FPS)
    return pictures


def truth(timestamp_s: float) -> str:
    return SHAPE_CLASSES[int(math.floor(timestamp_s + 1e-9)) % len(SHAPE_CLASSES)]


def read_labels(output: str) -> pd.DataFrame:
    return schema.labels_dataset(output).to_table().to_pandas().sort_values(["episode", "timestamp_s"]).reset_index(drop=True)


def read_errors(output: str) -> pd.DataFrame:
    return pads.dataset(os.path.join(output, schema.ERRORS_DIR), format="parquet").to_table().to_pandas()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("videos")
    folder = root / "episodes"
    folder.mkdir()
    pictures = {"S01E01": make_video(str(folder / "S01E01.mp4"), seed=1), "S01E02": make_video(str(folder / "S01E02.mkv"), seed=2)}
    return {"root": root, "folder": str(folder), "pictures": pictures}


# ----------------------------------------------------------------------- no Ray
def test_ranges_fall_on_sampling_intervals():
    ranges = video.plan_ranges(200.0, 60.0, video.parse_sample_fps(4))
    assert [(float(a), b if b is None else float(b)) for a, b in ranges] == [(0, 60), (60, 120), (120, 180), (180, None)]
    # 7 s at 3 frames/s: a boundary every 21 intervals of 1/3 s, never inside one.
    ranges = video.plan_ranges(20.0, 7.0, video.parse_sample_fps(3))
    assert [a for a, _ in ranges] == [Fraction(0), Fraction(7), Fraction(14)]
    assert video.plan_ranges(None, 60.0, None) == [(Fraction(0), None)]  # no duration: one range to the end


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
@pytest.mark.parametrize("sample_fps", [None, 2.0, 5.0])
def test_ranges_give_every_sampled_frame_exactly_once(tmp_path, suffix, sample_fps):
    path = str(tmp_path / f"v{suffix}")
    make_video(path, seconds=5)
    info = video.probe(path)
    assert info.frame_rate == FPS and info.duration_s == pytest.approx(5.0, abs=0.1) and info.codec == "h264"
    rate = video.parse_sample_fps(sample_fps)
    whole = list(video.iter_range(path, Fraction(0), None, rate, 16, info.duration_s))
    pieces = [f for a, b in video.plan_ranges(info.duration_s, 1.5, rate) for f in video.iter_range(path, a, b, rate, 16, info.duration_s)]
    assert [f.source for f in pieces] == [f.source for f in whole] and not any(f.error for f in whole)
    assert [f.pixels for f in pieces] == [f.pixels for f in whole]
    if sample_fps is None:
        assert [f.frame for f in whole] == list(range(5 * FPS))
    else:
        # The first frame of each 1/F s interval: at 12 fps and F=5, frames 0, 3, 5, 8, 10, 12, ...
        expected = sorted({math.ceil(k * FPS / sample_fps) for k in range(int(5 * sample_fps))})
        assert [f.frame for f in whole] == expected
    for f in whole:
        assert f.timestamp_s == pytest.approx(f.frame / FPS, abs=1e-3)
        assert f.source == f"{path}#t={sources.format_seconds(f.timestamp_s)}"


def test_variable_frame_rate_keeps_the_containers_times(tmp_path):
    path = str(tmp_path / "vfr.mkv")
    pts = [0, 100, 150, 400, 1000, 1040, 1800, 2500]  # milliseconds
    write_video(path, [class_image(i % 4, np.random.default_rng(i), 64) for i in range(len(pts))], fps=10, pts=pts,
                time_base=Fraction(1, 1000))
    frames = list(video.iter_range(path, Fraction(0), None, None, 16))
    assert [f.timestamp_s for f in frames] == [p / 1000 for p in pts]
    sampled = list(video.iter_range(path, Fraction(0), None, Fraction(2), 16))
    assert [f.timestamp_s for f in sampled] == [0.0, 1.0, 1.8, 2.5]  # first frame of each half second that has one


def test_not_a_video_no_video_stream_and_empty_file(tmp_path):
    (tmp_path / "notes.mp4").write_text("this is a text file, not a video\n")
    write_audio_only(str(tmp_path / "song.mp4"))
    (tmp_path / "empty.mkv").write_bytes(b"")
    with pytest.raises(video.VideoError, match="not a video file"):
        video.probe(str(tmp_path / "notes.mp4"))
    with pytest.raises(video.VideoError, match="no video stream .*audio"):
        video.probe(str(tmp_path / "song.mp4"))
    with pytest.raises(video.VideoError, match="empty"):
        video.probe(str(tmp_path / "empty.mkv"))


def test_a_video_whose_frames_are_too_big_is_refused_when_probed(tmp_path, monkeypatch):
    """The frame size is read from the stream's header; past the limit the video is an error row, never decoded.
    (The limit is lowered here: a real 64-Mpx H.264 stream takes gigabytes to write.)"""
    path = str(tmp_path / "v.mp4")
    make_video(path, seconds=1)
    assert video.probe(path).width == 160
    monkeypatch.setattr(video, "MAX_FRAME_PIXELS", 160 * 120 - 1)
    with pytest.raises(video.VideoError, match="frames of 160x120 pixels exceed the 19,199-pixel limit"):
        video.probe(path)


def test_truncated_video_keeps_the_frames_before_the_cut(tmp_path):
    path = str(tmp_path / "v.mkv")
    make_video(path, seconds=6)
    data = open(path, "rb").read()
    cut = str(tmp_path / "cut.mkv")
    open(cut, "wb").write(data[: len(data) // 2])
    info = video.probe(cut)
    assert info.duration_s == pytest.approx(6.0, abs=0.1)  # the header still says 6 s
    rows = list(video.iter_range(cut, Fraction(0), None, None, 16, info.duration_s))
    good, bad = [r for r in rows if not r.error], [r for r in rows if r.error]
    assert 1 * FPS < len(good) < 5 * FPS and [r.frame for r in good] == list(range(len(good)))
    assert len(bad) == 1 and "truncated video" in bad[0].error and bad[0] is rows[-1]


def test_episodes_are_videos_folders_and_archives_and_sources_split(videos, tmp_path):
    episodes = list_episodes(videos["folder"])
    assert [(e.episode_id, e.kind) for e in episodes] == [("S01E01", VIDEO), ("S01E02", VIDEO)]
    single = list_episodes(os.path.join(videos["folder"], "S01E02.mkv"))
    assert [(e.episode_id, e.kind) for e in single] == [("S01E02", VIDEO)]
    assert split_source("/x/S01E02.mkv#t=12.25") == ("/x/S01E02.mkv", "t=12.25")
    assert split_source("s3://b/e.tar.gz#f/1.jpg") == ("s3://b/e.tar.gz", "f/1.jpg")
    (tmp_path / "S01E01").mkdir()
    (tmp_path / "S01E01.mkv").write_bytes(b"")
    with pytest.raises(UserError, match="appears twice"):
        list_episodes(str(tmp_path))


def test_dump_timestamps_count_from_the_first_frame_number():
    """ffmpeg -vf fps=2 frames/%06d.jpg numbers from 1: frame 1 is at 0 s, frame 3 at 1 s."""
    settings = LabelSettings("m", 3, 0.0, fps=2.0, first_frame_number=1)
    stamps = settings.timestamps(np.array([1, 2, 3, 10]), np.full(4, np.nan)).to_pylist()
    assert stamps == [0.0, 0.5, 1.0, 4.5]
    assert settings.timestamps(np.array([5]), np.array([7.25])).to_pylist() == [7.25]  # a video's own time wins
    assert LabelSettings("m", 3, 0.0).timestamps(np.array([5]), np.array([np.nan])).to_pylist() == [None]
    # Markers written before the flag existed were made with first frame 0, and those before pooling answer per frame.
    legacy = {"model_id": "m", "top_k": 3, "min_confidence": 0.0, "fps": 2.0}
    per_frame = PoolSettings(method="none")
    assert LabelSettings("m", 3, 0.0, fps=2.0, pool=per_frame).differences(legacy, "folder") == []
    assert [d.split(" ")[0] for d in LabelSettings("m", 3, 0.0, fps=2.0).differences(legacy, "folder")] == ["pooling"]


# ------------------------------------------------------------------------ with Ray
@pytest.fixture(scope="module")
def sampled_run(ray_session, shapes_model, videos):
    """Both videos at 2 frames/s, in ranges of 3 s (several per video)."""
    output = str(videos["root"] / "labels-2fps")
    summary = label(LabelConfig(model_uri=shapes_model, frames_uri=videos["folder"], output_uri=output, sample_fps=2.0,
                                seconds_per_read_task=3.0))
    return {"output": output, "summary": summary}


def test_video_labels_and_times_match_the_truth(sampled_run, videos):
    df = read_labels(sampled_run["output"])
    assert sampled_run["summary"]["errors"] == 0
    for episode, suffix in (("S01E01", ".mp4"), ("S01E02", ".mkv")):
        mine = df[df["episode"] == episode]
        uri = os.path.join(videos["folder"], episode + suffix)
        assert mine["timestamp_s"].tolist() == [k / 2 for k in range(SECONDS * 2)]
        assert mine["frame"].tolist() == [k * FPS // 2 for k in range(SECONDS * 2)]
        assert mine["source"].tolist() == [f"{uri}#t={sources.format_seconds(k / 2)}" for k in range(SECONDS * 2)]
    assert (df["label"] == df["timestamp_s"].map(truth)).mean() >= 0.95


def test_rerun_skips_and_a_new_rate_needs_overwrite(shapes_model, videos, sampled_run):
    before = read_labels(sampled_run["output"])
    again = label(LabelConfig(model_uri=shapes_model, frames_uri=videos["folder"], output_uri=sampled_run["output"], sample_fps=2.0))
    assert again["episodes_skipped"] == 2 and again["frames_labelled"] == 0
    pd.testing.assert_frame_equal(read_labels(sampled_run["output"]), before)
    with pytest.raises(UserError, match="sample_fps 2.0 .now 4.0."):
        label(LabelConfig(model_uri=shapes_model, frames_uri=videos["folder"], output_uri=sampled_run["output"]))


def test_bad_videos_are_error_rows_and_the_run_goes_on_beside_a_dump(ray_session, shapes_model, videos, tmp_path):
    """Videos good, cut short, not a video and audio only, in one run with an ffmpeg-style frame dump.

    ``ffmpeg -i ep.mkv -vf fps=2 dump/ep/%06d.jpg`` writes 000001.jpg for t=0: with
    --fps 2 --first-frame-number 1 the dump's frames get their true times.
    """
    folder = tmp_path / "episodes"
    folder.mkdir()
    make_video(str(folder / "good.mkv"), seed=3, seconds=4)
    data = open(os.path.join(videos["folder"], "S01E02.mkv"), "rb").read()
    (folder / "cut.mkv").write_bytes(data[: len(data) // 2])
    (folder / "notes.mp4").write_text("not a video\n")
    write_audio_only(str(folder / "song.mp4"))
    (folder / "dump").mkdir()
    rng = np.random.default_rng(5)
    for n in range(1, 7):
        (folder / "dump" / f"{n:06d}.jpg").write_bytes(encode(class_image(n % 4, rng, 44)))
    output = str(tmp_path / "labels")
    config = LabelConfig(model_uri=shapes_model, frames_uri=str(folder), output_uri=output, sample_fps=2.0,
                         fps=2.0, first_frame_number=1, seconds_per_read_task=2.0)
    summary = label(config)
    df, errors = read_labels(output), read_errors(output)
    assert summary["episodes_labelled"] == 5 and sorted(summary["empty_episodes"]) == ["notes", "song"]
    assert df[df["episode"] == "good"]["timestamp_s"].tolist() == [k / 2 for k in range(8)]
    cut = df[df["episode"] == "cut"]["timestamp_s"].tolist()
    assert 2 <= len(cut) < 12 and cut == [k / 2 for k in range(len(cut))]  # every frame before the damage
    by_episode = errors.groupby("episode")["error"].apply(list).to_dict()
    assert all("truncated video" in e or "no frames" in e for e in by_episode["cut"]) and by_episode["cut"]
    assert by_episode["notes"] == ["not a video file FFmpeg can read: Invalid data found when processing input"]
    assert by_episode["song"] == ["no video stream in the file (it has audio)"]
    assert "good" not in by_episode and "dump" not in by_episode
    dump = df[df["episode"] == "dump"].sort_values("frame")
    assert dump["frame"].tolist() == [1, 2, 3, 4, 5, 6] and dump["timestamp_s"].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    # The dump's marker keeps its first frame number; the videos' markers their sampling rate.
    with pytest.raises(UserError, match="dump .*first_frame_number 1 .now 0."):
        label(dataclasses.replace(config, first_frame_number=0))
    with pytest.raises(UserError, match="good .sample_fps 2.0 .now 4.0."):
        label(dataclasses.replace(config, sample_fps=4.0, episodes=("good", "dump")))


@pytest.mark.slow
def test_videos_on_s3_at_every_frame(ray_session, shapes_model, videos, sampled_run, s3_server, s3_bucket):
    """The second sampling rate, read from the S3 server: every frame, the same scores where the two rates meet."""
    client = s3_server.client()
    frames_uri = upload_tree(client, s3_bucket, videos["folder"], "episodes")
    output = f"s3://{s3_bucket}/labels"
    summary = label(LabelConfig(model_uri=shapes_model, frames_uri=frames_uri, output_uri=output, sample_fps=None,
                                seconds_per_read_task=2.5))
    assert summary["frames_labelled"] == 2 * SECONDS * FPS and summary["errors"] == 0
    every = read_labels(output)
    assert every["source"].str.startswith(f"{frames_uri}/").all()
    for episode in ("S01E01", "S01E02"):
        mine = every[every["episode"] == episode]
        assert mine["frame"].tolist() == list(range(SECONDS * FPS))
        assert np.allclose(mine["timestamp_s"], mine["frame"] / FPS, atol=1e-3)  # Matroska keeps milliseconds
    assert (every["label"] == every["timestamp_s"].map(truth)).mean() >= 0.95
    both = every.merge(read_labels(sampled_run["output"]), on=["episode", "frame"], suffixes=("_all", "_2fps"))
    assert len(both) == 2 * SECONDS * 2 and (both["label_all"] == both["label_2fps"]).all()
    assert np.allclose(both["confidence_all"], both["confidence_2fps"], atol=1e-5)


@pytest.mark.parametrize("sample_fps", [2.0, pytest.param(4.0, marks=pytest.mark.slow), pytest.param(None, marks=pytest.mark.slow)],
                         ids=["2fps", "4fps", "all"])  # 2 frames/s in the fast tier; the other rates in the full suite
def test_a_truncated_video_on_s3_gives_its_frames_and_an_error_row_as_on_disk(ray_session, shapes_model, s3_server, s3_bucket,
                                                                              tmp_path, sample_fps):
    """A cut .mkv among good videos: read from S3, a range that starts past the cut seeks past the end of the object.

    pyarrow's S3 file refused that seek, the read task raised and the whole job failed;
    now each range reads as from a local disk: the good frames, one error row, the job done.
    """
    folder = tmp_path / "episodes"
    folder.mkdir()
    make_video(str(folder / "good.mp4"), seed=1, seconds=4)
    make_video(str(folder / "fine.mkv"), seed=2, seconds=4)
    make_video(str(tmp_path / "whole.mkv"), seed=4, seconds=8)
    data = (tmp_path / "whole.mkv").read_bytes()
    (folder / "cut.mkv").write_bytes(data[: len(data) * 2 // 5])
    frames_uri = upload_tree(s3_server.client(), s3_bucket, str(folder), f"cut-{sample_fps}")
    runs = {}
    for where, frames in (("s3", frames_uri), ("disk", str(folder))):
        output = str(tmp_path / f"labels-{where}")
        summary = label(LabelConfig(model_uri=shapes_model, frames_uri=frames, output_uri=output, sample_fps=sample_fps,
                                    seconds_per_read_task=1.0))
        assert summary["episodes_labelled"] == 3
        runs[where] = (read_labels(output), read_errors(output))
    (df, errors), (disk_df, disk_errors) = runs["s3"], runs["disk"]
    per_second = sample_fps or FPS
    for good in ("good", "fine"):
        assert (df["episode"] == good).sum() == 4 * per_second
    cut = df[df["episode"] == "cut"]
    assert 0 < len(cut) < 8 * per_second
    assert set(errors["episode"]) == {"cut"} and all("truncated" in e or "corrupt" in e or "no frames" in e for e in errors["error"])
    # The same rows and errors as the same files on a local disk.
    assert sorted(cut["frame"]) == sorted(disk_df[disk_df["episode"] == "cut"]["frame"])
    assert len(errors) == len(disk_errors)


def test_contact_sheet_reads_frames_from_the_video(videos, sampled_run, tmp_path):
    from simpsons_ray.query import charts as plots

    df = read_labels(sampled_run["output"])
    rows = df[df["timestamp_s"].isin([2.5, 5.0])]
    pictures = plots.fetch_sources(rows["source"].tolist())
    for row in rows.itertuples():
        picture = pictures[row.source]
        assert isinstance(picture, Image.Image), f"no frame for {row.source}"
        expected = videos["pictures"][row.episode][int(row.timestamp_s)].resize(picture.size)
        diff = np.abs(np.asarray(picture, dtype=float) - np.asarray(expected.convert("RGB"), dtype=float)).mean()
        assert diff < 12, f"{row.source}: mean difference {diff:.1f} from the picture shown at that second"
    sheet = str(tmp_path / "sheet.png")
    plots.contact_sheet(rows.assign(confidence=rows["confidence"].astype(float)), sheet)
    assert Image.open(sheet).size == plots.contact_sheet_size(len(rows))


def test_cli_flags_for_videos_and_dumps(shapes_model, tmp_path, capsys):
    from simpsons_ray import cli

    assert cli.main(["label", "--model", shapes_model, "--frames", str(tmp_path / "missing.mkv"), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().endswith("does not exist: give the folder (local or s3://) that holds the episodes.")
    (tmp_path / "notes.txt").write_text("not an episode")
    assert cli.main(["label", "--model", shapes_model, "--frames", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "o")]) == 2
    assert "is a file but not a .tar/.tar.gz archive or a video" in capsys.readouterr().err
    for bad in (["--sample-fps", "-1"], ["--sample-fps", "often"], ["--first-frame-number", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.build_parser().parse_args(["label", "--model", "m", "--frames", "f", "--output", "o", *bad])
        assert exit_info.value.code == 2
    args = cli.build_parser().parse_args(["label", "--model", "m", "--frames", "f", "--output", "o", "--sample-fps", "all",
                                          "--first-frame-number", "1"])
    assert args.sample_fps is None and args.first_frame_number == 1


def test_queries_give_true_seconds_on_video_labels(sampled_run):
    """Each second shows one shape, so each character is on screen 2 s of the 8, in two 1-second segments."""
    from simpsons_ray import query

    times = query.screen_time(sampled_run["output"], min_confidence=0.0)
    assert set(times["episode"]) == {"S01E01", "S01E02"}
    assert np.allclose(times.groupby("episode")["seconds"].sum(), SECONDS)
    segments = query.segments(sampled_run["output"], character="lisa", min_confidence=0.0, max_gap_s=0.0, episodes=["S01E01"])
    assert segments[["start_s", "end_s"]].values.tolist() == [[2.0, 3.0], [6.0, 7.0]]
