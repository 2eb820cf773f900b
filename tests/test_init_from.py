"""Training on from a model (--init-from), on several --data roots, with reviewed frames of nobody (ROOT/_nobody/)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from imagegen import encode, write_class_folders
from simpsons_ray import cli
from simpsons_ray.core.errors import UserError
from simpsons_ray.demo.synthetic import scene_image
from simpsons_ray.model.artifact import load_artifact, save_artifact
from simpsons_ray.model.network import build_model
from simpsons_ray.model.preprocess import PreprocessConfig
from simpsons_ray.train import datasets
from simpsons_ray.train.compose import STRANGER
from simpsons_ray.train.config import TrainConfig, plan_phases, recorded_config
from simpsons_ray.train.data import decode_batch
from simpsons_ray.train.mixing import Mix, training_frames
from simpsons_ray.train.parent import grown_state, load_parent_weights, read_parent
from simpsons_ray.train.training_set import build_training_set

OLD = ["bart_simpson", "homer_simpson", "lisa_simpson"]  # the parent model's characters, in its (unsorted) order below
NEW = "ned_flanders"
SIZE = 32


def _nobody(root, n: int, seed: int = 3) -> None:
    """n reviewed frames of nobody: empty scenes, in ROOT/_nobody/."""
    folder = root / datasets.NOBODY
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        (folder / f"frame_{i:03d}.jpg").write_bytes(encode(scene_image([], rng, 40)))


def _parent(path, classes=("lisa_simpson", "bart_simpson", "homer_simpson"), objective="multilabel", seed=0) -> str:
    """A model artifact of ``classes`` (not sorted: its order must survive), resnet18 at 32 px, a linear head."""
    torch.manual_seed(seed)
    model = build_model("resnet18", len(classes), head_hidden=0, dropout=0.0)
    save_artifact(str(path), model, "resnet18", list(classes), PreprocessConfig(image_size=SIZE), head_hidden=0, dropout=0.0,
                  training={"arch": "resnet18"}, inference={"objective": objective, "thresholds": [0.5] * len(classes)})
    return str(path)


def _config(*roots, **settings) -> TrainConfig:
    return TrainConfig(data_uris=tuple(str(r) for r in roots), output_uri="unused", arch="resnet18", image_size=SIZE,
                       weights="none", val_fraction=0.25, test_fraction=0.25, **settings)


# ------------------------------------------------------------------ data: roots, _nobody
def test_folders_starting_with_an_underscore_are_never_characters(tmp_path):
    write_class_folders(str(tmp_path / "d"), OLD[:2], 3, size=24)
    _nobody(tmp_path / "d", 2)
    write_class_folders(str(tmp_path / "d" / "_scratch"), ["x"], 1, size=24)  # deeper: ignored anyway
    (tmp_path / "d" / "_review").mkdir()
    (tmp_path / "d" / "_review" / "a.jpg").write_bytes((tmp_path / "d" / OLD[0] / "pic_0001.jpg").read_bytes())
    assert sorted(set(datasets.list_labelled_images(str(tmp_path / "d"))["label"])) == OLD[:2]
    everything = datasets.list_root_images(str(tmp_path / "d"))
    assert everything["label"].value_counts().to_dict() == {OLD[0]: 3, OLD[1]: 3, datasets.NOBODY: 2}
    # A root of nobody frames only is a root training can pool, but it holds no character to evaluate on.
    _nobody(tmp_path / "corrections", 2)
    assert set(datasets.list_root_images(str(tmp_path / "corrections"))["label"]) == {datasets.NOBODY}
    with pytest.raises(UserError, match="No class folders"):
        datasets.list_labelled_images(str(tmp_path / "corrections"))


def test_two_roots_pool_their_pictures_each_with_its_own_boxes_and_split_alike(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_class_folders(str(a), OLD[:2], 8, seed=0, size=40, boxes=True)
    write_class_folders(str(b), [OLD[1], NEW], 8, seed=1, size=40, boxes=True, first_index=1)
    # Both roots hold homer_simpson/pic_0000.png: each must keep its own box, not the other root's.
    box = {r: pd.read_csv(r / "annotation.csv").set_index("path").loc[f"{OLD[1]}/pic_0000.png", ["x1", "y1", "x2", "y2"]].tolist()
           for r in (a, b)}
    assert box[a] != box[b]
    training = build_training_set(_config(a, b))
    split = training.split
    assert split.classes == sorted([*OLD[:2], NEW]) and training.added == [] and training.nobody == 0
    pictures = pd.concat([split.train, split.val, split.test])
    assert len(pictures) == 32 and pictures["uri"].str.startswith(str(a)).sum() == 16
    for root in (a, b):
        row = pictures[pictures["uri"] == str(root / OLD[1] / "pic_0000.png")].iloc[0]
        assert list(row["box"]) == box[root]
    assert "32 of 32 pictures have a box" in capsys.readouterr().out
    # The split depends on the pictures and the seed only: not on the order of the roots.
    again = build_training_set(_config(b, a)).split
    assert all(getattr(split, part)["uri"].tolist() == getattr(again, part)["uri"].tolist() for part in ("train", "val", "test"))
    with pytest.raises(UserError, match="is given twice"):
        build_training_set(_config(a, a))


def test_nobody_frames_train_as_frames_of_nobody_and_backgrounds_never_as_a_character(tmp_path, caplog):
    data = tmp_path / "d"
    write_class_folders(str(data), OLD, 8, size=40, boxes=True)
    _nobody(data, 8)
    training = build_training_set(_config(data))
    assert training.split.classes == OLD and training.nobody == 8
    frames = pd.concat([training.split.train, training.split.val, training.split.test])
    nobody = frames[frames["label"] == datasets.NOBODY]
    assert len(nobody) == 8 and (nobody["label_index"] == STRANGER).all() and nobody["nobody"].all()
    assert not frames.loc[frames["label"] != datasets.NOBODY, "nobody"].any()
    assert len(training.split.val[training.split.val["nobody"]]) == 2  # held out like a character's pictures
    # Decoded for training, a frame of nobody is a background, whole.
    train = training.split.train
    batch = decode_batch({"uri": train["uri"].to_numpy(), "label_index": train["label_index"].to_numpy(),
                          "box": np.stack(train["box"].to_numpy()), "nobody": train["nobody"].to_numpy()}, SIZE, cells=True)
    assert batch["has_background"][batch["nobody"]].all()
    assert np.array_equal(batch["background"][batch["nobody"]], batch["whole"][batch["nobody"]])
    # As it is, every character is absent from it, at full weight.
    whole = training_frames(batch, len(OLD), np.random.default_rng(0), Mix(whole=1.0, scene=0.0))
    assert (whole.targets[batch["nobody"]] == 0).all() and (whole.weights[batch["nobody"]] == 1).all()
    assert (whole.targets[~batch["nobody"]].sum(axis=1) == 1).all()
    # Composed of frames of nobody alone: each is one of them, untouched; none is pasted as a character.
    only = {k: v[batch["nobody"]] for k, v in batch.items()}
    composed = training_frames(only, len(OLD), np.random.default_rng(0), Mix(whole=0.0, scene=0.0))
    assert (composed.targets == 0).all()
    assert all(any(np.array_equal(f, b) for b in only["background"]) for f in composed.images)

    # A single-label model has no way to name nobody: it leaves them out, and says so in one line.
    with caplog.at_level(logging.WARNING, logger="simpsons_ray.train"):
        single = build_training_set(_config(data, objective="single"))
    assert single.nobody == 0 and datasets.NOBODY not in set(pd.concat([single.split.train, single.split.val])["label"])
    assert [r.getMessage() for r in caplog.records if "frame(s) of nobody" in r.getMessage()] == [
        "train: left out 8 frame(s) of nobody (_nobody/): a single-label model names one character per picture "
        "(--objective multilabel trains on them)"]


def test_a_parent_model_keeps_its_order_and_its_rare_characters_and_appends_new_ones(tmp_path, capsys):
    data = tmp_path / "d"
    write_class_folders(str(data), [OLD[0], OLD[2], NEW], 8, size=40)
    write_class_folders(str(data), [OLD[1]], 2, size=40, first_index=3)  # rare, but the parent's: kept, never a stranger
    order = ["lisa_simpson", "bart_simpson", "homer_simpson", "marge_simpson"]
    training = build_training_set(_config(data, min_images_per_class=5), order)
    assert training.split.classes == [*order, NEW] and training.added == [NEW] and training.without_data == ["marge_simpson"]
    assert training.dropped == {}
    said = capsys.readouterr().out
    assert f"1 character(s) the --init-from model does not have are appended to its head: {NEW}" in said
    assert "have no picture here and stay in its head, learning only where they are absent: marge_simpson" in said


# --------------------------------------------------------------- config: flags, records
def test_several_data_flags_and_records_of_one_data_uri_string(tmp_path):
    def parse(*flags):
        return cli.train_config(cli.build_parser().parse_args(["train", "--output", "o", *flags]))

    assert parse("--data", "a").data_uris == ("a",)
    assert parse("--data", "a", "--data", "s3://b/c").data_uris == ("a", "s3://b/c")
    # Older runs recorded one root as a string: it resumes, and an artifact's training flags load.
    mine = TrainConfig.for_recipe("default", data_uris=("a",), output_uri="o").to_dict()
    old = {k: v for k, v in mine.items() if k not in ("data_uris", "init_from")} | {"data_uri": "a"}
    assert recorded_config(old) == mine
    assert TrainConfig.from_dict(old).data_uris == ("a",) and TrainConfig(data_uris="a").data_uris == ("a",)


def test_init_from_takes_the_models_settings_and_refuses_flags_that_contradict_it(tmp_path, capsys):
    parent = _parent(tmp_path / "parent")
    write_class_folders(str(tmp_path / "d"), OLD, 4, size=SIZE)
    base = ["train", "--data", str(tmp_path / "d"), "--output", str(tmp_path / "out"), "--init-from", parent]
    config = cli.train_config(cli.build_parser().parse_args([*base, "--recipe", "notebook"]))
    # The model's arch, image size, head and objective, whatever the defaults or the recipe say; every weight is the model's.
    assert (config.arch, config.image_size, config.head_hidden, config.objective, config.weights) == ("resnet18", SIZE, 0, "multilabel", "none")
    assert [p.name for p in plan_phases(config)] == ["finetune"]  # its head is trained: straight to fine-tuning
    assert [p.name for p in plan_phases(config, added_classes=True)] == ["frozen", "finetune"]  # fresh rows first learn alone
    cases = [
        (["--arch", "resnet50"], f"--arch resnet50 contradicts --init-from {parent}, whose arch is resnet18: leave --arch out"),
        (["--image-size", "64"], f"--image-size 64 contradicts --init-from {parent}, whose image size is 32"),
        (["--objective", "single"], f"--objective single contradicts --init-from {parent}, whose objective is multilabel"),
        (["--head-hidden", "512"], "--head-hidden 512 contradicts"),
        (["--weights", "imagenet"], f"--weights imagenet and --init-from {parent} both say where the weights start"),
    ]
    for flags, message in cases:
        assert cli.main([*base, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    for where, message in ((tmp_path / "d", "is not a simpsons-ray model (no config.json, classes.json, model.pt): point --init-from"),
                           (tmp_path / "nowhere", "does not exist: point --init-from")):
        assert cli.main([*base[:-1], str(where)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_grown_head_starts_with_the_models_rows_exactly_and_fresh_ones_after(tmp_path):
    parent_uri = _parent(tmp_path / "parent")
    parent = read_parent(parent_uri)
    old = load_artifact(parent_uri).model.state_dict()
    torch.manual_seed(5)
    model = build_model("resnet18", 4, head_hidden=0, dropout=0.0)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_parent_weights(model, parent.uri, parent.model_id, "resnet18")
    start = model.state_dict()
    assert torch.equal(start["fc.1.weight"][:3], old["fc.1.weight"]) and torch.equal(start["fc.1.bias"][:3], old["fc.1.bias"])
    assert torch.equal(start["fc.1.weight"][3], fresh["fc.1.weight"][3]) and torch.equal(start["fc.1.bias"][3], fresh["fc.1.bias"][3])
    assert all(torch.equal(start[k], old[k]) for k in old if not k.startswith("fc."))
    with pytest.raises(UserError, match="does not fit the network"):
        grown_state({k: v for k, v in old.items() if k != "conv1.weight"}, fresh)
    # The lineage names these weights: weights that changed since the driver read them are refused.
    save_artifact(parent_uri, build_model("resnet18", 3, 0, 0.0), "resnet18", OLD, PreprocessConfig(image_size=SIZE), 0, 0.0)
    with pytest.raises(UserError, match="changed since this run started"):
        load_parent_weights(model, parent.uri, parent.model_id, "resnet18")


# --------------------------------------------------------------------- Ray Train, end to end
def _run(data_roots, out, parent, *extra) -> int:
    data = [flag for root in data_roots for flag in ("--data", str(root))]
    return cli.main(["train", *data, "--output", str(out), "--init-from", str(parent), "--num-workers", "1", "--batch-size", "16",
                     "--frozen-epochs", "1", "--finetune-epochs", "1", "--val-fraction", "0.25", "--test-fraction", "0", *extra])


@pytest.fixture(scope="module")
def grown(tmp_path_factory, ray_session) -> SimpleNamespace:
    """A parent model grown by one character, on two roots (the new one with frames of nobody): one short Ray Train run."""
    root = tmp_path_factory.mktemp("init_from")
    parent = _parent(root / "parent")
    original, corrections = root / "original", root / "corrections"
    write_class_folders(str(original), OLD, 8, size=40, boxes=True)
    write_class_folders(str(corrections), [NEW], 8, size=40, first_index=3)
    _nobody(corrections, 4)
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        assert _run([original, corrections], root / "child", parent) == 0
    return SimpleNamespace(parent=parent, original=original, corrections=corrections, child=root / "child", said=said.getvalue())


@pytest.mark.slow  # a Ray Train run from a model (about 30 s): the fast tier keeps the head-growing and lineage checks above
def test_init_from_trains_on_appends_a_character_and_records_the_lineage(grown):
    assert f"appended to its head: {NEW}" in grown.said and "4 frame(s) of nobody (_nobody/) train as frames" in grown.said
    model = load_artifact(str(grown.child))
    parent_id = read_parent(grown.parent).model_id
    assert model.classes == ["lisa_simpson", "bart_simpson", "homer_simpson", NEW] and model.objective == "multilabel"
    assert model.lineage == [{"model_id": parent_id, "model_uri": grown.parent, "classes_added": [NEW], "classes_without_data": []}]
    training = model.config["training"]
    assert training["init_from"] == grown.parent and training["data_uris"] == [str(grown.original), str(grown.corrections)]
    assert [p["name"] for p in training["phases"]] == ["frozen", "finetune"] and training["weights"] == "none"
    summary = json.loads((grown.child / "metrics.json").read_text())
    assert [row["phase"] for row in summary["history"]] == ["frozen", "finetune"]
    assert summary["validation"]["strangers"]["num_images"] == 1  # the held-out frame of nobody, scored as nobody's


@pytest.mark.slow
def test_init_from_resumes_and_trains_on_from_its_own_child(grown, tmp_path, capsys):
    """Slow: two more Ray Train runs (a resume, and a third generation), about a minute on 2 cores."""
    # Rerunning the same command resumes the finished run: its recorded settings compare equal, no epoch runs again.
    assert _run([grown.original, grown.corrections], grown.child, grown.parent) == 0
    assert "resuming the run" in capsys.readouterr().out
    assert json.loads((grown.child / "metrics.json").read_text())["epochs_run"] == 2
    # On from the grown model, on the original data alone: nothing added, straight to fine-tuning; the lineage grows.
    child = load_artifact(str(grown.child))
    assert _run([grown.original], tmp_path / "grandchild", grown.child) == 0
    assert f"stay in its head, learning only where they are absent: {NEW}" in capsys.readouterr().out
    again = load_artifact(str(tmp_path / "grandchild"))
    assert again.classes == child.classes
    assert again.lineage == [{"model_id": child.model_id, "model_uri": str(grown.child), "classes_added": [],
                              "classes_without_data": [NEW]}, *child.lineage]
    assert [row["phase"] for row in json.loads((tmp_path / "grandchild" / "metrics.json").read_text())["history"]] == ["finetune"]
