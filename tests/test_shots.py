"""Shots and pooling: boundaries found at any sampling rate, answers that hold through a shot, and the odd episodes."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from imagegen import class_image, write_video
from simpsons_ray import query
from simpsons_ray.core.errors import UserError
from simpsons_ray.label import finish, pooling, shots
from simpsons_ray.label.config import LabelConfig
from simpsons_ray.label.run import label
from simpsons_ray.labels import schema
from simpsons_ray.media import video

FPS = 12
SIZE = (160, 120)
CUTS = (3.0, 5.5)  # hard cuts: the first frame of the next shot
DISSOLVE = (8.5, 9.5)  # a 1 s cross-fade; its boundary is its middle
SECONDS = 12
BOUNDARIES = (*CUTS, sum(DISSOLVE) / 2)


def _scene(k: int, seed: int) -> Image.Image:
    """A picture larger than the frame, for the camera to pan over: a class picture, tiled with a second one."""
    rng = np.random.default_rng(seed)
    big = Image.new("RGB", (SIZE[0] * 3 // 2, SIZE[1] * 3 // 2))
    big.paste(class_image(k, rng, SIZE[1]).resize((SIZE[0], SIZE[1] * 3 // 2)), (0, 0))
    big.paste(class_image((k + 1) % 4, rng, SIZE[1]).resize((SIZE[0] // 2, SIZE[1] * 3 // 2)), (SIZE[0], 0))
    return big


def _camera(big: Image.Image, progress: float) -> Image.Image:
    """A slow pan and zoom: the window slides right and narrows as the shot goes on."""
    w, h = int(SIZE[0] * (1 - 0.1 * progress)), int(SIZE[1] * (1 - 0.1 * progress))
    x, y = int(progress * (big.width - w) * 0.3), int(progress * (big.height - h) * 0.2)
    return big.crop((x, y, x + w, y + h)).resize(SIZE)


def cut_video(path: str, fps: int = FPS) -> list[float]:
    """Four shots: hard cuts at CUTS, a dissolve over DISSOLVE; each shot pans over its own picture. Returns the true boundaries."""
    scenes = [_scene(k, seed) for k, seed in ((0, 1), (2, 2), (1, 3), (3, 4))]
    starts = [0.0, CUTS[0], CUTS[1], DISSOLVE[0], SECONDS]
    frames = []
    for i in range(SECONDS * fps):
        t = i / fps
        shot = max(s for s in range(4) if starts[s] <= t) if t < DISSOLVE[0] else 2
        progress = (t - starts[shot]) / (starts[shot + 1] - starts[shot]) if shot < 3 else 0.0
        picture = _camera(scenes[shot], min(progress, 1.0))
        if t >= DISSOLVE[0]:
            after = _camera(scenes[3], (t - DISSOLVE[0]) / (SECONDS - DISSOLVE[0]))
            mix = min(1.0, (t - DISSOLVE[0]) / (DISSOLVE[1] - DISSOLVE[0]))
            picture = Image.blend(_camera(scenes[2], 1.0), after, mix)
        frames.append(picture)
    write_video(path, frames, fps=fps, size=SIZE)
    return list(BOUNDARIES)


def boundaries_of(times: np.ndarray, shot: np.ndarray) -> list[float]:
    order = np.argsort(times, kind="stable")
    times, shot = times[order], shot[order]
    return [float(t) for t in times[1:][np.diff(shot) != 0]]


def assert_near(found: list[float], truth: list[float], tolerance: float) -> None:
    """One found boundary within ``tolerance`` of each true one, and no other."""
    assert len(found) == len(truth), (found, truth)
    for f, t in zip(sorted(found), sorted(truth)):
        assert abs(f - t) <= tolerance + 1e-6, (found, truth)


def _signatures(path: str, sample_fps: Fraction | None, image_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """What the predictor computes on what the read task decodes: the frames at the model's size, their signatures."""
    frames = list(video.iter_range(path, Fraction(0), None, sample_fps, image_size))
    pixels = np.stack([np.frombuffer(f.pixels, np.uint8).reshape(image_size, image_size, 3) for f in frames])
    return np.array([f.timestamp_s for f in frames]), shots.signature(torch.from_numpy(pixels) / 255.0).numpy()


@pytest.mark.parametrize("sample_fps", [2, 4, None], ids=["2fps", "4fps", "all"])
def test_cuts_and_a_dissolve_are_found_at_every_sampling_rate(tmp_path, sample_fps):
    path = str(tmp_path / "cuts.mp4")
    truth = cut_video(path)
    rate = video.parse_sample_fps(sample_fps)
    times, signatures = _signatures(path, rate)
    found = boundaries_of(times, shots.cut_shots(signatures, times))
    assert_near(found, truth, tolerance=1 / float(rate or FPS))


def test_without_times_consecutive_frames_are_compared():
    flat = np.zeros((6, shots.SIGNATURE_SIZE), np.float32)
    flat[:, 0] = 1.0
    flat[3:, 0], flat[3:, 5] = 0.0, 1.0  # another colour from frame 3
    assert shots.cut_shots(flat, None).tolist() == [0, 0, 0, 1, 1, 1]


def test_one_frame_one_long_shot_and_black():
    one = np.ones((1, shots.SIGNATURE_SIZE), np.float32)
    assert shots.cut_shots(one, np.array([0.0])).tolist() == [0]
    assert shots.cut_shots(one[:0], np.zeros(0)).tolist() == []
    black = np.zeros((40, shots.SIGNATURE_SIZE), np.float32)
    black[:, 0] = 1.0
    assert set(shots.cut_shots(black, np.arange(40) / 2.0).tolist()) == {0}


# ------------------------------------------------------------------------ pooling
def _pooled(scores: np.ndarray, shot: np.ndarray, times: np.ndarray, thresholds: float = 0.5) -> np.ndarray:
    pooled = pooling.pool(scores.astype(np.float32), times, shot, pooling.PoolSettings())
    return pooling.decide(pooled, np.full(scores.shape[1], thresholds), multilabel=True)


def test_one_wrong_frame_in_five_does_not_change_a_shots_answer():
    rng = np.random.default_rng(0)
    n = 10  # a 5 s shot at 2 frames/s
    scores = np.zeros((n, 3))
    scores[:, 0] = rng.uniform(0.7, 0.95, n)  # character 0 throughout
    wrong = np.arange(0, n, 5) + 2
    scores[wrong, 0], scores[wrong, 1] = 0.1, 0.9  # every fifth frame says character 1 instead
    on = _pooled(scores, np.zeros(n, np.int32), np.arange(n) / 2.0)
    assert on[:, 0].all() and not on[:, 1].any() and not on[:, 2].any()


def test_a_true_change_inside_a_long_shot_is_kept_and_nobody_stays_empty():
    n = 40  # a 20 s shot at 2 frames/s: character 1 walks in at 10 s; then a nobody shot
    times = np.arange(n + 8) / 2.0
    scores = np.full((n + 8, 2), 0.05)
    scores[:n, 0] = 0.9
    scores[20:n, 1] = 0.9
    scores[n + 3, 1] = 0.9  # one wrong frame in the nobody shot
    shot = np.array([0] * n + [1] * 8, np.int32)
    on = _pooled(scores, shot, times)
    assert on[:n, 0].all()
    entered = np.flatnonzero(on[:n, 1])
    assert entered.min() in (19, 20, 21) and entered.max() == n - 1 and len(entered) == n - entered.min()
    assert not on[n:].any()


def test_pooling_stays_inside_its_shot():
    scores = np.array([[0.9], [0.9], [0.9], [0.1], [0.1]])
    on = _pooled(scores, np.array([0, 0, 0, 1, 1], np.int32), np.arange(5) / 2.0)
    assert on[:, 0].tolist() == [True, True, True, False, False]


def test_finish_sorts_by_time_and_keeps_the_frames_own_answer():
    """Rows that arrive out of order come out in time order, with the pooled and the frame's own answer side by side."""
    n = 10
    order = np.array([5, 6, 7, 8, 9, 0, 1, 2, 3, 4])  # the second read range arrived first
    scores = np.full((n, 2), 0.1, np.float32)
    scores[:, 0] = 0.9
    scores[3, 0] = 0.2  # one frame misses character 0
    signature = np.zeros((n, shots.SIGNATURE_SIZE), np.float32)
    signature[:, 0] = 1.0
    table = pa.table({
        "frame": pa.array(np.arange(n)[order], pa.int64()), "timestamp_s": pa.array(np.arange(n)[order] / 2.0),
        "source": [f"v#t={i}" for i in order], "label": ["a"] * n, "confidence": pa.array(scores[order, 0]),
        "top_labels": [["a", "b"]] * n, "top_scores": [list(map(float, scores[i])) for i in order], "model_id": ["m"] * n,
        "scores": [list(map(float, scores[i])) for i in order], "signature": [list(map(float, s)) for s in signature[order]],
    }, schema=finish.TMP_SCHEMA)
    done = finish.finish(table, ["a", "b"], np.array([0.5, 0.5]), True, pooling.PoolSettings())
    assert done.schema == schema.WRITTEN_FILE_SCHEMA
    assert done["frame"].to_pylist() == list(range(n)) and set(done["shot"].to_pylist()) == {0}
    assert done["characters"].to_pylist() == [["a"]] * n
    assert done["frame_characters"].to_pylist()[3] == [] and done["frame_characters"].to_pylist()[4] == ["a"]
    none = finish.finish(table, ["a", "b"], np.array([0.5, 0.5]), True, pooling.PoolSettings(method="none"))
    assert none["characters"].to_pylist() == none["frame_characters"].to_pylist()


# ------------------------------------------------------------- through the labeling job
@pytest.fixture(scope="module")
def cut_runs(ray_session, shapes_model, tmp_path_factory):
    """The cut video labelled at 2 frames/s and at every frame, and a dump of its frames labelled with --fps."""
    root = tmp_path_factory.mktemp("cut_runs")
    videos = root / "videos"
    videos.mkdir()
    truth = cut_video(str(videos / "cuts.mp4"))
    dump = root / "dump" / "cuts"
    dump.mkdir(parents=True)
    import av

    with av.open(str(videos / "cuts.mp4")) as container:
        for i, frame in enumerate(container.decode(video=0)):
            frame.to_image().save(dump / f"frame_{i:05d}.png")
    runs = {}
    for name, frames, extra in (("2", videos, {"sample_fps": 2.0}), ("all", videos, {"sample_fps": None}),
                                ("dump", dump.parent, {"fps": float(FPS)})):
        output = str(root / f"labels-{name}")
        label(LabelConfig(model_uri=shapes_model, frames_uri=str(frames), output_uri=output, **extra))
        runs[name] = schema.labels_dataset(output).to_table().to_pandas()
    return truth, runs, root


def test_labeling_writes_shots_at_2_and_all_frames_and_a_dump_agrees(cut_runs):
    truth, runs, _ = cut_runs
    for name, tolerance in (("2", 0.5), ("all", 1 / FPS)):
        df = runs[name]
        assert df["shot"].dtype == np.int32 or str(df["shot"].dtype) == "int32"
        assert_near(boundaries_of(df["timestamp_s"].to_numpy(), df["shot"].to_numpy()), truth, tolerance)
    video_rows, dump_rows = runs["all"].sort_values("frame"), runs["dump"].sort_values("frame")
    assert video_rows["frame"].tolist() == dump_rows["frame"].tolist()
    assert video_rows["shot"].tolist() == dump_rows["shot"].tolist()


def test_queries_answer_pooled_by_default_and_per_frame_on_request(cut_runs):
    _, _, root = cut_runs
    output = str(root / "labels-all")
    listed = query.shots(output)
    assert listed["shot"].tolist() == [0, 1, 2, 3]
    assert listed["start_s"].iloc[0] == 0.0 and listed["end_s"].iloc[-1] == pytest.approx(SECONDS, abs=1e-6)
    assert listed["frames"].sum() == SECONDS * FPS
    pooled = query.segments(output)
    per_frame = query.segments(query.open_labels(output, per_frame=True))
    # Pooling never adds segments: within a shot the answer only steadies.
    assert len(pooled) <= len(per_frame)
    # Within a shot the pooled answer changes no more often than the frames' own.
    rows = cut_runs[1]["all"].sort_values("frame")

    def changes(column: str) -> int:
        return sum(int((g[column].map(tuple) != g[column].map(tuple).shift()).sum()) - 1 for _, g in rows.groupby("shot"))

    assert changes("characters") <= changes("frame_characters")


@pytest.mark.slow  # a labelling run of its own (10 s); the full suite runs it
def test_odd_episodes_one_frame_black_and_variable_frame_rate(ray_session, shapes_model, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(5)
    write_video(str(frames / "one.mp4"), [class_image(0, rng, 64)], fps=FPS)
    write_video(str(frames / "black.mp4"), [Image.new("RGB", SIZE)] * (4 * FPS), fps=FPS)
    # Variable frame rate: frames at irregular times, a cut at 2 s.
    pts = [0, 100, 150, 400, 700, 1000, 1900, 2000, 2050, 2300, 2800, 3500]
    before, after = class_image(0, rng, 64), class_image(2, rng, 64)
    pictures = [before if p < 2000 else after for p in pts]
    write_video(str(frames / "vfr.mkv"), pictures, pts=pts, time_base=Fraction(1, 1000))
    (frames / "single").mkdir()
    (frames / "single" / "frame_00001.png").write_bytes(open_png(class_image(1, rng, 64)))
    output = str(tmp_path / "labels")
    summary = label(LabelConfig(model_uri=shapes_model, frames_uri=str(frames), output_uri=output, sample_fps=None))
    assert summary["errors"] == 0 and summary["episodes_labelled"] == 4
    df = schema.labels_dataset(output).to_table().to_pandas()
    by = {e: g.sort_values("timestamp_s", na_position="first") for e, g in df.groupby("episode")}
    assert by["one"]["shot"].tolist() == [0] and by["single"]["shot"].tolist() == [0]
    assert set(by["black"]["shot"]) == {0}
    assert by["vfr"]["shot"].is_monotonic_increasing and by["vfr"]["shot"].max() == 1
    assert boundaries_of(by["vfr"]["timestamp_s"].to_numpy(), by["vfr"]["shot"].to_numpy()) == [2.0]
    shots_table = query.shots(output)
    assert shots_table.groupby("episode")["shot"].count().to_dict() == {"black": 1, "one": 1, "single": 1, "vfr": 2}


def open_png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_old_outputs_without_shots_answer_per_frame_and_say_so_for_shots(tmp_path):
    """A labels file from before shots: every question answers as before; `query shots` says why it cannot."""
    root = tmp_path / "labels" / "episode=E1"
    root.mkdir(parents=True)
    old = pa.schema([*schema.LABELS_FILE_SCHEMA, *(schema.OPTIONAL_FILE_SCHEMA.field(c) for c in ("characters", "character_scores"))])
    pq.write_table(pa.table({
        "frame": pa.array([0, 1, 2], pa.int64()), "timestamp_s": [0.0, 0.5, 1.0], "source": ["a", "b", "c"], "label": ["x", "x", None],
        "confidence": pa.array([0.9, 0.8, 0.2], pa.float32()), "top_labels": [["x"]] * 3,
        "top_scores": pa.array([[0.9], [0.8], [0.2]], pa.list_(pa.float32())), "model_id": ["m"] * 3,
        "characters": [["x"], ["x"], []], "character_scores": pa.array([[0.9], [0.8], []], pa.list_(pa.float32())),
    }, schema=old), root / "part-0.parquet")
    output = str(tmp_path / "labels")
    for labels in (output, query.open_labels(output, per_frame=True)):
        assert query.screen_time(labels)[["character", "frames"]].values.tolist() == [["x", 2]]
        assert query.segments(labels)["frames"].tolist() == [2]
    with pytest.raises(UserError, match="before shots existed"):
        query.shots(output)
    assert os.path.exists(root / "part-0.parquet")


def test_report_timelines_mark_the_shot_boundaries(cut_runs, tmp_path):
    import json
    import re

    from simpsons_ray.report.build import build_report
    from simpsons_ray.report.facts import ReportConfig

    truth, _, root = cut_runs
    page = tmp_path / "report.html"
    build_report(ReportConfig(labels_uri=str(root / "labels-all"), output_uri=str(page), thumbnails=0))
    html = page.read_text()
    data = json.loads(re.search(r"<script type='application/json' id='timeline-data'>(.*?)</script>", html, re.S).group(1))
    assert_near(data["episodes"]["cuts"]["cuts"], truth, 1 / FPS)
    assert "4 shots" in html
