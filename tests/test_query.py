"""Queries on labels datasets the tests write themselves, checked against plain pandas.

The dataset is written exactly as the labels schema says (episode=<id>/*.parquet
without the episode column, _errors/*.parquet), with episodes sampled one frame in
five at 24 fps, every frame at 25 fps, and without timestamps, so seconds, shares
and segment times are checked against numbers known by construction. A second,
multi-label dataset lists every character on screen (shared frames, empty frames)
beside an older single-label episode, and is checked against pandas explode/merge.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from imagegen import class_image, encode, upload_tree, write_tar
from simpsons_ray import cli, query
from simpsons_ray.core.errors import UserError
from simpsons_ray.labels import schema
from simpsons_ray.query import charts as plots

CHARACTERS = ["homer_simpson", "marge_simpson", "bart_simpson", "ned_flanders", "krusty_the_clown"]
# episode -> (rows, frame step, fps or None, how sources are stored)
EPISODES = {
    "s01e01": (300, 5, 24.0, "tar.gz"),  # one frame in five at 24 fps: 5/24 s per frame
    "s01e02": (200, 1, 25.0, "files"),
    "s01e03": (150, 1, None, "tar"),  # labelled without --fps: no seconds
    "s02e01": (240, 5, 24.0, "files"),
}
ERRORS = {"s01e01": 3, "s01e03": 1, "s03e09": 2}  # s03e09: every frame failed


def _episode_rows(episode: str, index: int, frames_root: str) -> pd.DataFrame:
    rows, step, fps, storage_kind = EPISODES[episode]
    rng = np.random.default_rng(100 + index)
    frame = np.arange(rows, dtype=np.int64) * step
    # Characters come in runs, as in a show, with unlabelled stretches between them.
    labels: list[str | None] = []
    while len(labels) < rows:
        who = rng.integers(-1, len(CHARACTERS))
        labels += [None if who < 0 else CHARACTERS[who]] * int(rng.integers(1, 25))
    labels = labels[:rows]
    confidence = rng.uniform(0.2, 1.0, rows).astype(np.float32)
    member = [f"./frames/{f:06d}.jpg" for f in frame]
    if storage_kind == "files":
        source = [os.path.join(frames_root, episode, f"{f:06d}.jpg") for f in frame]
    else:
        archive = os.path.join(frames_root, f"{episode}.{storage_kind}")
        source = [f"{archive}#{m}" for m in member]
    top_labels = [[lab or CHARACTERS[0], CHARACTERS[(i + 1) % 5]] for i, lab in enumerate(labels)]
    return pd.DataFrame(
        {
            "episode": episode,
            "frame": frame,
            "timestamp_s": frame / fps if fps else np.full(rows, np.nan),
            "source": source,
            "label": labels,
            "confidence": confidence,
            "top_labels": top_labels,
            "top_scores": [[float(c), float(1 - c)] for c in confidence],
            "model_id": "resnet18-aaaa" if index % 2 == 0 else np.where(frame < frame[rows // 2], "resnet18-aaaa", "resnet18-bbbb"),
        }
    )


# A labels file of a multi-label model from before shots: its lists are each frame's own answer.
LISTED_FILE_SCHEMA = pa.schema([*schema.LABELS_FILE_SCHEMA, *(schema.OPTIONAL_FILE_SCHEMA.field(c) for c in ("characters", "character_scores"))])


def write_labels(root: str, rows: pd.DataFrame, parts_per_episode: int = 2, file_schema: pa.Schema = schema.LABELS_FILE_SCHEMA) -> None:
    """The labeling job's layout: episode=<id>/part-N.parquet (no episode column inside)."""
    for episode, group in rows.groupby("episode"):
        folder = os.path.join(root, f"episode={episode}")
        os.makedirs(folder, exist_ok=True)
        bounds = np.linspace(0, len(group), parts_per_episode + 1).astype(int)
        for n in range(parts_per_episode):
            chunk = group[file_schema.names].iloc[bounds[n] : bounds[n + 1]]
            table = pa.Table.from_pandas(chunk, schema=file_schema, preserve_index=False)
            pq.write_table(table, os.path.join(folder, f"part-{n}.parquet"))


def write_frames(frames_root: str, rows: pd.DataFrame) -> None:
    """Real images behind every source, so the contact sheet has something to read."""
    rng = np.random.default_rng(7)
    os.makedirs(frames_root, exist_ok=True)
    for episode, group in rows.groupby("episode"):
        kind = EPISODES[episode][3]
        images = {
            f"./frames/{f:06d}.jpg": encode(class_image(CHARACTERS.index(lab) if isinstance(lab, str) else 5, rng, size=64))
            for f, lab in zip(group["frame"], group["label"])
        }
        if kind == "files":
            os.makedirs(os.path.join(frames_root, episode), exist_ok=True)
            for name, data in images.items():
                with open(os.path.join(frames_root, episode, os.path.basename(name)), "wb") as f:
                    f.write(data)
        else:
            write_tar(os.path.join(frames_root, f"{episode}.{kind}"), images, gz=kind == "tar.gz")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(labels URI, the rows written) for a four-episode output with error rows."""
    root = tmp_path_factory.mktemp("query")
    frames_root, labels_root = str(root / "frames"), str(root / "labels")
    rows = pd.concat([_episode_rows(e, i, frames_root) for i, e in enumerate(EPISODES)], ignore_index=True)
    write_labels(labels_root, rows)
    write_frames(frames_root, rows)
    errors = pd.DataFrame(
        {
            "episode": [e for e, n in ERRORS.items() for _ in range(n)],
            "source": [f"{e}/bad_{i}.jpg" for e, n in ERRORS.items() for i in range(n)],
            "error": "cannot decode image: truncated",
        }
    )
    os.makedirs(os.path.join(labels_root, schema.ERRORS_DIR))
    pq.write_table(pa.Table.from_pandas(errors, schema=schema.ERRORS_SCHEMA, preserve_index=False), os.path.join(labels_root, schema.ERRORS_DIR, "part-0.parquet"))
    # Metadata a real run leaves beside the labels; queries must ignore it.
    os.makedirs(os.path.join(labels_root, schema.RUNS_DIR))
    with open(os.path.join(labels_root, schema.RUNS_DIR, "run.json"), "w") as f:
        json.dump({"rows": len(rows)}, f)
    return labels_root, rows


# ------------------------------------------------------------ independent pandas answers
def _labelled(rows: pd.DataFrame, min_confidence: float) -> pd.DataFrame:
    return rows[rows["label"].notna() & (rows["confidence"] >= min_confidence)]


def _interval(timestamps: pd.Series) -> float:
    values = np.unique(timestamps.dropna().to_numpy())
    return float(np.median(np.diff(values))) if len(values) >= 2 else np.nan


def expected_screen_time(rows: pd.DataFrame, min_confidence: float) -> pd.DataFrame:
    intervals = rows.groupby("episode")["timestamp_s"].apply(_interval)
    counts = _labelled(rows, min_confidence).groupby(["episode", "label"]).size().rename("frames").reset_index()
    counts = counts.rename(columns={"label": "character"})
    counts["seconds"] = counts["frames"] * counts["episode"].map(intervals)
    counts["share"] = counts["frames"] / counts.groupby("episode")["frames"].transform("sum")
    return counts.sort_values(["episode", "frames", "character"], ascending=[True, False, True]).reset_index(drop=True)


def expected_segments(rows: pd.DataFrame, min_confidence: float, max_gap_s: float, appearances: pd.DataFrame | None = None) -> pd.DataFrame:
    """A plain loop: walk each character's frames in time order, cut where the gap is too long.

    ``appearances`` (episode, frame, timestamp_s, character) says who is on which
    frame; by default the labelled rows.
    """
    if appearances is None:
        appearances = _labelled(rows, min_confidence).rename(columns={"label": "character"})
    out = []
    for episode, group in rows.groupby("episode"):
        interval = _interval(group["timestamp_s"])
        timed = not np.isnan(interval)
        step = interval if timed else float(np.median(np.diff(np.unique(group["frame"]))))
        allowed = max_gap_s if timed else 0.0
        for character, mine in appearances[appearances["episode"] == episode].groupby("character"):
            mine = mine.sort_values("frame")
            times = (mine["timestamp_s"] if timed else mine["frame"]).tolist()
            frames = mine["frame"].tolist()
            begin = 0
            for i in range(1, len(times) + 1):
                if i == len(times) or times[i] - (times[i - 1] + step) > allowed + 1e-6:
                    start, end = times[begin], times[i - 1] + step
                    out.append(
                        {
                            "episode": episode,
                            "character": character,
                            "start_s": start if timed else np.nan,
                            "end_s": end if timed else np.nan,
                            "duration_s": end - start if timed else np.nan,
                            "frames": i - begin,
                            "first_frame": frames[begin],
                            "last_frame": frames[i - 1],
                        }
                    )
                    begin = i
    result = pd.DataFrame(out)
    return result.sort_values(["episode", "first_frame", "character"]).reset_index(drop=True)


def _sorted_segments(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["episode", "first_frame", "character"]).reset_index(drop=True)


# ----------------------------------------------------------------------- the queries
@pytest.mark.parametrize("min_confidence", [0.0, 0.6])
def test_screen_time_matches_pandas_and_sampling_gives_true_seconds(dataset, min_confidence):
    labels_uri, rows = dataset
    result = query.screen_time(labels_uri, min_confidence=min_confidence)
    pd.testing.assert_frame_equal(result, expected_screen_time(rows, min_confidence), check_dtype=False)
    # By construction: one frame in five at 24 fps is 5/24 s per labelled frame...
    s01e01 = result[result["episode"] == "s01e01"]
    np.testing.assert_allclose(s01e01["seconds"], s01e01["frames"] * 5 / 24)
    # ...every frame at 25 fps is 1/25 s, and no timestamps means no seconds.
    s01e02 = result[result["episode"] == "s01e02"]
    np.testing.assert_allclose(s01e02["seconds"], s01e02["frames"] / 25)
    assert result.loc[result["episode"] == "s01e03", "seconds"].isna().all()
    np.testing.assert_allclose(result.groupby("episode")["share"].sum(), 1.0)
    assert list(result.columns) == ["episode", "character", "frames", "seconds", "share"]


def test_screen_time_of_some_episodes_and_one_character(dataset):
    labels_uri, rows = dataset
    result = query.screen_time(labels_uri, episodes=["s02e01"], character="bart_simpson")
    expected = expected_screen_time(rows, 0.0)
    expected = expected[(expected["episode"] == "s02e01") & (expected["character"] == "bart_simpson")]
    pd.testing.assert_frame_equal(result, expected.reset_index(drop=True), check_dtype=False)


@pytest.mark.parametrize("character,min_confidence,episodes", [("ned_flanders", 0.0, None), ("homer_simpson", 0.7, ["s01e02", "s01e03"])])
def test_frames_best_first_matches_pandas(dataset, character, min_confidence, episodes):
    labels_uri, rows = dataset
    result = query.frames(labels_uri, character, min_confidence=min_confidence, episodes=episodes)
    mine = _labelled(rows, min_confidence)
    mine = mine[mine["label"] == character]
    if episodes:
        mine = mine[mine["episode"].isin(episodes)]
    expected = mine.sort_values(["confidence", "episode", "frame"], ascending=[False, True, True])[query.FRAMES_COLUMNS]
    assert len(result) > 0
    pd.testing.assert_frame_equal(result, expected.reset_index(drop=True), check_dtype=False)
    assert list(result.columns) == ["episode", "frame", "timestamp_s", "confidence", "source"]


def test_frames_limit_keeps_the_best(dataset):
    labels_uri, _ = dataset
    everything = query.frames(labels_uri, "marge_simpson")
    best = query.frames(labels_uri, "marge_simpson", limit=7)
    pd.testing.assert_frame_equal(best, everything.head(7))


def test_frames_of_a_known_character_below_the_threshold_is_empty_not_an_error(dataset):
    labels_uri, _ = dataset
    assert query.frames(labels_uri, "krusty_the_clown", min_confidence=1.0).empty


@pytest.mark.parametrize("min_confidence,max_gap_s", [(0.0, 1.0), (0.5, 0.0), (0.3, 3.0)])
def test_segments_match_a_plain_loop(dataset, min_confidence, max_gap_s):
    labels_uri, rows = dataset
    result = query.segments(labels_uri, min_confidence=min_confidence, max_gap_s=max_gap_s)
    expected = expected_segments(rows, min_confidence, max_gap_s)
    pd.testing.assert_frame_equal(_sorted_segments(result), expected, check_dtype=False)
    # Each labelled frame is in exactly one segment.
    assert result["frames"].sum() == len(_labelled(rows, min_confidence))
    assert list(result.columns) == query.SEGMENTS_COLUMNS


def test_segment_duration_counts_the_sampling_interval(tmp_path):
    """Frames 0,5,10 (one in five at 24 fps) then 40: two segments unless the gap is bridged."""
    frame = np.array([0, 5, 10, 15, 20, 25, 30, 35, 40])
    rows = pd.DataFrame(
        {
            "episode": "e1",
            "frame": frame,
            "timestamp_s": frame / 24,
            "source": "x.jpg",
            "label": ["bart", "bart", "bart", None, None, None, None, None, "bart"],
            "confidence": np.float32(0.9),
            "top_labels": [["bart"]] * 9,
            "top_scores": [[0.9]] * 9,
            "model_id": "m",
        }
    )
    write_labels(str(tmp_path), rows, parts_per_episode=1)
    strict = query.segments(str(tmp_path), max_gap_s=0.0)
    np.testing.assert_allclose(strict[["start_s", "end_s", "frames"]].to_numpy(float), [[0.0, 15 / 24, 3], [40 / 24, 45 / 24, 1]])
    np.testing.assert_allclose(strict["duration_s"], [15 / 24, 5 / 24])
    # The hole is 40/24 - 15/24 = 25/24 s: bridged by 1.1 s, not by 1.0 s.
    assert len(query.segments(str(tmp_path), max_gap_s=1.0)) == 2
    bridged = query.segments(str(tmp_path), max_gap_s=1.1)
    np.testing.assert_allclose(bridged[["start_s", "end_s", "frames", "first_frame", "last_frame"]].to_numpy(float), [[0.0, 45 / 24, 4, 0, 40]])


def test_summary_matches_pandas_and_counts_error_rows(dataset):
    labels_uri, rows = dataset
    result = query.summary(labels_uri, min_confidence=0.5)
    grouped = rows.groupby("episode")
    expected = pd.DataFrame(
        {
            "frames": grouped.size(),
            "labelled_frames": _labelled(rows, 0.5).groupby("episode").size(),
            "mean_confidence": grouped["confidence"].mean().astype(float),
            "model_ids": grouped["model_id"].apply(lambda s: ",".join(sorted(set(s)))),
        }
    )
    expected = expected.reindex(sorted(set(EPISODES) | set(ERRORS)))
    expected["error_rows"] = pd.Series(ERRORS).reindex(expected.index).fillna(0)
    expected = expected.fillna({"frames": 0, "labelled_frames": 0, "model_ids": ""}).rename_axis("episode").reset_index()
    expected = expected[query.SUMMARY_COLUMNS]
    pd.testing.assert_frame_equal(result, expected, check_dtype=False, rtol=1e-6)
    assert result.loc[result["episode"] == "s01e02", "model_ids"].item() == "resnet18-aaaa,resnet18-bbbb"
    # An episode with error rows only can be asked for by name, like any other.
    some = query.summary(labels_uri, episodes=["s03e09", "s01e03"])
    assert some[["episode", "frames", "error_rows"]].values.tolist() == [["s01e03", 150, 1], ["s03e09", 0, 2]]


# -------------------------------------------------------------------- pruning, S3
def _with_corrupt_partitions(labels_uri: str, tmp_path, keep: str) -> str:
    """A copy whose other episodes' files are garbage: reading them would fail loudly."""
    copy = str(tmp_path / "corrupt")
    shutil.copytree(labels_uri, copy)
    for episode in EPISODES:
        if episode != keep:
            folder = os.path.join(copy, f"episode={episode}")
            for name in os.listdir(folder):
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(b"not parquet at all")
    return copy


def test_episode_filter_opens_only_that_partition(dataset, tmp_path):
    labels_uri, rows = dataset
    corrupt = _with_corrupt_partitions(labels_uri, tmp_path, keep="s01e02")
    only = rows[rows["episode"] == "s01e02"]
    pd.testing.assert_frame_equal(
        query.screen_time(corrupt, episodes=["s01e02"]), expected_screen_time(only, 0.0), check_dtype=False
    )
    assert len(query.frames(corrupt, "homer_simpson", episodes=["s01e02"])) == len(_labelled(only, 0)[lambda d: d["label"] == "homer_simpson"])
    assert query.segments(corrupt, episodes=["s01e02"])["frames"].sum() == len(_labelled(only, 0))
    assert query.summary(corrupt, episodes=["s01e02"])["frames"].tolist() == [len(only)]
    # The same queries without the filter do open the corrupt files, and say so.
    with pytest.raises(UserError, match=r"Cannot read .*episode=s01e01"):
        query.screen_time(corrupt)


def test_unknown_episode_is_named_with_suggestions(dataset):
    labels_uri, _ = dataset
    with pytest.raises(UserError, match=r"No episode 's01e9' in the labels at .*; closest known names: .*s01e01"):
        query.screen_time(labels_uri, episodes=["s01e01", "s01e9"])


def test_queries_read_s3_like_local(dataset, s3_server, s3_bucket, tmp_path):
    labels_uri, rows = dataset
    frames_root = os.path.join(os.path.dirname(labels_uri), "frames")
    s3_labels = upload_tree(s3_server.client(), s3_bucket, labels_uri, "run1/labels")
    pd.testing.assert_frame_equal(query.screen_time(s3_labels, min_confidence=0.4), query.screen_time(labels_uri, min_confidence=0.4))
    pd.testing.assert_frame_equal(query.summary(s3_labels), query.summary(labels_uri))
    pd.testing.assert_frame_equal(query.segments(s3_labels, episodes=["s01e01"]), query.segments(labels_uri, episodes=["s01e01"]))
    # Pruning on S3 too: the other episodes' objects are garbage and never opened.
    s3_corrupt = upload_tree(s3_server.client(), s3_bucket, _with_corrupt_partitions(labels_uri, tmp_path, keep="s02e01"), "corrupt")
    pd.testing.assert_frame_equal(query.screen_time(s3_corrupt, episodes=["s02e01"]), query.screen_time(labels_uri, episodes=["s02e01"]))
    with pytest.raises(UserError, match=r"Cannot read s3://.*/corrupt/episode=s01e01/part-0.parquet"):
        query.summary(s3_corrupt)
    # A contact sheet of frames whose sources are S3 objects and S3 archive members.
    s3_frames = upload_tree(s3_server.client(), s3_bucket, frames_root, "dumps")
    best = query.frames(s3_labels, "bart_simpson", limit=8)
    best["source"] = best["source"].str.replace(frames_root, s3_frames, regex=False)
    assert best["source"].str.contains(".tar.gz#").any() and best["source"].str.startswith("s3://").all()
    sheet_uri = f"s3://{s3_bucket}/sheets/bart.png"
    plots.contact_sheet(best, sheet_uri)
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="sheets/bart.png")["Body"].read()
    sheet = Image.open(io.BytesIO(body))
    assert sheet.size == plots.contact_sheet_size(8)
    assert _tiles_unreadable(sheet, 8) == [False] * 8


# -------------------------------------------------- multi-label labels: everyone on screen
# episode -> (rows, frame step, fps or None, whether the files have `characters` lists)
MULTI_EPISODES = {
    "s04e01": (240, 5, 24.0, True),  # one frame in five at 24 fps: 5/24 s per frame
    "s04e02": (200, 1, 25.0, True),
    "s04e03": (120, 1, None, True),  # labelled without --fps: no seconds
    "s04e04": (160, 1, 8.0, False),  # an older single-label file beside them: no list columns
}
SIDEKICK = CHARACTERS[4]  # listed on shared frames only, always below the top-1: never a `label`


def _multi_label_rows(episode: str, index: int) -> pd.DataFrame:
    """Four characters coming and going in runs of their own, so frames are shared and some hold nobody, and a
    sidekick who only ever joins them."""
    rows, step, fps, listed = MULTI_EPISODES[episode]
    rng = np.random.default_rng(200 + index)
    frame = np.arange(rows, dtype=np.int64) * step
    present = np.zeros((rows, len(CHARACTERS)), dtype=bool)
    for j in range(len(CHARACTERS)):
        start, on = 0, bool(rng.integers(0, 2))
        while start < rows:
            run = int(rng.integers(1, 20))
            present[start : start + run, j] = on
            start, on = start + run, not on
    # Scores are float32 values, as the files hold them, so pandas and the query see the same numbers.
    score = rng.uniform(0.2, 1.0, present.shape).astype(np.float32)
    present[:, 4] &= present[:, :4].any(axis=1)
    top = np.where(present[:, :4], score[:, :4], 0).max(axis=1)
    score[:, 4] = (top * rng.uniform(0.3, 0.95, rows)).astype(np.float32)
    characters, scores = [], []
    for i in range(rows):
        who = [j for j in np.argsort(-score[i], kind="stable") if present[i, j]]
        characters.append([CHARACTERS[j] for j in who])
        scores.append([float(score[i, j]) for j in who])
    top1 = rng.uniform(0.05, 0.5, rows).astype(np.float32)  # nobody listed: the model's best guess, unlisted
    confidence = np.array([s[0] if s else float(top1[i]) for i, s in enumerate(scores)], dtype=np.float32)
    return pd.DataFrame(
        {
            "episode": episode,
            "frame": frame,
            "timestamp_s": frame / fps if fps else np.full(rows, np.nan),
            "source": [f"/nowhere/{episode}/{f:06d}.jpg" for f in frame],
            "label": [c[0] if c else None for c in characters],
            "confidence": confidence,
            "top_labels": [c[:1] or [CHARACTERS[0]] for c in characters],
            "top_scores": [[float(c)] for c in confidence],
            "model_id": "resnet50-multi",
            "characters": characters if listed else None,
            "character_scores": scores if listed else None,
        }
    )


@pytest.fixture(scope="module")
def multi_dataset(tmp_path_factory):
    """(labels URI, the rows written) for three multi-label episodes and one single-label episode."""
    root = str(tmp_path_factory.mktemp("multi") / "labels")
    rows = pd.concat([_multi_label_rows(e, i) for i, e in enumerate(MULTI_EPISODES)], ignore_index=True)
    listed = rows["episode"].map(lambda e: MULTI_EPISODES[e][3])
    write_labels(root, rows[listed], file_schema=LISTED_FILE_SCHEMA)
    write_labels(root, rows[~listed])
    return root, rows


def expected_on_screen(rows: pd.DataFrame, min_confidence: float) -> pd.DataFrame:
    """episode, frame, timestamp_s, source, character, score: a row per character a frame puts on screen."""
    columns = ["episode", "frame", "timestamp_s", "source", "character", "score"]
    listed = rows[rows["characters"].notna()].explode(["characters", "character_scores"]).dropna(subset=["characters"])
    listed = listed.rename(columns={"characters": "character", "character_scores": "score"})
    listed = listed[listed["score"].astype(float) >= min_confidence]
    single = _labelled(rows[rows["characters"].isna()], min_confidence).rename(columns={"label": "character", "confidence": "score"})
    return pd.concat([listed[columns], single[columns]], ignore_index=True).astype({"score": float})


def expected_nobody(rows: pd.DataFrame, min_confidence: float) -> pd.DataFrame:
    """The rows that put nobody on screen, as the character "(nobody)"."""
    seen = expected_on_screen(rows, min_confidence)
    someone = pd.MultiIndex.from_frame(rows[["episode", "frame"]]).isin(pd.MultiIndex.from_frame(seen[["episode", "frame"]]))
    return rows[~someone].assign(character=query.NOBODY)


def expected_multi_screen_time(rows: pd.DataFrame, min_confidence: float, nobody: bool = False) -> pd.DataFrame:
    on = expected_on_screen(rows, min_confidence)
    intervals = rows.groupby("episode")["timestamp_s"].apply(_interval)
    counts = on.groupby(["episode", "character"]).size().rename("frames").reset_index()
    someone = on.drop_duplicates(["episode", "frame"]).groupby("episode").size()
    counts["share"] = counts["frames"] / counts["episode"].map(someone)
    if nobody:
        empty = expected_nobody(rows, min_confidence).groupby("episode").size().reindex(sorted(MULTI_EPISODES), fill_value=0)
        counts = pd.concat([counts, pd.DataFrame({"episode": empty.index, "character": query.NOBODY, "frames": empty.values, "share": np.nan})])
    counts["seconds"] = counts["frames"] * counts["episode"].map(intervals)
    counts = counts.sort_values(["episode", "frames", "character"], ascending=[True, False, True])
    return counts[query.SCREEN_TIME_COLUMNS].reset_index(drop=True)


def expected_together(rows: pd.DataFrame, min_confidence: float) -> pd.DataFrame:
    """Pairs from exploding each frame's characters and joining a frame with itself; seconds per episode's interval."""
    on = expected_on_screen(rows, min_confidence)[["episode", "frame", "character"]]
    pairs = on.merge(on, on=["episode", "frame"], suffixes=("_a", "_b"))
    pairs = pairs[pairs["character_a"] < pairs["character_b"]].rename(columns={"character_a": "a", "character_b": "b"})
    per_episode = pairs.groupby(["a", "b", "episode"]).size().rename("frames").reset_index()
    per_episode["seconds"] = per_episode["frames"] * per_episode["episode"].map(rows.groupby("episode")["timestamp_s"].apply(_interval))
    result = per_episode.groupby(["a", "b"]).agg(
        frames=("frames", "sum"), seconds=("seconds", lambda s: s.sum(skipna=False)), episodes=("episode", "nunique")
    )
    result = result.reset_index().sort_values(["seconds", "frames", "a", "b"], ascending=[False, False, True, True])
    return result[query.TOGETHER_COLUMNS].reset_index(drop=True)


def test_a_shared_frame_counts_for_both_characters(tmp_path):
    """Three frames at 4 fps: [homer, bart], [homer], []: homer has two frames, bart one, nobody one."""
    rows = pd.DataFrame(
        {
            "episode": "e1",
            "frame": [0, 1, 2],
            "timestamp_s": [0.0, 0.25, 0.5],
            "source": "x.jpg",
            "label": ["homer", "homer", None],
            "confidence": np.float32([0.9, 0.8, 0.3]),
            "top_labels": [["homer"]] * 3,
            "top_scores": [[0.9]] * 3,
            "model_id": "m",
            "characters": [["homer", "bart"], ["homer"], []],
            "character_scores": [[0.9, 0.7], [0.8], []],
        }
    )
    write_labels(str(tmp_path), rows, parts_per_episode=1, file_schema=LISTED_FILE_SCHEMA)
    screen = query.screen_time(str(tmp_path), nobody=True)
    assert screen[["character", "frames", "seconds", "share"]].values.tolist() == [
        ["homer", 2, 0.5, 1.0], ["(nobody)", 1, 0.25, pytest.approx(np.nan, nan_ok=True)], ["bart", 1, 0.25, 0.5]
    ]
    segs = query.segments(str(tmp_path))
    assert segs[["character", "start_s", "end_s", "frames"]].values.tolist() == [["bart", 0.0, 0.25, 1], ["homer", 0.0, 0.5, 2]]
    bart = query.frames(str(tmp_path), "bart")
    assert bart[["frame", "confidence"]].values.tolist() == [[0, pytest.approx(0.7)]]  # bart's own score, not the top-1's
    assert query.together(str(tmp_path))[["a", "b", "frames", "seconds", "episodes"]].values.tolist() == [["bart", "homer", 1, 0.25, 1]]
    # Above bart's score he leaves the frame, and nobody is with homer.
    assert query.together(str(tmp_path), min_confidence=0.75).empty


@pytest.mark.parametrize("min_confidence", [0.0, 0.5])
def test_multi_label_screen_time_counts_everyone_on_screen(multi_dataset, min_confidence):
    labels_uri, rows = multi_dataset
    result = query.screen_time(labels_uri, min_confidence=min_confidence)
    pd.testing.assert_frame_equal(result, expected_multi_screen_time(rows, min_confidence), check_dtype=False)
    shares = result.groupby("episode")["share"].sum()
    # Shared frames count for each character on them: more than the whole in the multi-label episodes...
    assert (shares[["s04e01", "s04e02", "s04e03"]] > 1.05).all()
    # ...and exactly the whole in the single-label one, which reads as it always did.
    assert shares["s04e04"] == pytest.approx(1.0)
    # The sidekick is never anyone's top-1 label and still has his screen time and his frames.
    assert SIDEKICK not in set(rows["label"]) and (result["character"] == SIDEKICK).any()
    sidekick = query.frames(labels_uri, SIDEKICK, min_confidence=min_confidence)
    on = expected_on_screen(rows, min_confidence)
    expected = on[on["character"] == SIDEKICK].rename(columns={"score": "confidence"})
    expected = expected.sort_values(["confidence", "episode", "frame"], ascending=[False, True, True])[query.FRAMES_COLUMNS]
    pd.testing.assert_frame_equal(sidekick, expected.reset_index(drop=True), check_dtype=False)


@pytest.mark.parametrize("min_confidence,max_gap_s", [(0.0, 0.0), (0.5, 1.0)])
def test_multi_label_segments_match_a_plain_loop(multi_dataset, min_confidence, max_gap_s):
    labels_uri, rows = multi_dataset
    result = query.segments(labels_uri, min_confidence=min_confidence, max_gap_s=max_gap_s)
    appearances = expected_on_screen(rows, min_confidence)
    pd.testing.assert_frame_equal(_sorted_segments(result), expected_segments(rows, min_confidence, max_gap_s, appearances), check_dtype=False)
    # Each character's frames are in its segments, so a shared frame is in two or more.
    assert result["frames"].sum() == len(appearances) > appearances.drop_duplicates(["episode", "frame"]).shape[0]


def test_together_matches_pandas_with_each_episodes_interval(multi_dataset):
    labels_uri, rows = multi_dataset
    # Two timed episodes at 5/24 s and 1/25 s per frame: seconds weigh each episode's frames by its own interval.
    timed = ["s04e01", "s04e02"]
    result = query.together(labels_uri, episodes=timed)
    expected = expected_together(rows[rows["episode"].isin(timed)], 0.0)
    assert len(expected) == 10  # every pair of the five characters shares some frame
    pd.testing.assert_frame_equal(result, expected, check_dtype=False)
    assert result["seconds"].notna().all() and (result["episodes"] == 2).all()
    one = query.together(labels_uri, episodes=["s04e01"])
    np.testing.assert_allclose(one["seconds"], one["frames"] * 5 / 24)
    # With the untimed episode a pair's seconds are unknown, and its frames still count; the single-label
    # episode has no pairs at all.
    everything = query.together(labels_uri, min_confidence=0.5)
    pd.testing.assert_frame_equal(everything, expected_together(rows, 0.5), check_dtype=False)
    assert everything["seconds"].isna().all() and everything["frames"].sum() > 0
    assert query.together(labels_uri, episodes=["s04e04"]).empty
    # --character keeps the pairs it is in.
    homer = query.together(labels_uri, episodes=timed, character="homer_simpson")
    pd.testing.assert_frame_equal(homer, expected[(expected["a"] == "homer_simpson") | (expected["b"] == "homer_simpson")].reset_index(drop=True), check_dtype=False)
    assert len(homer) == 4


@pytest.mark.parametrize("min_confidence", [0.0, 0.5])
def test_nobody_screen_time_segments_and_frames_match_pandas(multi_dataset, min_confidence):
    labels_uri, rows = multi_dataset
    screen = query.screen_time(labels_uri, min_confidence=min_confidence, nobody=True)
    pd.testing.assert_frame_equal(screen, expected_multi_screen_time(rows, min_confidence, nobody=True), check_dtype=False)
    empty = expected_nobody(rows, min_confidence)
    assert screen.loc[screen["character"] == query.NOBODY, "frames"].sum() == len(empty) > 0
    segs = query.segments(labels_uri, min_confidence=min_confidence, nobody=True)
    pd.testing.assert_frame_equal(_sorted_segments(segs), expected_segments(rows, min_confidence, 1.0, empty), check_dtype=False)
    assert set(segs["character"]) == {query.NOBODY}
    best = query.frames(labels_uri, None, min_confidence=min_confidence, nobody=True, limit=15)
    expected = empty.sort_values(["confidence", "episode", "frame"], ascending=[False, True, True])[query.FRAMES_COLUMNS]
    pd.testing.assert_frame_equal(best, expected.head(15).reset_index(drop=True), check_dtype=False)


# ----------------------------------------------------------------------------- CLI
def test_cli_table_is_the_default(dataset, capsys):
    labels_uri, _ = dataset
    assert cli.main(["query", "screen-time", "--labels", labels_uri, "--episode", "s01e01,s01e03"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["episode", "character", "frames", "seconds", "share"]
    assert {line.split()[0] for line in lines[1:]} == {"s01e01", "s01e03"}
    s01e03 = [line.split() for line in lines[1:] if line.split()[0] == "s01e03"]
    assert s01e03 and all(fields[3] == "-" for fields in s01e03)  # null seconds shown as "-"


def test_cli_csv_to_stdout_uses_the_api_names(dataset, capsys):
    labels_uri, _ = dataset
    assert cli.main(["query", "frames", "--labels", labels_uri, "--character", "ned_flanders", "--format", "csv", "--limit", "5"]) == 0
    got = pd.read_csv(io.StringIO(capsys.readouterr().out))
    expected = query.frames(labels_uri, "ned_flanders", limit=5)
    assert list(got.columns) == ["episode", "frame", "timestamp_s", "confidence", "source"]
    assert got["frame"].tolist() == expected["frame"].tolist()
    np.testing.assert_allclose(got["confidence"], expected["confidence"], rtol=1e-6)


@pytest.mark.parametrize("question", ["screen-time", "segments", "summary"])
@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_cli_writes_every_format_to_a_file(dataset, tmp_path, question, fmt):
    labels_uri, _ = dataset
    output = str(tmp_path / f"answer.{fmt}")
    argv = ["query", question, "--labels", labels_uri, "--min-confidence", "0.5", "--output", output]
    assert cli.main(argv) == 0  # format from the extension
    expected = query.ask(query.QueryConfig(question, labels_uri, min_confidence=0.5))
    if fmt == "csv":
        got = pd.read_csv(output, keep_default_na=False, na_values=[""])
    elif fmt == "json":
        with open(output) as f:
            got = pd.DataFrame(json.load(f))
    else:
        got = pd.read_parquet(output)
    assert list(got.columns) == list(expected.columns)
    assert len(got) == len(expected) > 0
    for column in expected.columns:
        if pd.api.types.is_numeric_dtype(expected[column]):
            np.testing.assert_allclose(got[column].astype(float), expected[column].astype(float), rtol=1e-6)
        else:
            assert got[column].fillna("").astype(str).tolist() == expected[column].fillna("").astype(str).tolist()


def test_cli_screen_time_chart_and_segments_timeline(dataset, tmp_path):
    labels_uri, _ = dataset
    chart, timeline = str(tmp_path / "screen.png"), str(tmp_path / "timeline.png")
    assert cli.main(["query", "screen-time", "--labels", labels_uri, "--plot", chart, "--format", "csv", "--output", str(tmp_path / "a.csv")]) == 0
    assert cli.main(["query", "segments", "--labels", labels_uri, "--episode", "s01e01", "s01e03", "--plot", timeline, "--output", str(tmp_path / "s.json")]) == 0
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.size == plots.SCREEN_TIME_CHART_PX
        assert len(set(image.convert("RGB").getdata())) > 10  # bars were drawn, not a blank page
    lanes = query.segments(labels_uri, episodes=["s01e01", "s01e03"])["character"].nunique()
    with Image.open(timeline) as image:
        assert image.format == "PNG" and image.size == plots.timeline_size(2, lanes)


def test_cli_contact_sheet_of_the_best_frames(dataset, tmp_path, capsys):
    labels_uri, _ = dataset
    sheet = str(tmp_path / "ned.jpg")
    assert cli.main(["query", "frames", "--labels", labels_uri, "--character", "ned_flanders", "--limit", "9", "--contact-sheet", sheet]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 9
    with Image.open(sheet) as image:
        assert image.format == "JPEG" and image.size == plots.contact_sheet_size(9)


def test_cli_together_table_and_heat_map(multi_dataset, tmp_path):
    labels_uri, rows = multi_dataset
    heat, output = str(tmp_path / "heat.png"), str(tmp_path / "together.csv")
    assert cli.main(["query", "together", "--labels", labels_uri, "--episode", "s04e01,s04e02", "--plot", heat, "--output", output]) == 0
    got = pd.read_csv(output)
    pd.testing.assert_frame_equal(got, expected_together(rows[rows["episode"].isin(["s04e01", "s04e02"])], 0.0), check_dtype=False)
    with Image.open(heat) as image:
        assert image.format == "PNG" and image.size == plots.together_heatmap_size(5)
        assert len(set(image.convert("RGB").getdata())) > 10  # cells were drawn, not a blank page


def test_cli_nobody_frames_in_old_single_label_labels(dataset, capsys):
    """In a single-label output nobody is where the label is null or under --min-confidence."""
    labels_uri, rows = dataset
    assert cli.main(["query", "frames", "--labels", labels_uri, "--nobody", "--min-confidence", "0.6", "--episode", "s01e02", "--format", "csv"]) == 0
    got = pd.read_csv(io.StringIO(capsys.readouterr().out))
    mine = rows[rows["episode"] == "s01e02"]
    empty = mine[mine["label"].isna() | (mine["confidence"] < 0.6)]
    assert sorted(got["frame"]) == sorted(empty["frame"]) and len(got) > 0
    assert (got["confidence"].diff().dropna() <= 0).all()  # the frames that came closest to naming someone first
    assert query.together(labels_uri).empty  # one label per frame: nobody shares it


def test_contact_sheet_reads_files_and_archive_members_and_marks_missing_ones(dataset, tmp_path):
    labels_uri, _ = dataset
    best = query.frames(labels_uri, "homer_simpson", limit=12)
    # One of each kind of source, and one that is gone.
    kinds = [best[best["episode"] == e].head(1) for e in EPISODES]
    picked = pd.concat([k for k in kinds if len(k)], ignore_index=True)
    missing = picked.head(1).assign(source=str(tmp_path / "gone.jpg"))
    picked = pd.concat([picked, missing], ignore_index=True)
    output = str(tmp_path / "sheet.png")
    plots.contact_sheet(picked, output, columns=3)
    with Image.open(output) as sheet:
        assert sheet.size == plots.contact_sheet_size(len(picked), columns=3)
        assert _tiles_unreadable(sheet, len(picked), columns=3) == [False] * (len(picked) - 1) + [True]


def _tiles_unreadable(sheet: Image.Image, count: int, columns: int = plots.CONTACT_SHEET_COLUMNS) -> list[bool]:
    """Whether each tile's centre shows the grey 'unreadable' placeholder rather than a frame."""
    columns = min(columns, count)
    w, h = plots.CONTACT_SHEET_THUMB_PX
    out = []
    for i in range(count):
        x = (i % columns) * w + w // 2
        y = plots.CONTACT_SHEET_TITLE_PX + (i // columns) * (h + plots.CONTACT_SHEET_CAPTION_PX) + h // 4
        pixel = np.array(sheet.convert("RGB").getpixel((x, y)), dtype=int)
        out.append(bool(np.abs(pixel - 200).max() <= 6))
    return out


# ------------------------------------------------------------------------- errors
def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1  # one sentence, no traceback
    return lines[0]


def test_error_no_labels(tmp_path, capsys):
    message = _error(capsys, ["query", "screen-time", "--labels", str(tmp_path / "nothing")])
    assert message.startswith("simpsons-ray query: error: No labels at") and "does not exist" in message
    (tmp_path / "empty" / "_errors").mkdir(parents=True)
    message = _error(capsys, ["query", "frames", "--labels", str(tmp_path / "empty"), "--character", "bart"])
    assert "No labels at" in message and "episode=<id>" in message


def test_error_wrong_schema(tmp_path, capsys):
    folder = tmp_path / "other" / "episode=s01e01"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"path": ["a.jpg"], "class": [3]}), str(folder / "part-0.parquet"))
    message = _error(capsys, ["query", "summary", "--labels", str(tmp_path / "other")])
    assert "is not a labels dataset" in message and "has no column 'label'" in message
    # The right names with an unrelated type are as wrong.
    table = pa.table({"frame": [1], "timestamp_s": [0.1], "label": [3], "confidence": [0.9]})
    pq.write_table(table, str(folder / "part-0.parquet"))
    message = _error(capsys, ["query", "screen-time", "--labels", str(tmp_path / "other")])
    assert "column 'label'" in message and "int64" in message
    # Parquet outside episode=<id> folders, or one file instead of the folder.
    pq.write_table(table, str(tmp_path / "flat.parquet"))
    assert "is a file, not a labels output" in _error(capsys, ["query", "summary", "--labels", str(tmp_path / "flat.parquet")])
    (tmp_path / "flat").mkdir()
    shutil.copy(tmp_path / "flat.parquet", tmp_path / "flat" / "labels.parquet")
    assert "not inside an episode=<id> folder" in _error(capsys, ["query", "summary", "--labels", str(tmp_path / "flat")])


def test_error_unknown_character_lists_the_closest_names(dataset, capsys):
    labels_uri, _ = dataset
    message = _error(capsys, ["query", "frames", "--labels", labels_uri, "--character", "ned_flandrs"])
    assert "No character 'ned_flandrs'" in message and "closest known names: ned_flanders" in message
    message = _error(capsys, ["query", "segments", "--labels", labels_uri, "--character", "homer"])
    assert "closest known names: homer_simpson" in message


def test_error_misused_flags(dataset, capsys):
    labels_uri, _ = dataset
    assert "--character" in _error(capsys, ["query", "frames", "--labels", labels_uri])
    assert "--output" in _error(capsys, ["query", "summary", "--labels", labels_uri, "--format", "parquet"])
    assert "--contact-sheet" in _error(capsys, ["query", "summary", "--labels", labels_uri, "--contact-sheet", "x.jpg"])
    assert "between 0 and 1" in _error(capsys, ["query", "screen-time", "--labels", labels_uri, "--min-confidence", "1.5"])
    assert "--nobody" in _error(capsys, ["query", "frames", "--labels", labels_uri, "--nobody", "--character", "ned_flanders"])
    for question in ("summary", "together"):
        assert f"--nobody applies to screen-time, segments and frames, not to `query {question}`" in _error(
            capsys, ["query", question, "--labels", labels_uri, "--nobody"])
    assert "--nobody applies" in _error(capsys, ["query", "at", "--labels", labels_uri, "--episode", "s01e01", "--time", "0", "--nobody"])
    assert "--plot" in _error(capsys, ["query", "summary", "--labels", labels_uri, "--plot", "x.png"])


# ------------------------------------------------------------------------ episode ids
@settings(max_examples=60, deadline=None)
@given(st.one_of(st.text(min_size=1, max_size=40), st.from_regex(r"[^\W_][\w .+()\[\]%=/-]{0,30}", fullmatch=True)))
def test_an_episode_id_reads_back_as_itself_or_is_not_one(tmp_path_factory, name):
    """Any name: either it is an id (labels.ids), and an episode=<id> folder reads back as exactly that id, a
    plain path segment that URL-decoding leaves alone; or it is refused, with a reason."""
    import urllib.parse

    from simpsons_ray.labels.ids import check_episode_id

    why = check_episode_id(name)
    if why:
        assert why.startswith("an episode id")
        return
    assert "/" not in name and "%" not in name and name not in (".", "..") and urllib.parse.unquote(name) == name
    root = tmp_path_factory.mktemp("ids")
    rows = _episode_rows("s01e02", 1, str(root / "frames"))
    write_labels(str(root), rows.assign(episode=name), parts_per_episode=1)
    assert query.open_labels(str(root)).episodes == [name]
    assert query.summary(str(root))["episode"].tolist() == [name]


def test_folders_whose_names_are_not_ids_are_ignored_and_exports_stay_inside_their_folder(tmp_path, caplog):
    """An output holding episode=..%2F..%2Fx (hive decodes it to ../../x) and episode=100%: ignored with a warning,
    and `query segments --output DIR/` writes one file per real episode, inside DIR."""
    root = tmp_path / "labels"
    write_labels(str(root), _episode_rows("s01e02", 1, str(tmp_path / "frames")), parts_per_episode=1)
    for folder in ("episode=..%2F..%2Fescaped", "episode=100%"):
        shutil.copytree(root / "episode=s01e02", root / folder)
    with caplog.at_level("WARNING", logger="simpsons_ray.query"):
        assert query.open_labels(str(root)).episodes == ["s01e02"]
    assert "episode=..%2F..%2Fescaped" in caplog.text and "not an episode id" in caplog.text
    out = tmp_path / "exports" / "srt"
    out.mkdir(parents=True)
    assert cli.main(["query", "segments", "--labels", str(root), "--format", "srt", "--output", f"{out}/"]) == 0
    assert sorted(os.listdir(out)) == ["s01e02.srt"]
    assert not (tmp_path / "escaped.srt").exists() and not list(tmp_path.rglob("escaped*"))
    with pytest.raises(UserError, match="No episode '../../escaped'"):
        query.segments(str(root), episodes=["../../escaped"])
