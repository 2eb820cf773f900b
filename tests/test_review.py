"""The review loop on a labels output the tests write themselves: picks, the two export formats, and reviews read back.

The labels are written as the labeling job writes them (episode=<id>/*.parquet in
the full schema, shots included) for a multi-label model of four characters with
thresholds of their own, over three episodes whose frames lie in files, in a tar
archive and in a video. The model artifacts are config.json and classes.json with
stand-in weights: an export reads a model's classes, objective and thresholds,
never its weights. Label Studio's side is played by JSON in the shape of its
Export -> JSON (tasks with their data as imported and an ``annotations`` list), and,
in the last test (slow tier), by a real Label Studio (tests/labelstudio_server.py):
the export goes in through its API, two reviewers answer, and its own JSON export
comes back into a training set.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imagegen import class_image, encode, upload_tree, write_tar, write_video
from labelstudio_server import ADMIN, REVIEWER
from simpsons_ray import cli
from simpsons_ray.core.errors import UserError
from simpsons_ray.labels import schema
from simpsons_ray.media.sources import frame_source
from simpsons_ray.model.artifact import save_artifact
from simpsons_ray.model.preprocess import PreprocessConfig
from simpsons_ray.query.reading import open_labels
from simpsons_ray.review import ExportConfig, ImportConfig, run_export, run_import
from simpsons_ray.review.candidates import pick_frames
from simpsons_ray.review.export import model_decision
from simpsons_ray.review.picks import Decision, Pick, uncertainty

CLASSES = ["bart", "homer", "lisa", "marge"]
THRESHOLDS = [0.5, 0.3, 0.6, 0.5]
# episode -> (frames, frames per shot, where the pictures lie); two frames a second
EPISODES = {"s01e01": (12, 4, "files"), "s01e02": (8, 4, "tar"), "s01e03": (6, 2, "video")}
FPS = 2.0
SHOTS = sum(math.ceil(n / per) for n, per, _ in EPISODES.values())
FRAMES = sum(n for n, _, _ in EPISODES.values())


# ----------------------------------------------------------------------------- fixtures
def _answer(labels: list[str], scores: list[float]) -> tuple[list[str], list[float]]:
    on = [(s, c) for c, s in zip(labels, scores) if s >= THRESHOLDS[CLASSES.index(c)]]
    on.sort(reverse=True)
    return [c for _, c in on], [s for s, _ in on]


def _episode_rows(episode: str, index: int, frames_root: str, model_id: str) -> pd.DataFrame:
    count, per_shot, kind = EPISODES[episode]
    rng = np.random.default_rng(10 + index)
    frame = np.arange(count, dtype=np.int64)
    rows = []
    for f in frame:
        top = [CLASSES[k] for k in rng.choice(len(CLASSES), 2, replace=False)]
        scores = sorted(rng.uniform(0.05, 0.95, 2).round(3).tolist(), reverse=True)
        characters, character_scores = _answer(top, scores)
        if kind == "files":
            source = os.path.join(frames_root, episode, f"{f:04d}.jpg")
        elif kind == "tar":
            source = os.path.join(frames_root, f"{episode}.tar") + f"#./frames/{f:04d}.jpg"
        else:
            source = frame_source(os.path.join(frames_root, f"{episode}.mp4"), f / FPS)
        rows.append({
            "episode": episode, "frame": int(f), "timestamp_s": f / FPS, "source": source,
            "label": top[0] if scores[0] >= THRESHOLDS[CLASSES.index(top[0])] else None, "confidence": scores[0],
            "top_labels": top, "top_scores": scores, "model_id": model_id, "shot": int(f // per_shot),
            "frame_characters": characters, "frame_character_scores": character_scores,
        })
    # The episode's answer, pooled over each shot: here, as a stand-in, the answer of the shot's first frame. A review
    # shows each frame's own answer.
    table = pd.DataFrame(rows)
    first = table.groupby("shot")[["frame_characters", "frame_character_scores"]].transform("first")
    return table.assign(characters=first["frame_characters"], character_scores=first["frame_character_scores"])


def write_labels(root: str, rows: pd.DataFrame) -> None:
    for episode, group in rows.groupby("episode"):
        os.makedirs(os.path.join(root, f"episode={episode}"), exist_ok=True)
        table = pa.Table.from_pandas(group[schema.WRITTEN_FILE_SCHEMA.names], schema=schema.WRITTEN_FILE_SCHEMA, preserve_index=False)
        pq.write_table(table, os.path.join(root, f"episode={episode}", "part-0.parquet"))


def write_pictures(frames_root: str, rows: pd.DataFrame) -> None:
    rng = np.random.default_rng(3)
    for episode, group in rows.groupby("episode"):
        kind = EPISODES[episode][2]
        pictures = [class_image(CLASSES.index(t[0]), rng, size=64) for t in group["top_labels"]]
        if kind == "files":
            os.makedirs(os.path.join(frames_root, episode), exist_ok=True)
            for f, picture in zip(group["frame"], pictures):
                picture.save(os.path.join(frames_root, episode, f"{f:04d}.jpg"), quality=92)
        elif kind == "tar":
            write_tar(os.path.join(frames_root, f"{episode}.tar"), {f"./frames/{f:04d}.jpg": encode(p) for f, p in zip(group["frame"], pictures)})
        else:
            write_video(os.path.join(frames_root, f"{episode}.mp4"), pictures, fps=int(FPS), size=(96, 64))


def write_model(path: str, multilabel: bool = True) -> str:
    """A model artifact with stand-in weights; its id, as save_artifact returns it."""
    inference = {"objective": "multilabel", "thresholds": THRESHOLDS} if multilabel else {}
    return save_artifact(path, b"stand-in weights", "resnet18", CLASSES, PreprocessConfig(image_size=32), inference=inference)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """(labels URI, multi-label model URI, single-label model URI, the rows written)."""
    root = tmp_path_factory.mktemp("review")
    frames_root, labels_root = str(root / "frames"), str(root / "labels")
    model_id = write_model(str(root / "multi"))
    write_model(str(root / "single"), multilabel=False)
    rows = pd.concat([_episode_rows(e, i, frames_root, model_id) for i, e in enumerate(EPISODES)], ignore_index=True)
    write_labels(labels_root, rows)
    write_pictures(frames_root, rows)
    return labels_root, str(root / "multi"), str(root / "single"), rows


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def expected_key(row, multilabel: bool = True) -> float:
    """The distance from the decision, computed the plain way."""
    if multilabel:
        return min(abs(logit(s) - logit(THRESHOLDS[CLASSES.index(c)])) for c, s in zip(row["top_labels"], row["top_scores"]))
    return row["top_scores"][0] - row["top_scores"][1]


def export(tmp_path, labelled, name="export", **kwargs) -> str:
    labels, model, _, _ = labelled
    out = str(tmp_path / name)
    run_export(ExportConfig(labels_uri=labels, model_uri=kwargs.pop("model", model), output_uri=out, **kwargs), stdout=io.StringIO())
    return out


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def files_under(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs) if os.path.exists(root) else []


def task_rows(tasks: list[dict], rows: pd.DataFrame) -> list[pd.Series]:
    """The labels row behind each task, in the tasks' order."""
    by_frame = {(r["episode"], r["frame"]): r for _, r in rows.iterrows()}
    return [by_frame[(t["data"]["episode"], t["data"]["frame"])] for t in tasks]


# ----------------------------------------------------------------------------- the picks
def test_multilabel_uncertainty_is_the_smallest_logit_distance_from_each_characters_own_threshold():
    decision = Decision(tuple(CLASSES), True, tuple(THRESHOLDS))
    table = pa.table({
        "top_labels": [["homer", "bart"], ["bart", "lisa"], ["marge"], ["bart"], ["lisa", "homer"], None, ["homer"]],
        "top_scores": [[0.35, 0.1], [0.9, 0.58], [0.99], [0.5], [0.9, 0.02], None, [0.05]],
    }, schema=pa.schema([schema.READ_SCHEMA.field("top_labels"), schema.READ_SCHEMA.field("top_scores")]))
    key = uncertainty(table, decision)
    # Row 0: homer's 0.35 against its own 0.3, not bart's 0.5; row 1: lisa's 0.58 against 0.6 (bart's 0.9 is far from 0.5).
    expected = [abs(logit(0.35) - logit(0.3)), abs(logit(0.58) - logit(0.6)), abs(logit(0.99) - logit(0.5)), 0.0,
                abs(logit(0.9) - logit(0.6)), math.inf, abs(logit(0.05) - logit(0.3))]
    assert key == pytest.approx(expected, rel=1e-5)
    assert list(np.argsort(key, kind="stable")) == [3, 1, 0, 4, 6, 2, 5]
    # Logits, not probabilities: homer's 0.05 is 0.25 from its 0.3 and lisa's 0.9 is 0.3 from her 0.6, yet lisa's is the closer call.
    assert key[4] < key[6]


def test_softmax_uncertainty_is_the_margin_between_the_top_two():
    decision = Decision(tuple(CLASSES), False)
    table = pa.table({"top_labels": [["bart", "homer"], ["lisa", "bart", "homer"], ["marge"]],
                      "top_scores": [[0.5, 0.45], [0.9, 0.05, 0.05], [0.6]]})
    assert uncertainty(table, decision) == pytest.approx([0.05, 0.85, 0.6], rel=1e-5)


def test_uncertain_picks_give_every_shot_one_frame_round_robin_over_episodes_before_any_shot_a_second(tmp_path, labelled):
    rows = labelled[3]
    out = export(tmp_path, labelled, limit=SHOTS + 4, min_gap_s=0)
    picked = task_rows(read_json(os.path.join(out, "tasks.json")), rows)
    assert len(picked) == SHOTS + 4
    # The plain way: each shot's nearest-to-the-decision frame; episodes, hardest first, take turns.
    keyed = rows.assign(key=[expected_key(r) for _, r in rows.iterrows()]).sort_values(["key", "frame"])
    best = keyed.groupby(["episode", "shot"], sort=False).head(1)
    turns = best.groupby("episode", sort=False)
    episode_order = list(dict.fromkeys(best["episode"]))
    expected = []
    for r in range(max(len(g) for _, g in turns)):
        expected += [(e, int(turns.get_group(e)["frame"].iloc[r])) for e in episode_order if r < len(turns.get_group(e))]
    assert [(p["episode"], int(p["frame"])) for p in picked[:SHOTS]] == expected
    assert len({(p["episode"], p["shot"]) for p in picked[:SHOTS]}) == SHOTS
    # Then the second frames of shots, each its shot's second nearest.
    second = keyed.groupby(["episode", "shot"], sort=False).nth(1)
    seconds = {(e, int(f)) for e, f in zip(second["episode"], second["frame"])}
    assert all((p["episode"], int(p["frame"])) in seconds for p in picked[SHOTS:])


def test_softmax_picks_rank_by_margin(labelled):
    labels, _, single, rows = labelled
    decision, _ = model_decision(single)
    picked = pick_frames(open_labels(labels), decision, Pick("uncertain"), limit=SHOTS, min_gap_s=0)
    keys = {(r["episode"], r["frame"]): expected_key(r, multilabel=False) for _, r in rows.iterrows()}
    for episode, group in picked.groupby("episode", sort=False):
        ranked = [keys[(episode, f)] for f in group["frame"]]
        assert ranked == sorted(ranked)  # within an episode's first round, nearest the decision first
        shots = rows[rows["episode"] == episode].groupby("shot")
        for f, shot in zip(group["frame"], group["shot"]):
            assert keys[(episode, f)] == min(keys[(episode, g)] for g in shots.get_group(shot)["frame"])


def test_min_gap_keeps_picked_frames_of_an_episode_apart(labelled):
    labels, model, _, rows = labelled
    decision, _ = model_decision(model)
    every = pick_frames(open_labels(labels), decision, Pick("uncertain"), limit=FRAMES, min_gap_s=0)
    assert len(every) == FRAMES and not every.duplicated(["episode", "frame"]).any()
    apart = pick_frames(open_labels(labels), decision, Pick("uncertain"), limit=FRAMES, min_gap_s=1.2)
    assert 0 < len(apart) < FRAMES
    for _, group in apart.groupby("episode"):
        assert np.diff(np.sort(group["timestamp_s"].to_numpy())).min() >= 1.2


def test_random_picks_are_uniform_and_the_same_for_the_same_seed(labelled):
    labels, model, _, rows = labelled
    decision, _ = model_decision(model)
    dataset = open_labels(labels)

    def frames(seed, limit=10):
        picked = pick_frames(dataset, decision, Pick("random"), limit=limit, seed=seed, min_gap_s=0)
        return list(zip(picked["episode"], picked["frame"]))

    assert frames(1) == frames(1)
    assert frames(1) != frames(2)
    assert len(set(frames(1))) == 10
    assert sorted(frames(5, limit=FRAMES)) == sorted(zip(rows["episode"], rows["frame"]))
    # Uniform: over many seeds every frame comes up about as often (10 of 26 each time: 15 in 40 seeds, give or take 3).
    counts = pd.Series([f for seed in range(40) for f in frames(seed)]).value_counts()
    assert len(counts) == FRAMES and counts.min() >= 7 and counts.max() <= 24, counts.to_dict()


def test_character_picks_take_that_characters_weakest_frames_and_an_unknown_name_gets_suggestions(labelled):
    labels, model, _, rows = labelled
    decision, _ = model_decision(model)
    dataset = open_labels(labels)
    picked = pick_frames(dataset, decision, Pick.parse("character:homer"), limit=FRAMES, min_gap_s=0)
    named = rows[[("homer" in c) for c in rows["characters"]]]
    assert sorted(zip(picked["episode"], picked["frame"])) == sorted(zip(named["episode"], named["frame"]))
    assert all("homer" in a for a in picked["answer"])
    homer = {(r["episode"], r["frame"]): r["character_scores"][list(r["characters"]).index("homer")] for _, r in named.iterrows()}
    assert picked["score"].tolist() == pytest.approx([homer[k] for k in zip(picked["episode"], picked["frame"])])
    first_round = picked[picked["level"] == 0]
    for _, group in first_round.groupby("episode"):
        assert group["score"].is_monotonic_increasing and not group.duplicated("shot").any()
    with pytest.raises(UserError, match=r"No character 'homr' .*closest known names: homer"):
        pick_frames(dataset, decision, Pick.parse("character:homr"), limit=5)
    with pytest.raises(UserError, match=r"Unknown --pick 'best': use uncertain, random or character:NAME\."):
        Pick.parse("best")


# ----------------------------------------------------------------------------- the exports
def test_labelstudio_export_writes_decodable_pictures_tasks_a_labeling_config_and_a_manifest(tmp_path, labelled):
    labels, model, _, rows = labelled
    out = export(tmp_path, labelled, limit=FRAMES, min_gap_s=0)
    tasks = read_json(os.path.join(out, "tasks.json"))
    manifest = read_json(os.path.join(out, "export.json"))
    assert len(tasks) == FRAMES and manifest["frames"] == FRAMES and manifest["unreadable"] == []
    assert files_under(out) == sorted(["tasks.json", "labeling_config.xml", "export.json"]
                                      + [f"images/{e}-{f}.jpg" for e, f in zip(rows["episode"], rows["frame"])])
    for t, row in zip(tasks, task_rows(tasks, rows)):
        data = t["data"]
        name = f"{row['episode']}-{row['frame']}.jpg"
        assert data == {"image": f"/data/local-files/?d=images/{name}", "source": row["source"], "episode": row["episode"],
                        "frame": row["frame"], "timestamp_s": row["timestamp_s"], "export_id": manifest["export_id"]}
        [prediction] = t["predictions"]
        assert prediction["model_version"] == row["model_id"] and prediction["score"] == pytest.approx(row["confidence"], abs=1e-6)
        assert prediction["result"] == [{"from_name": "characters", "to_name": "image", "type": "choices",
                                         "value": {"choices": list(row["frame_characters"]) or ["nobody"]}}]
        with Image.open(os.path.join(out, "images", name)) as picture:
            picture.load()  # decodes whole
            assert picture.format == "JPEG"
            assert picture.size == ((96, 64) if EPISODES[row["episode"]][2] == "video" else (64, 64))
    view = ET.parse(os.path.join(out, "labeling_config.xml")).getroot()
    assert view.tag == "View" and view.find("Image").attrib["name"] == "image" and view.find("Image").attrib["value"] == "$image"
    choices = view.find("Choices")
    assert {k: choices.attrib[k] for k in ("name", "toName", "choice")} == {"name": "characters", "toName": "image", "choice": "multiple"}
    assert [c.attrib["value"] for c in choices.findall("Choice")] == CLASSES + ["nobody"]
    boxes = view.find("RectangleLabels")
    assert boxes.attrib == {"name": "boxes", "toName": "image"} and [b.attrib["value"] for b in boxes.findall("Label")] == CLASSES
    assert {k: manifest[k] for k in ("format", "classes", "pick", "limit", "objective", "model_id")} == {
        "format": "labelstudio", "classes": CLASSES, "pick": "uncertain", "limit": FRAMES, "objective": "multilabel",
        "model_id": rows["model_id"][0]}
    assert manifest["labels_uri"] == labels and manifest["created"]
    prefixed = export(tmp_path, labelled, name="prefixed", limit=2, image_url_prefix="http://127.0.0.1:8081/review")
    assert all(t["data"]["image"].startswith("http://127.0.0.1:8081/review/images/") for t in read_json(os.path.join(prefixed, "tasks.json")))


def _labels_with_sources(tmp_path, rows: pd.DataFrame, replace) -> str:
    changed = rows.assign(source=[replace(i, s) for i, s in enumerate(rows["source"])])
    root = str(tmp_path / "labels-moved")
    write_labels(root, changed)
    return root


def test_a_frame_whose_source_is_gone_is_reported_and_left_out(tmp_path, labelled, caplog):
    _, model, _, rows = labelled
    (tmp_path / "corrupt.jpg").write_bytes(b"not a picture")
    gone = {3: str(tmp_path / "gone" / "a.jpg"), 20: str(tmp_path / "gone" / "b.mp4") + "#t=1", 7: str(tmp_path / "corrupt.jpg")}
    labels = _labels_with_sources(tmp_path, rows, lambda i, s: gone.get(i, s))
    out = str(tmp_path / "export")
    with caplog.at_level(logging.WARNING):
        result = run_export(ExportConfig(labels, model, out, limit=FRAMES, min_gap_s=0), stdout=io.StringIO())
    assert len(result.frames) == FRAMES - 3 and sorted(result.unreadable) == sorted(gone.values())
    assert "3 of 26 picked frames could not be read and were left out" in caplog.text and all(g in caplog.text for g in gone.values())
    assert sorted(read_json(os.path.join(out, "export.json"))["unreadable"]) == sorted(gone.values())
    assert len(read_json(os.path.join(out, "tasks.json"))) == FRAMES - 3 and len(os.listdir(os.path.join(out, "images"))) == FRAMES - 3


def test_when_no_picked_frame_can_be_read_nothing_is_written(tmp_path, labelled):
    _, model, _, rows = labelled
    labels = _labels_with_sources(tmp_path, rows, lambda i, s: str(tmp_path / "gone" / f"{i}.jpg"))
    out = str(tmp_path / "export")
    with pytest.raises(UserError, match=r"^None of the 5 picked frames could be read from its source \(cannot read .*gone.*\): "
                                        r"nothing was written to .*export; check that the labels' sources are still there\.$"):
        run_export(ExportConfig(labels, model, out, limit=5), stdout=io.StringIO())
    assert not os.path.exists(out)


def test_an_export_refuses_a_folder_with_files_unless_it_replaces_an_earlier_export(tmp_path, labelled):
    labels, model, _, _ = labelled
    out = export(tmp_path, labelled, limit=3)
    first = read_json(os.path.join(out, "export.json"))["export_id"]
    with pytest.raises(UserError, match=r"already holds files: pass --overwrite to replace an earlier review export, or choose an empty folder\.$"):
        export(tmp_path, labelled, limit=3)
    export(tmp_path, labelled, limit=2, format="folders", overwrite=True)
    assert read_json(os.path.join(out, "export.json"))["export_id"] != first and not os.path.exists(os.path.join(out, "tasks.json"))
    someone = tmp_path / "someone"
    someone.mkdir()
    (someone / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match=r"holds files that are not an earlier review export \(no export\.json\)"):
        run_export(ExportConfig(labels, model, str(someone), limit=2, overwrite=True), stdout=io.StringIO())
    assert files_under(someone) == ["thesis.tex"]


def test_an_export_refuses_a_model_folder_that_is_not_a_model(tmp_path, labelled):
    labels, _, _, _ = labelled
    out = str(tmp_path / "export")
    with pytest.raises(UserError, match=r"is not a simpsons-ray model \(no config\.json, classes\.json, model\.pt\): point --model at "
                                        r"the --output directory of `simpsons-ray train`\.$"):
        run_export(ExportConfig(labels, labels, out), stdout=io.StringIO())
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------- Label Studio, back
def ls_box(label, x, y, width, height, rotation=0.0):
    """A rectangle as Label Studio's JSON export gives it: percent of the picture."""
    return {"original_width": 64, "original_height": 64, "image_rotation": 0, "id": f"box-{label}-{x}", "from_name": "boxes",
            "to_name": "image", "type": "rectanglelabels", "origin": "manual",
            "value": {"x": x, "y": y, "width": width, "height": height, "rotation": rotation, "rectanglelabels": [label]}}


def ls_annotation(choices=None, boxes=(), cancelled=False, who=1):
    result = list(boxes)
    if choices is not None:
        result.insert(0, {"id": "c", "from_name": "characters", "to_name": "image", "type": "choices", "origin": "manual",
                          "value": {"choices": choices}})
    return {"id": 1, "completed_by": who, "result": result, "was_cancelled": cancelled, "ground_truth": False,
            "created_at": "2026-12-08T10:00:00.000000Z", "updated_at": "2026-12-08T10:00:00.000000Z", "lead_time": 4.2,
            "prediction": {}, "result_count": 0, "task": 1, "project": 1, "parent_prediction": 1, "parent_annotation": None}


def ls_export(tasks: list[dict], annotations: dict[int, list[dict]]) -> list[dict]:
    """Label Studio's Export -> JSON of the imported ``tasks``: the ones in ``annotations``, with those annotations."""
    out = []
    for i, reviews in annotations.items():
        out.append({"id": 100 + i, "annotations": reviews, "file_upload": "tasks.json", "drafts": [], "predictions": [7],
                    "data": copy.deepcopy(tasks[i]["data"]), "meta": {}, "created_at": "2026-12-08T09:00:00Z",
                    "updated_at": "2026-12-08T10:00:00Z", "inner_id": i + 1, "total_annotations": len(reviews),
                    "cancelled_annotations": sum(r["was_cancelled"] for r in reviews), "total_predictions": 1,
                    "comment_count": 0, "unresolved_comment_count": 0, "last_comment_updated_at": None, "project": 1,
                    "updated_by": 1, "comment_authors": []})
    return out


def write_json(path, value) -> str:
    with open(path, "w") as f:
        json.dump(value, f)
    return str(path)


@pytest.fixture
def reviewed(tmp_path, labelled):
    """(export folder, its tasks, the annotations file) of an export of 12 frames, ten of them in Label Studio's JSON."""
    out = export(tmp_path, labelled, limit=12, min_gap_s=0)
    tasks = read_json(os.path.join(out, "tasks.json"))
    annotations = {
        0: [ls_annotation(["homer"])],
        1: [ls_annotation(["bart", "lisa"], [ls_box("bart", 25, 50, 50, 25), ls_box("lisa", 0, 0, 10, 10), ls_box("lisa", 0, 0, 50, 100)])],
        2: [ls_annotation(["nobody"])],
        3: [ls_annotation(cancelled=True, choices=[])],
        4: [],
        5: [ls_annotation(["homer"], who=1), ls_annotation(["marge"], who=2)],
        6: [ls_annotation(["maggie"])],
        7: [ls_annotation(["marge", "homer"])],
        8: [ls_annotation(["lisa"], who={"id": 1, "email": "a@example.com"}), ls_annotation(["lisa"], who={"id": 2, "email": "b@example.com"}),
            ls_annotation(cancelled=True, who=3)],
        9: [ls_annotation([], [ls_box("bart", 50, 10, 20, 40, rotation=90)])],
    }
    return out, tasks, write_json(tmp_path / "project-1-at-2026-12-08.json", ls_export(tasks, annotations))


def _size(path) -> tuple[int, int]:
    with Image.open(path) as picture:
        return picture.size


def test_label_studio_reviews_become_a_training_set_that_train_reads(tmp_path, reviewed):
    from simpsons_ray.train.compose import read_boxes
    from simpsons_ray.train.datasets import NOBODY, list_labelled_images, list_root_images

    out, tasks, annotations = reviewed
    data = str(tmp_path / "data")
    stdout = io.StringIO()
    result = run_import(ImportConfig(out, data, annotations), stdout=stdout)
    name = [t["data"]["image"].rsplit("/", 1)[-1] for t in tasks]
    assert files_under(data) == sorted([f"homer/{name[0]}", f"bart/{name[1]}", f"lisa/{name[1]}", f"_nobody/{name[2]}",
                                        f"marge/{name[7]}", f"lisa/{name[8]}", f"bart/{name[9]}",
                                        "annotation.csv", "review.csv", "skipped.csv"])
    with open(os.path.join(out, "images", name[0]), "rb") as a, open(os.path.join(data, "homer", name[0]), "rb") as b:
        assert a.read() == b.read()
    # Boxes in pixels of the picture: percent of its width and height; lisa's larger box; bart's turned a quarter clockwise.
    (w1, h1), (w9, h9) = _size(os.path.join(out, "images", name[1])), _size(os.path.join(out, "images", name[9]))
    boxes = pd.read_csv(os.path.join(data, "annotation.csv"))
    assert boxes.columns.tolist() == ["path", "x1", "y1", "x2", "y2", "character"]
    assert sorted(boxes.itertuples(index=False, name=None)) == sorted([
        (f"bart/{name[1]}", round(0.25 * w1), round(0.5 * h1), round(0.75 * w1), round(0.75 * h1), "bart"),
        (f"lisa/{name[1]}", 0, 0, round(0.5 * w1), h1, "lisa"),
        (f"bart/{name[9]}", round(0.5 * w9 - 0.4 * h9), round(0.1 * h9), round(0.5 * w9), round(0.1 * h9 + 0.2 * w9), "bart"),
    ])
    review = pd.read_csv(os.path.join(data, "review.csv"), dtype=str).set_index("file")
    assert review.loc[f"marge/{name[7]}", "characters"] == "marge;homer"
    assert review.loc[f"lisa/{name[8]}", "reviewer"] == "a@example.com;b@example.com"
    assert review.loc[f"_nobody/{name[2]}", "characters"] == "nobody"
    assert set(review["export_id"]) == {tasks[0]["data"]["export_id"]}
    assert review.loc[f"homer/{name[0]}", ["source", "episode", "frame"]].tolist() == [tasks[0]["data"]["source"], tasks[0]["data"]["episode"],
                                                                                       str(tasks[0]["data"]["frame"])]
    skipped = pd.read_csv(os.path.join(data, "skipped.csv")).set_index("file")["reason"]
    assert skipped.to_dict() == {f"images/{name[3]}": "skipped by the reviewer", f"images/{name[4]}": "not reviewed",
                                 f"images/{name[5]}": "conflicting reviews", f"images/{name[6]}": "choices not in the export: maggie",
                                 f"images/{name[10]}": "not reviewed (not in Label Studio's export)",
                                 f"images/{name[11]}": "not reviewed (not in Label Studio's export)"}
    assert len(result.reviews) == 6 and result.boxes == 3
    assert "imported 6 reviewed frames" in stdout.getvalue() and "left out 6 (see skipped.csv): 2 not reviewed (not in Label Studio's export)" in stdout.getvalue()
    # What training makes of it: one class per character folder, the nobody frame as one, the boxes matched to their pictures.
    assert sorted(list_labelled_images(data)["label"].unique()) == ["bart", "homer", "lisa", "marge"]
    assert list_root_images(data)["label"].tolist().count(NOBODY) == 1
    assert sorted(read_boxes(os.path.join(data, "annotation.csv"))["key"]) == sorted(boxes["path"])


@pytest.mark.parametrize("break_it, sentence", [
    (lambda ls: ls[0]["data"].update(export_id="0" * 32), r"holds tasks of another export \(export_id '0{32}', not '[0-9a-f]{32}' of .*\): "
                                                          r"import it with the export it came from\.$"),
    (lambda ls: ls[0]["annotations"][0]["result"][0].update(from_name="sentiment"),
     r"holds choices results from 'sentiment' to 'image', which this export's labeling config does not have: it is another project's export"),
    (lambda ls: ls.clear(), r"holds no tasks: import tasks\.json into Label Studio, review, then export again\.$"),
    (lambda ls: [t.update(annotations=[]) for t in ls], r"^None of the 12 frames of .* has a clear review \(10 not reviewed, 2 not reviewed \(not in "
                                                        r"Label Studio's export\)\): nothing was written; review them, then import again\.$"),
    (lambda ls: [t.pop("annotations") for t in ls], r"has tasks without an annotations list: give the file Label Studio's Export -> JSON wrote"),
], ids=["another-export", "another-project", "no-tasks", "nothing-reviewed", "not-a-json-export"])
def test_a_label_studio_export_that_is_not_this_exports_is_one_sentence_and_writes_nothing(tmp_path, reviewed, break_it, sentence):
    out, _, annotations = reviewed
    broken = read_json(annotations)
    break_it(broken)
    data = str(tmp_path / "data")
    with pytest.raises(UserError, match=sentence):
        run_import(ImportConfig(out, data, write_json(annotations, broken)), stdout=io.StringIO())
    assert not os.path.exists(data)


def test_reviewed_pictures_that_are_gone_are_one_sentence_and_write_nothing(tmp_path, reviewed):
    out, tasks, annotations = reviewed
    gone = tasks[7]["data"]["image"].rsplit("/", 1)[-1]
    os.remove(os.path.join(out, "images", gone))
    data = str(tmp_path / "data")
    with pytest.raises(UserError, match=rf"^1 reviewed pictures no longer exist in .* or are not pictures \(images/{gone}\): put the export back"):
        run_import(ImportConfig(out, data, annotations), stdout=io.StringIO())
    assert not os.path.exists(data)
    with pytest.raises(UserError, match=r"is a Label Studio export: add --annotations FILE"):
        run_import(ImportConfig(out, data), stdout=io.StringIO())
    with pytest.raises(UserError, match=r"is not a review export \(it has no export\.json\): pass the --output of `simpsons-ray review export`"):
        run_import(ImportConfig(str(tmp_path), data, annotations), stdout=io.StringIO())
    assert not os.path.exists(data)


# ----------------------------------------------------------------------------- folders, there and back
def test_folders_export_files_each_frame_under_the_models_answer_and_moving_pictures_changes_the_labels(tmp_path, labelled):
    rows = labelled[3]
    out = export(tmp_path, labelled, limit=FRAMES, min_gap_s=0, format="folders")
    frames = pd.read_csv(os.path.join(out, "frames.csv"), dtype={"answer": str})
    assert frames.columns.tolist() == ["file", "source", "episode", "frame", "timestamp_s", "answer", "score", "model_id"]
    by_frame = {(r["episode"], r["frame"]): r for _, r in rows.iterrows()}
    for f in frames.itertuples():
        row = by_frame[(f.episode, f.frame)]
        own = row["frame_characters"]  # the frame's own answer, not its shot's
        assert f.file == f"{own[0] if len(own) else 'nobody'}/{f.episode}-{f.frame}.jpg"
        assert f.answer == (";".join(own) or "nobody") and os.path.isfile(os.path.join(out, f.file))
    people = frames[frames["answer"] != "nobody"]["file"].tolist()
    nobody = frames[frames["answer"] == "nobody"]["file"].tolist()

    def move(file, folder, keep=False):
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        target = os.path.join(out, folder, os.path.basename(file))
        (shutil.copy if keep else shutil.move)(os.path.join(out, file), target)
        return f"{folder}/{os.path.basename(file)}"

    other = lambda file: "lisa" if not file.startswith("lisa/") else "bart"  # noqa: E731
    corrected = move(people[0], other(people[0]))
    emptied = move(people[1], "nobody")
    two = move(people[2], other(people[2]), keep=True)
    os.remove(os.path.join(out, people[3]))
    move(people[4], "nobody", keep=True)
    found = move(nobody[0], "homer")
    data = str(tmp_path / "data")
    stdout = io.StringIO()
    run_import(ImportConfig(out, data), stdout=stdout)
    review = pd.read_csv(os.path.join(data, "review.csv"), dtype=str).set_index("file")
    assert review.loc[corrected, "characters"] == corrected.split("/")[0] and review.loc[corrected, "changed"] == "True"
    assert review.loc[f"_nobody/{os.path.basename(emptied)}", "characters"] == "nobody"
    assert review.loc[people[2], "characters"] == f"{people[2].split('/')[0]};{two.split('/')[0]}"  # under its first character only
    assert not os.path.exists(os.path.join(data, two)) and review.loc[found, "characters"] == "homer"
    unchanged = people[5:] + nobody[1:]
    assert all(os.path.isfile(os.path.join(data, f.replace("nobody/", "_nobody/"))) for f in unchanged)
    assert (review.loc[[f.replace("nobody/", "_nobody/") for f in unchanged], "changed"] == "False").all()
    skipped = pd.read_csv(os.path.join(data, "skipped.csv")).set_index("file")["reason"].to_dict()
    assert skipped == {people[3]: "removed from the folders", people[4]: "nobody and characters in one review"}
    assert f"imported {FRAMES - 2} reviewed frames" in stdout.getvalue()
    assert pd.read_csv(os.path.join(data, "annotation.csv")).empty


def test_a_folder_that_is_no_character_of_the_export_is_one_sentence_and_writes_nothing(tmp_path, labelled):
    out = export(tmp_path, labelled, limit=4, format="folders")
    first = pd.read_csv(os.path.join(out, "frames.csv"))["file"][0]
    os.makedirs(os.path.join(out, "maggie"))
    shutil.move(os.path.join(out, first), os.path.join(out, "maggie", os.path.basename(first)))
    data = str(tmp_path / "data")
    with pytest.raises(UserError, match=r"^Folder 'maggie' in .* is not a character of the export; closest known names: marge: "
                                        r"move its pictures into the folder of a character the model knows, or into nobody\.$"):
        run_import(ImportConfig(out, data), stdout=io.StringIO())
    assert not os.path.exists(data)
    with pytest.raises(UserError, match=r"is a folders export: its folders are the reviews; leave out --annotations\.$"):
        run_import(ImportConfig(out, data, annotations_uri=os.path.join(out, "frames.csv")), stdout=io.StringIO())


# ----------------------------------------------------------------------------- the command, and S3
def test_the_review_command_exports_and_imports_and_says_what_is_wrong_in_one_sentence(tmp_path, labelled, capsys):
    labels, model, _, _ = labelled
    out, data = str(tmp_path / "export"), str(tmp_path / "data")
    assert cli.main(["review", "export", "--labels", labels, "--model", model, "--output", out, "--limit", "5",
                     "--format", "folders", "--min-gap-s", "0", "--seed", "3"]) == 0
    assert cli.main(["review", "import", "--from", out, "--output", data]) == 0
    said = capsys.readouterr().out
    assert "exported 5 frames of 3 episodes (uncertain picks, 5 shots) as folders" in said and "imported 5 reviewed frames" in said
    assert cli.main(["review", "export", "--labels", labels, "--model", model, "--output", str(tmp_path / "x"), "--pick", "best"]) == 2
    assert capsys.readouterr().err == ("simpsons-ray review: error: Unknown --pick 'best': use uncertain, random or character:NAME.\n")
    assert cli.main(["review", "import", "--from", out, "--output", data]) == 2
    assert "already holds files: pass --overwrite to replace an earlier review import" in capsys.readouterr().err


def test_an_export_and_an_import_through_s3(tmp_path, labelled, s3_server, s3_bucket):
    labels, model, _, _ = labelled
    remote_labels = upload_tree(s3_server.client(), s3_bucket, labels, "labels")
    out, data = f"s3://{s3_bucket}/review", f"s3://{s3_bucket}/data"
    run_export(ExportConfig(remote_labels, model, out, limit=4, min_gap_s=0), stdout=io.StringIO())
    tasks = read_json_s3(s3_server, s3_bucket, "review/tasks.json")
    annotations = write_json(tmp_path / "ls.json", ls_export(tasks, {i: [ls_annotation(["marge"])] for i in range(4)}))
    run_import(ImportConfig(out, data, annotations), stdout=io.StringIO())
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="data/")["Contents"]}
    assert keys == {"data/annotation.csv", "data/review.csv", "data/skipped.csv"} | {f"data/marge/{t['data']['image'].rsplit('/', 1)[-1]}" for t in tasks}


def read_json_s3(server, bucket: str, key: str):
    return json.loads(server.client().get_object(Bucket=bucket, Key=key)["Body"].read())


# ----------------------------------------------------------------------------- a real Label Studio
LS_FOLDER = "review-round-trip"  # the export, under Label Studio's document root


def ls_choices(*names: str) -> dict:
    return {"from_name": "characters", "to_name": "image", "type": "choices", "value": {"choices": list(names)}}


def ls_drawn_box(name: str, size: tuple[int, int], x: float, y: float, width: float, height: float) -> dict:
    """A rectangle as the editor submits it: percent of the picture, which it names by its size."""
    return {"from_name": "boxes", "to_name": "image", "type": "rectanglelabels", "original_width": size[0],
            "original_height": size[1], "value": {"x": x, "y": y, "width": width, "height": height, "rotation": 0,
                                                    "rectanglelabels": [name]}}


def predicted(task: dict) -> list[str]:
    return task["predictions"][0]["result"][0]["value"]["choices"]


@pytest.mark.slow  # installs Label Studio into its own venv on first use (about 1.5 min) and starts it (about 40 s)
def test_what_reviewers_say_in_label_studio_is_what_the_training_set_holds(label_studio, labelled, tmp_path):
    labels, model, _, _ = labelled
    out = label_studio.document_root / LS_FOLDER
    run_export(ExportConfig(labels_uri=labels, model_uri=model, output_uri=str(out), limit=8, min_gap_s=0,
                            image_url_prefix=f"/data/local-files/?d={LS_FOLDER}/"), stdout=io.StringIO())
    tasks = read_json(out / "tasks.json")
    assert len(tasks) == 8

    project = label_studio.create_project("simpsons-ray review", (out / "labeling_config.xml").read_text())
    label_studio.serve_local_files(project, f"{LS_FOLDER}/images")
    ids = label_studio.import_tasks(project, tasks)
    name = [t["data"]["image"].rsplit("/", 1)[-1] for t in tasks]
    served = label_studio.request("GET", "/data/local-files/", params={"d": f"{LS_FOLDER}/images/{name[0]}"})
    assert served.content == (out / "images" / name[0]).read_bytes()  # the picture the reviewer sees is the export's
    with Image.open(out / "images" / name[1]) as picture:
        size = picture.size

    # What the reviewers do, task by task (6 and 7 are left alone).
    others = [c for c in ("bart", "homer", "lisa", "marge") if c not in predicted(tasks[1])]
    label_studio.annotate(ids[0], [ls_choices(*predicted(tasks[0]))])  # accepts the model's answer
    label_studio.annotate(ids[1], [ls_choices(others[0]), ls_drawn_box(others[0], size, 10, 20, 50, 40)])  # corrects it, draws a box
    label_studio.annotate(ids[2], [ls_choices("nobody")])
    label_studio.skip(ids[3])
    label_studio.annotate(ids[4], [ls_choices("homer")], user=ADMIN)
    label_studio.annotate(ids[4], [ls_choices("marge")], user=REVIEWER)  # the two disagree
    label_studio.annotate(ids[5], [ls_choices("lisa", "bart")], user=ADMIN)
    label_studio.annotate(ids[5], [ls_choices("bart", "lisa")], user=REVIEWER)  # the two agree, in another order

    exported = tmp_path / "project-export.json"
    exported.write_text(json.dumps(label_studio.export(project)))
    data = tmp_path / "data"
    result = run_import(ImportConfig(str(out), str(data), str(exported)), stdout=io.StringIO())

    first = predicted(tasks[0])
    expected = {f"{first[0] if first != ['nobody'] else '_nobody'}/{name[0]}", f"{others[0]}/{name[1]}", f"_nobody/{name[2]}",
                f"lisa/{name[5]}"}
    assert set(files_under(data)) - {"annotation.csv", "review.csv", "skipped.csv"} == expected
    assert len(result.reviews) == 4
    for path in expected:  # each picture is the one the reviewer saw
        assert (data / path).read_bytes() == (out / "images" / os.path.basename(path)).read_bytes()
    review = pd.read_csv(data / "review.csv", dtype=str).set_index("file")
    for i, path in ((0, next(iter(e for e in expected if name[0] in e))), (1, f"{others[0]}/{name[1]}"), (5, f"lisa/{name[5]}")):
        assert review.loc[path, ["source", "episode", "frame"]].tolist() == [tasks[i]["data"]["source"], tasks[i]["data"]["episode"],
                                                                             str(tasks[i]["data"]["frame"])]
    assert review.loc[f"lisa/{name[5]}", "characters"] == "lisa;bart"
    assert review.loc[f"{others[0]}/{name[1]}", "changed"] in ("True", "true", "1")
    boxes = pd.read_csv(data / "annotation.csv")
    assert boxes.values.tolist() == [[f"{others[0]}/{name[1]}", round(0.1 * size[0]), round(0.2 * size[1]), round(0.6 * size[0]),
                                      round(0.6 * size[1]), others[0]]]
    skipped = pd.read_csv(data / "skipped.csv").set_index("file")["reason"].to_dict()
    assert skipped == {f"images/{name[3]}": "skipped by the reviewer", f"images/{name[4]}": "conflicting reviews",
                       f"images/{name[6]}": "not reviewed (not in Label Studio's export)",
                       f"images/{name[7]}": "not reviewed (not in Label Studio's export)"}
