"""Segments as subtitle tracks and edit lists, SMPTE timecodes, and `query at`.

The subtitle files are read back with independent parsers from PyPI (``srt`` for
SubRip, ``webvtt-py`` for WebVTT), and the cue times checked against the segments
and the rows the tests wrote.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import pytest
import srt
import webvtt
from hypothesis import given, settings
from hypothesis import strategies as st

from simpsons_ray import cli, query
from simpsons_ray.core.errors import UserError
from simpsons_ray.query import exports
from test_query import dataset  # noqa: F401  (the four-episode labels fixture)


def _segments(**columns) -> pd.DataFrame:
    frame = pd.DataFrame(columns)
    frame["duration_s"] = frame["end_s"] - frame["start_s"]
    frame["frames"] = 10
    frame["first_frame"] = (frame["start_s"] * 24).astype(int)
    frame["last_frame"] = (frame["end_s"] * 24).astype(int) - 1
    return frame[query.SEGMENTS_COLUMNS]


def _vtt_seconds(stamp: str) -> float:
    hours, minutes, seconds = stamp.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def test_overlapping_segments_become_cues_naming_everyone_on_screen():
    segs = _segments(episode="s01e05", character=["homer_simpson", "marge_simpson", "bart_simpson"],
                     start_s=[0.0, 5.0, 20.0], end_s=[10.0, 12.5, 21.25])
    cues = list(srt.parse(exports.subtitles(segs, "srt")))
    got = [(c.start.total_seconds(), c.end.total_seconds(), c.content) for c in cues]
    assert got == [
        (0.0, 5.0, "Homer Simpson"),
        (5.0, 10.0, "Homer Simpson, Marge Simpson"),  # Homer first: longer on screen in the episode
        (10.0, 12.5, "Marge Simpson"),
        (20.0, 21.25, "Bart Simpson"),
    ]
    vtt = webvtt.from_string(exports.subtitles(segs, "vtt"))
    assert [(_vtt_seconds(c.start), _vtt_seconds(c.end), c.text) for c in vtt] == got


@settings(max_examples=150, deadline=None)
@given(names=st.lists(st.text(min_size=1, max_size=24), min_size=1, max_size=3, unique=True),
       episode=st.text(min_size=1, max_size=16))
def test_any_name_stays_text_in_srt_vtt_and_edl(names, episode):
    """Names from a hostile model (tags, styling, line breaks, "-->"): one cue per piece, no markup, no extra line."""
    segs = _segments(episode=episode, character=names, start_s=[10.0 * i for i in range(len(names))],
                     end_s=[10.0 * i + 5 for i in range(len(names))])
    for fmt, parse in (("srt", lambda text: [c.content for c in srt.parse(text)]),
                       ("vtt", lambda text: [c.text for c in webvtt.from_string(text)])):
        text = exports.subtitles(segs, fmt)
        cues = parse(text)
        assert len(cues) == len(names), (fmt, text)
        for cue in cues:
            assert "<" not in cue and ">" not in cue and "\n" not in cue.strip("\n")
            assert fmt == "vtt" or "{" not in cue
    edl = exports.edit_list(segs).splitlines()
    assert len(edl) == 2 + 4 * len(names)  # TITLE, FCM, a blank line; then four lines an event, the last blank one dropped
    events = [line for line in edl if re.match(r"^\d{3}  ", line)]
    assert len(events) == len(names)


def test_subtitles_of_a_labelled_episode_match_its_segments(dataset):  # noqa: F811
    labels, rows = dataset
    segs = query.segments(labels, episodes=["s01e01"])
    cues = list(srt.parse(exports.subtitles(segs, "srt")))
    assert cues, "the episode has labelled frames"
    # Every cue names exactly the characters whose segments cover its middle, and the
    # cues cover exactly the time some segment covers.
    for cue in cues:
        middle = (cue.start.total_seconds() + cue.end.total_seconds()) / 2
        covering = segs[(segs["start_s"] <= middle) & (segs["end_s"] >= middle)]["character"]
        assert sorted(cue.content.split(", ")) == sorted(exports.display_name(c) for c in covering)
    covered = sum(c.end.total_seconds() - c.start.total_seconds() for c in cues)
    grid = np.arange(0, segs["end_s"].max(), 0.01) + 0.005
    union = sum(((segs["start_s"].to_numpy()[:, None] <= grid) & (segs["end_s"].to_numpy()[:, None] > grid)).any(axis=0)) * 0.01
    assert covered == pytest.approx(union, abs=0.05)


def test_cli_writes_srt_vtt_and_a_folder_of_files_per_episode(dataset, tmp_path):  # noqa: F811
    labels, _ = dataset
    srt_file, vtt_file = tmp_path / "s01e01.srt", tmp_path / "s01e01.vtt"
    assert cli.main(["query", "segments", "--labels", labels, "--episode", "s01e01", "--output", str(srt_file)]) == 0
    assert cli.main(["query", "segments", "--labels", labels, "--episode", "s01e01", "--format", "vtt", "--output", str(vtt_file)]) == 0
    from_srt = [(c.start.total_seconds(), c.end.total_seconds(), c.content) for c in srt.parse(srt_file.read_text())]
    from_vtt = [(_vtt_seconds(c.start), _vtt_seconds(c.end), c.text) for c in webvtt.read(str(vtt_file))]
    assert from_srt == from_vtt and len(from_srt) > 3
    folder = tmp_path / "tracks"
    assert cli.main(["query", "segments", "--labels", labels, "--episode", "s01e01,s02e01", "--format", "srt", "--output", f"{folder}/"]) == 0
    assert sorted(os.listdir(folder)) == ["s01e01.srt", "s02e01.srt"]
    assert (folder / "s01e01.srt").read_text() == srt_file.read_text()


def test_subtitles_refuse_several_episodes_and_untimed_ones(dataset, capsys):  # noqa: F811
    labels, _ = dataset
    assert cli.main(["query", "segments", "--labels", labels, "--format", "srt"]) == 2
    assert "for one episode" in capsys.readouterr().err
    assert cli.main(["query", "segments", "--labels", labels, "--episode", "s01e03", "--format", "vtt"]) == 2
    err = capsys.readouterr().err
    assert "s01e03 has no timestamps" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["query", "summary", "--labels", labels, "--format", "srt"]) == 2
    assert "exports segments" in capsys.readouterr().err


@pytest.mark.parametrize(
    "seconds, fps, expected",
    [
        (0.0, 24, "00:00:00:00"),
        (3661.5, 25, "01:01:01:12"),
        (1.999, 24, "00:00:01:23"),
        (1800 / (30000 / 1001), 29.97, "00:01:00;02"),  # frames 00 and 01 of minute 1 are dropped
        (17982 / (30000 / 1001), 29.97, "00:10:00;00"),  # each tenth minute keeps them
        (1799 / (30000 / 1001), 29.97, "00:00:59;29"),
        (3600 / (60000 / 1001), 59.94, "00:01:00;04"),
    ],
)
def test_smpte_timecodes(seconds, fps, expected):
    assert exports.timecode(seconds, fps) == expected


def test_edit_list_has_an_event_per_segment_with_its_timecodes(dataset):  # noqa: F811
    labels, _ = dataset
    segs = query.segments(labels, episodes=["s02e01"])
    text = exports.edit_list(segs, fps=25)
    events = re.findall(r"^(\d{3})  AX       V     C        (\S+) (\S+) (\S+) (\S+)$", text, flags=re.M)
    assert len(events) == len(segs)
    ordered = segs.sort_values(["start_s", "character"], kind="stable")
    for (number, src_in, src_out, rec_in, rec_out), row in zip(events, ordered.itertuples()):
        frames_in = int(np.floor(row.start_s * 25 + 1e-6))
        assert src_in == rec_in == f"00:{frames_in // 1500:02d}:{frames_in // 25 % 60:02d}:{frames_in % 25:02d}"
        assert src_out == rec_out
    assert text.startswith("TITLE: s02e01\nFCM: NON-DROP FRAME")
    assert text.count("* COMMENT:") == len(segs)


def test_cli_csv_gains_timecode_columns(dataset, capsys):  # noqa: F811
    labels, _ = dataset
    assert cli.main(["query", "segments", "--labels", labels, "--episode", "s01e01", "--format", "csv", "--timecode-fps", "24"]) == 0
    table = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert {"start_tc", "end_tc", "duration_tc"} <= set(table.columns)
    first = table.iloc[0]
    frames_in = int(np.floor(first["start_s"] * 24 + 1e-6))
    assert first["start_tc"] == f"00:{frames_in // 1440:02d}:{frames_in // 24 % 60:02d}:{frames_in % 24:02d}"


# ------------------------------------------------------------------------ query at
def test_at_returns_the_frame_on_screen_and_its_character(dataset, capsys):  # noqa: F811
    labels, rows = dataset
    episode = rows[(rows["episode"] == "s01e01") & rows["label"].notna()].iloc[40]
    interval = 5 / 24
    # Anywhere inside the frame's interval shows that frame, as a player would.
    for offset in (0.0, interval / 2, interval * 0.99):
        result = query.at(labels, "s01e01", episode["timestamp_s"] + offset)
        assert result["frame"].tolist() == [episode["frame"]]
        assert result["character"].tolist() == [episode["label"]]
        assert result["confidence"].iloc[0] == pytest.approx(episode["confidence"])
        assert result["source"].iloc[0] == episode["source"]
    minutes, seconds = divmod(episode["timestamp_s"] + interval / 2, 60)
    assert cli.main(["query", "at", "--labels", labels, "--episode", "s01e01", "--time", f"{int(minutes)}:{seconds:06.3f}", "--format", "csv"]) == 0
    assert episode["label"] in capsys.readouterr().out
    # Nobody labelled: one row with no character.
    nobody = rows[(rows["episode"] == "s01e01") & rows["label"].isna()].iloc[0]
    result = query.at(labels, "s01e01", nobody["timestamp_s"])
    assert result["character"].isna().all() and result["frame"].tolist() == [nobody["frame"]]


def test_at_by_frame_and_its_errors(dataset, capsys):  # noqa: F811
    labels, rows = dataset
    untimed = rows[rows["episode"] == "s01e03"].iloc[7]
    assert query.at(labels, "s01e03", frame=int(untimed["frame"]))["frame"].tolist() == [untimed["frame"]]
    with pytest.raises(UserError, match="no timestamps"):
        query.at(labels, "s01e03", 3.0)
    with pytest.raises(UserError, match="outside episode s01e01"):
        query.at(labels, "s01e01", 10_000.0)
    for bad in ("12:75", "abc", "-3", "1:2:3:4"):
        with pytest.raises(UserError, match="is not a time"):
            query.parse_time(bad)
    assert query.parse_time("1:02:03.5") == pytest.approx(3723.5)
    assert cli.main(["query", "at", "--labels", labels, "--time", "3"]) == 2
    assert "exactly one --episode" in capsys.readouterr().err
