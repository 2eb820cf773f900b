"""Training: data layouts, split, model phases, transforms, and real Ray Train runs."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from imagegen import class_image, encode, free_port, write_class_folders, write_flat_test_folder
from simpsons_ray import cli
from simpsons_ray.core.errors import UserError
from simpsons_ray.media.images import ImageDecodeError, decode_rgb
from simpsons_ray.model import metrics
from simpsons_ray.model.artifact import load_artifact, read_artifact_config
from simpsons_ray.model.network import build_model, freeze_frozen_batchnorm, load_backbone_weights, set_trainable
from simpsons_ray.model.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    PreprocessConfig,
    TrainAugment,
    load_resized,
    normalize,
    normalize_array,
)
from simpsons_ray.train import datasets
from simpsons_ray.train.config import TrainConfig, plan_phases
from simpsons_ray.train.data import AugmentingCollate
from simpsons_ray.train.recipe import LrSchedule
from simpsons_ray.train.steps import EarlyStopping, train_one_epoch
from waiting import wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["apu_nahasapeemapetilon", "bart_simpson", "homer_simpson", "lisa_simpson"]
ARTIFACT_FILES = ["model.pt", "config.json", "classes.json", "metrics.json", "per_character.csv", "curves.png", "reliability.png"]


# ------------------------------------------------------------------------ data layouts
def _table(counts: dict[str, int]) -> pd.DataFrame:
    rows = [(f"/d/{label}/pic_{i:04d}.jpg", label) for label, n in counts.items() for i in range(n)]
    return pd.DataFrame(rows, columns=["uri", "label"])


def test_split_is_deterministic_stratified_and_order_independent():
    images = _table({"a": 50, "b": 20, "c": 7, "d": 1})
    first = datasets.stratified_split(images, 0.2, seed=3)
    again = datasets.stratified_split(images.sample(frac=1.0, random_state=9), 0.2, seed=3)
    pd.testing.assert_frame_equal(first.train, again.train)
    pd.testing.assert_frame_equal(first.val, again.val)
    assert first.classes == ["a", "b", "c", "d"]
    val_counts = first.val["label"].value_counts().to_dict()
    assert val_counts == {"a": 10, "b": 4, "c": 1}  # 20% per class, a 1-image class stays in train
    assert set(first.train["uri"]).isdisjoint(first.val["uri"]) and first.test.empty
    assert len(first.train) + len(first.val) == len(images)
    assert (first.train["label_index"] == first.train["label"].map({"a": 0, "b": 1, "c": 2, "d": 3})).all()
    other_seed = datasets.stratified_split(images, 0.2, seed=4)
    assert set(other_seed.val["uri"]) != set(first.val["uri"])


def test_three_splits_are_disjoint_stratified_and_stable():
    images = _table({"a": 100, "b": 40, "c": 3, "d": 2, "e": 1})
    split = datasets.stratified_split(images, 0.15, seed=0, test_fraction=0.15)
    parts = {name: set(getattr(split, name)["uri"]) for name in ("train", "val", "test")}
    assert parts["train"].isdisjoint(parts["val"]) and parts["train"].isdisjoint(parts["test"])
    assert parts["val"].isdisjoint(parts["test"])
    assert set().union(*parts.values()) == set(images["uri"])
    counts = {name: getattr(split, name)["label"].value_counts().to_dict() for name in ("train", "val", "test")}
    assert counts["test"] == {"a": 15, "b": 6, "c": 1}  # 15% per class; 3 images: one each
    assert counts["val"] == {"a": 15, "b": 6, "c": 1, "d": 1}  # 2 images: one trains, one validates
    assert counts["train"] == {"a": 70, "b": 28, "c": 1, "d": 1, "e": 1}
    # Stable: listing order does not matter, and the test images stay put when --val-fraction changes.
    shuffled = datasets.stratified_split(images.sample(frac=1.0, random_state=1), 0.15, seed=0, test_fraction=0.15)
    pd.testing.assert_frame_equal(split.test, shuffled.test)
    pd.testing.assert_frame_equal(split.val, shuffled.val)
    more_val = datasets.stratified_split(images, 0.3, seed=0, test_fraction=0.15)
    pd.testing.assert_frame_equal(split.test, more_val.test)
    with pytest.raises(UserError, match="leave nothing to train on"):
        datasets.stratified_split(images, 0.5, seed=0, test_fraction=0.5)


def test_kaggle_layout_ignores_nested_duplicate_and_non_images(tmp_path):
    root = tmp_path / "simpsons_dataset"
    write_class_folders(str(root), ["bart_simpson", "homer_simpson"], 3)
    # The Kaggle zip nests a full duplicate copy of the dataset inside itself.
    write_class_folders(str(root / "simpsons_dataset"), ["bart_simpson", "homer_simpson"], 3)
    (root / "bart_simpson" / "notes.txt").write_text("not an image")
    (root / "homer_simpson" / ".DS_Store").write_bytes(b"\0\0")
    (root / "README.md").write_text("readme")
    images = datasets.list_labelled_images(str(root))
    assert sorted(images["label"].unique()) == ["bart_simpson", "homer_simpson"]
    assert len(images) == 6
    # Pointing at the outer folder of the zip descends into its single child.
    outer = datasets.list_labelled_images(str(tmp_path))
    pd.testing.assert_frame_equal(outer, images)


def test_flat_test_layout_takes_label_from_file_name(tmp_path):
    write_flat_test_folder(str(tmp_path / "kaggle_simpson_testset"), ["bart_simpson", "ned_flanders"], 2)
    images = datasets.list_labelled_images(str(tmp_path / "kaggle_simpson_testset"))
    assert images["label"].value_counts().to_dict() == {"bart_simpson": 2, "ned_flanders": 2}


def test_class_filter_drops_rare_characters_and_says_which():
    kept, dropped = datasets.filter_classes(_table({"a": 200, "b": 199, "c": 500}), 200)
    assert sorted(kept["label"].unique()) == ["a", "c"]
    assert dropped == {"b": 199}
    with pytest.raises(UserError, match="drops every character"):
        datasets.filter_classes(_table({"a": 3}), 10)


def test_missing_path_and_no_class_folders_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        datasets.list_labelled_images(str(tmp_path / "nope"))
    (tmp_path / "empty" / "a" / "b").mkdir(parents=True)
    (tmp_path / "empty" / "x").mkdir()
    with pytest.raises(UserError, match="No class folders"):
        datasets.list_labelled_images(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------- model
def test_head_shape_and_trainable_parameters_per_phase():
    model = build_model("resnet18", 7)
    head = model.fc
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert (head[0].in_features, head[0].out_features, head[2].p, head[3].out_features) == (512, 512, 0.5, 7)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)

    def trained_tops():
        return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}

    set_trainable(model, ())
    assert trained_tops() == {"fc"}
    set_trainable(model, ("layer4",))
    assert trained_tops() == {"fc", "layer4"}
    set_trainable(model, ("layer3", "layer4"))
    assert trained_tops() == {"fc", "layer3", "layer4"}
    set_trainable(model, "all")
    assert trained_tops() == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}


def test_frozen_batchnorm_statistics_stay_frozen_in_phase_one():
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    set_trainable(model, ())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k or "running_var" in k}
    fc_before = model.fc[3].weight.clone()
    batches = [{"image": torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8), "label": torch.randint(0, 3, (8,))}
               for _ in range(3)]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_one_epoch(model, batches, optimizer, torch.device("cpu"), PreprocessConfig(image_size=32))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen BatchNorm updated its statistics"
    assert not torch.equal(fc_before, model.fc[3].weight), "the head did not train"
    # Phase 2: layer4's BatchNorm learns again.
    set_trainable(model, ("layer4",))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_one_epoch(model, batches, optimizer, torch.device("cpu"), PreprocessConfig(image_size=32))
    after = model.state_dict()
    assert not torch.equal(before["layer4.1.bn2.running_mean"], after["layer4.1.bn2.running_mean"])
    assert torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])


def test_freeze_frozen_batchnorm_only_touches_frozen_layers():
    model = build_model("resnet18", 3)
    set_trainable(model, ("layer4",))
    model.train()
    freeze_frozen_batchnorm(model)
    assert not model.layer1[0].bn1.training
    assert model.layer4[0].bn1.training


def test_weights_from_a_state_dict_file_and_from_the_torch_hub_cache(tmp_path, monkeypatch):
    from torchvision import models

    reference = models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 4)
    load_backbone_weights(model, "resnet18", str(path))
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc[3].out_features == 4  # the head stays ours

    # --weights imagenet goes through torchvision's enum, which reads the torch hub
    # cache before it would download: put a file where the enum looks.
    enum = models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / os.path.basename(enum.url))
    model = build_model("resnet18", 4)
    assert "IMAGENET1K" in load_backbone_weights(model, "resnet18", "imagenet")
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)

    with pytest.raises(UserError, match="does not fit resnet34"):
        load_backbone_weights(build_model("resnet34", 4), "resnet34", str(path))
    with pytest.raises(UserError, match="does not exist"):
        load_backbone_weights(model, "resnet18", str(tmp_path / "missing.pth"))


def test_phases_and_early_stopping():
    assert [p.name for p in plan_phases(TrainConfig(weights="imagenet"))] == ["frozen", "finetune"]
    full = plan_phases(TrainConfig(weights="none", finetune_epochs=4, lr=1e-3))
    assert [(p.name, p.epochs, p.lr, p.trainable) for p in full] == [("full", 4, 1e-3, "all")]
    stopper = EarlyStopping(patience=2)  # follows the validation score the answers depend on: higher is better
    assert [stopper.step(v) for v in (0.5, 0.6, 0.55, 0.59)] == [True, True, False, False]
    assert stopper.should_stop and stopper.best == 0.6


def test_lr_schedules_plateau_waits_for_flat_epochs_cosine_ignores_them():
    def lrs_after(schedule: str, val_losses: list[float], warmup: float = 0.0) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        lr_schedule = LrSchedule(optimizer, schedule, 1.0, epochs=4, warmup_epochs=warmup, patience=1)
        out = []
        for epoch, loss in enumerate(val_losses):
            optimizer.step()  # an epoch's steps come first, as in training
            lr_schedule.end_epoch(loss)
            lr_schedule.set_progress(epoch + 1)
            out.append(optimizer.param_groups[0]["lr"])
        return out

    assert lrs_after("plateau", [1.0, 0.9, 0.95, 0.96]) == pytest.approx([1.0, 1.0, 1.0, 0.1])
    cosine = [0.5 * (1 + np.cos(np.pi * e / 4)) for e in range(1, 5)]  # 0.854, 0.5, 0.146, 0
    assert lrs_after("cosine", [1.0, 0.9, 0.95, 0.96]) == pytest.approx(cosine, abs=1e-9)
    assert lrs_after("cosine", [1.0, 2.0, 3.0, 4.0]) == pytest.approx(cosine, abs=1e-9)
    # A warm-up epoch: linear from ~0 to the peak over epoch 1, then cosine over the 3 left.
    assert lrs_after("cosine", [1.0] * 4, warmup=1.0) == pytest.approx([1.0, 0.75, 0.25, 0.0], abs=1e-9)


def test_model_dir_that_is_not_one(tmp_path):
    (tmp_path / "somewhere").mkdir()
    (tmp_path / "somewhere" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="is not a simpsons-ray model"):
        read_artifact_config(str(tmp_path / "somewhere"))
    with pytest.raises(UserError, match="does not exist"):
        load_artifact(str(tmp_path / "nothing"))


# -------------------------------------------------------------------------- transforms
def test_decode_converts_every_mode_and_rejects_bad_bytes():
    rgb = Image.new("RGB", (20, 10), (200, 30, 40))
    for mode in ("L", "P", "RGBA", "CMYK", "LA", "I;16"):
        fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
        img = decode_rgb(encode(rgb.convert(mode), fmt))
        assert img.mode == "RGB" and img.size == (20, 10)
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_rgb(encode(transparent, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    good = encode(rgb)
    for bad, reason in ((b"", "empty"), (good[: len(good) // 2], "cannot decode"), (b"GIF89a junk", "cannot decode")):
        with pytest.raises(ImageDecodeError, match=reason):
            decode_rgb(bad)
    with pytest.raises(ImageDecodeError, match="exceeds"):
        decode_rgb(encode(Image.new("RGB", (400, 300))), max_pixels=100_000)


def test_eval_preprocessing_matches_torchvision_and_augmentation_varies():
    from torchvision import transforms as T

    img = class_image(1, np.random.default_rng(0), size=48)
    data = encode(img, "PNG")
    config = PreprocessConfig(image_size=32)
    ours = normalize(load_resized(data, 32), config)[0]
    reference = T.Compose([T.Resize((32, 32)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
    assert ours.shape == (3, 32, 32)
    assert torch.allclose(ours, reference, atol=0.05)  # PIL vs tensor bilinear differ by rounding only
    # The NumPy twin the torch-free decode workers use gives the very same bits.
    pixels = np.stack([load_resized(data, 32)] * 3)
    np.testing.assert_array_equal(normalize_array(pixels, config).transpose(0, 3, 1, 2), normalize(pixels, config).numpy())
    augment = TrainAugment()
    base = load_resized(data, 32)
    outs = [augment(base) for _ in range(4)]
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, base) for o in outs)

    # The batch form the training workers use: tensors out, labels untouched.
    collate = AugmentingCollate(AugmentConfig())
    batch = collate({"image": np.stack([base] * 8), "label": np.arange(8, dtype=np.int64)})
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 32, 32, 3)
    assert batch["label"].tolist() == list(range(8))
    assert any(not np.array_equal(img, base) for img in batch["image"].numpy())


def test_metrics_match_a_hand_count():
    y_true = [0, 0, 1, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 0, 2]
    matrix = metrics.confusion_matrix(y_true, y_pred, 3)
    assert matrix.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    result = metrics.report(matrix, ["a", "b", "c"])
    assert result["accuracy"] == pytest.approx(4 / 6)
    f1 = [0.5, 2 * (2 / 3) * (2 / 3) / (4 / 3), 1.0]
    assert result["macro_f1"] == pytest.approx(np.mean(f1))
    assert result["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                        "f1": pytest.approx(2 / 3), "support": 3}
    assert metrics.matrix_csv(matrix, ["a", "b", "c"]).splitlines()[1] == "a,1,1,0"


# ---------------------------------------------------------------- Ray Train, end to end
STRANGER = "waylon_smithers"  # a fifth character, too rare to train (--min-images-per-class 20): a stranger


def _make_dataset(root, per_class=30, seed=0):
    write_class_folders(str(root), CLASSES, per_class, seed=seed, size=40, boxes=True)
    write_class_folders(str(root), [STRANGER], 12, seed=seed + 1, size=40, first_index=len(CLASSES))
    (root / CLASSES[0] / "pic_broken.jpg").write_bytes(encode(class_image(0, np.random.default_rng(1)))[:200])
    (root / CLASSES[1] / "Thumbs.db").write_bytes(b"\0" * 10)


def _train_args(data, output, *extra):
    return ["train", "--data", str(data), "--output", str(output), "--arch", "resnet18", "--image-size", "32",
            "--num-workers", "2", "--batch-size", "16", *extra]


def _poison_test_split(data, seed: int = 0, val_fraction: float = 0.25, test_fraction: float = 0.25) -> datasets.Split:
    """Replace every readable test-split image by a picture of the next class; returns the split.

    A model whose test score is honest must then score near 0 on test while validation
    stays high; had the test split fed training or the choice of epoch, it could not.
    """
    images = datasets.list_labelled_images(str(data))
    split = datasets.stratified_split(images, val_fraction, seed, test_fraction)
    rng = np.random.default_rng(7)
    for uri, index in zip(split.test["uri"], split.test["label_index"]):
        if not uri.endswith("pic_broken.jpg"):
            with open(uri, "wb") as f:
                f.write(encode(class_image((index + 1) % len(CLASSES), rng, 40), "PNG" if uri.endswith(".png") else "JPEG"))
    return split


def test_train_two_workers_learns_and_writes_a_complete_artifact(tmp_path, ray_session, capsys):
    """The default objective, multi-label: frames composed on the workers, thresholds from validation, an honest test."""
    data, out = tmp_path / "data", tmp_path / "model"
    _make_dataset(data)
    split = _poison_test_split(data)
    known = {name: getattr(split, name)[getattr(split, name)["label"] != STRANGER] for name in ("val", "test")}
    readable = {name: int((~part["uri"].str.endswith("pic_broken.jpg")).sum()) for name, part in known.items()}
    flags = ["--weights", "none", "--val-fraction", "0.25", "--test-fraction", "0.25", "--no-tta-flip", "--min-images-per-class", "20"]
    assert cli.main(_train_args(data, out, *flags, "--finetune-epochs", "6")) == 0
    # The workers' lines reach the driver through the progress queue: one per epoch, behind a bar.
    captured = capsys.readouterr()
    shown = [line for line in captured.err.splitlines() if line.startswith("train  [")]
    assert "pictures have a box: their characters are cut to it" in captured.out
    assert f"1 character(s) with fewer than 20 images train as strangers, whom the model names as nobody: {STRANGER} (12)" in captured.out
    for name in ARTIFACT_FILES:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "metrics.json").read_text())
    validation, test = summary["validation"], summary["test"]
    # One composed frame per readable picture; chance macro-F1 is ~0.3 and "nobody" would be 0 without composition.
    assert (validation["num_frames"], test["num_frames"]) == (readable["val"], readable["test"])
    # About 4 of the validation frames are empty, too few to judge "nobody" by (0 of them once, on a loaded
    # machine): the 80 fresh frames below check how often the model names nobody.
    assert validation["macro_f1"] >= 0.6, validation
    # The pictures as they are, and the stranger's (3 a split: a quarter of 12), scored apart.
    assert validation["pictures"]["num_images"] == readable["val"] and validation["pictures"]["accuracy"] >= 0.7, validation["pictures"]
    assert validation["strangers"]["num_images"] == 3 and 0 <= validation["strangers"]["false_name_rate"] <= 1
    # Test is scored apart and fed no decision: its poisoned pictures (each shows the next
    # character) score far below validation, and the best epoch is validation's.
    assert test["macro_f1"] <= validation["macro_f1"] - 0.25, test
    history = summary["history"]
    # The kept epoch is the one of best validation macro-F1 of the characters named, not of lowest loss.
    assert summary["best_epoch"] == 1 + max(range(len(history)), key=lambda i: (history[i]["val_score"], -i))
    assert summary["best_val_score"] == max(r["val_score"] for r in history)
    assert not any("test" in key for row in history for key in row)
    assert [s["uri"].endswith("pic_broken.jpg") for s in summary["skipped_images"]] == [True]
    assert len(history) >= 4 and all(r["images_per_s"] > 0 for r in history)
    assert [int(re.search(r"epoch +(\d+)/", line).group(1)) for line in shown] == list(range(1, len(history) + 1)), shown
    # The default recipe: a warm-up epoch from ~0, then a cosine that falls every epoch.
    lrs = [r["lr"] for r in history]
    assert lrs[0] < 1e-5 and lrs[1] == pytest.approx(TrainConfig.lr, rel=0.2) and all(a > b for a, b in zip(lrs[1:], lrs[2:])), lrs
    calibrated = validation["calibration"]
    assert calibrated["nll_after"] <= calibrated["nll_before"] + 1e-9 and calibrated["temperature"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["image_size"] == 32 and config["arch"] == "resnet18" and config["training"]["weights"] == "none"
    assert config["training"]["recipe"] == "default" and config["training"]["optimizer"] == "adamw"
    assert config["objective"] == "multilabel" and config["training"]["objective"] == "multilabel"
    assert len(config["thresholds"]) == len(CLASSES) and all(0 < t < 1 for t in config["thresholds"])
    assert config["temperature"] == calibrated["temperature"] and config["tta_flip"] is False
    assert config["threshold_rule"] == "count" and config["selected_by"] == "validation macro-F1 of the characters named"
    assert json.loads((out / "classes.json").read_text()) == CLASSES
    per_character = pd.read_csv(out / "per_character.csv")
    assert per_character["character"].tolist() == CLASSES and per_character["f1"].between(0, 1).all()
    for picture in ("curves.png", "reliability.png"):
        assert Image.open(out / picture).size[0] > 0

    # The artifact reloads and evaluates on composed frames of a labelled folder, with the
    # truth known: the same report, and each character's screen time against it.
    fresh = tmp_path / "fresh"
    write_class_folders(str(fresh), CLASSES, 12, seed=5, size=40, boxes=True)
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", str(out), "--data", str(fresh), "--composites", "80", "--json"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    assert result["num_frames"] == 80 and result["macro_f1"] >= 0.6 and result["model_objective"] == "multilabel", result
    # About a quarter of them are empty, and the report scores "nobody" on them. How often this tiny run (12
    # pictures a character, 32 px, 6 epochs on 2 Ray workers) says nobody varies with the workers' data order,
    # and its thresholds come from ~4 empty validation frames: it said nobody on none of 18 in 2 CI runs of 4.
    # Naming nobody is tested in process, seeded, by test_multilabel's trained-model test.
    assert result["nobody"]["support"] > 0 and 0 <= result["nobody"]["recall"] <= 1, result["nobody"]
    assert "(nobody)" in printed and "screen-time error" in printed
    # On single pictures it is scored by its top-1, as before; a character it does not know is named.
    test_dir = tmp_path / "testset"
    write_flat_test_folder(str(test_dir), CLASSES[:3] + ["ned_flanders"], 6, seed=5, size=40)
    assert cli.main(["evaluate", "--model", str(out), "--data", str(test_dir), "--json"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    assert result["num_images"] == 18 and result["accuracy"] >= 0.7 and result["model_objective"] == "multilabel"
    assert 0 <= result["calibration"]["ece_after"] <= 1 and 0 <= result["named_exactly"] <= result["named_recall"] <= 1
    # A character it does not know: its pictures are counted where they get a trained character's name.
    assert result["unknown_characters"] == ["ned_flanders"] and result["unknown_images"] == 6 and 0 <= result["false_name_rate"] <= 1
    assert "6 images of 1 character(s) the model does not know (ned_flanders): given a trained character's name on" in printed

    # Rerunning the same command resumes the finished run: no epoch is trained again.
    epochs_before = summary["epochs_run"]
    assert cli.main(_train_args(data, out, *flags, "--finetune-epochs", "6")) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == epochs_before
    # ... but different settings into the same output are refused, in one sentence.
    assert cli.main(_train_args(data, out, *flags, "--finetune-epochs", "9")) == 2
    assert "different settings (finetune_epochs)" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path, ray_session, capsys):
    """SIGKILL the whole job after its first checkpoint; the rerun continues from there."""
    data, out = tmp_path / "data", tmp_path / "model"
    write_class_folders(str(data), CLASSES[:3], 12, size=32)
    weights = tmp_path / "backbone.pth"
    from torchvision import models

    torch.save(models.resnet18(weights=None).state_dict(), weights)
    args = [sys.executable, os.path.join(REPO, "jobs", "train.py"), *_train_args(data, out)[1:],
            "--weights", str(weights), "--frozen-epochs", "4", "--finetune-epochs", "1", "--patience", "5", "--objective", "single",
            "--ema-decay", "0.9", "--batch-size", "4"]  # 3 steps an epoch per worker: the average moves off the weights
    env = {**os.environ, "RAY_ADDRESS": "local"}
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = out / "_train"
    from simpsons_ray.train.state import newest_stored_state

    # A complete first checkpoint.
    assert wait_until(lambda: first.poll() is not None or newest_stored_state(str(out)) is not None, timeout=300, every=0.5)
    assert first.poll() is None, "training ended before its first checkpoint"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (out / "metrics.json").exists()
    # The checkpoint holds the weight average mid-phase, not only the weights, so the rerun continues it.
    stored = newest_stored_state(str(out))
    assert 1 <= stored.epoch_in_phase < 4 and stored.ema is not None and int(stored.ema["n_averaged"]) > 0
    assert not torch.equal(stored.ema["module.fc.1.weight"], stored.model["fc.1.weight"])
    # Another recipe into the same output is refused; the same one resumes (in this process: one Ray start fewer).
    cli_args = ["train", *args[2:]]
    capsys.readouterr()
    assert cli.main(cli_args + ["--recipe", "notebook"]) == 2
    refused = capsys.readouterr().err
    assert "different settings (" in refused and "recipe" in refused
    # A run recorded before a setting existed resumes as one with that setting's default.
    record = checkpoints / "run.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "lr_schedule"}))

    assert cli.main(cli_args) == 0
    assert "resuming the run" in capsys.readouterr().out
    summary = json.loads((out / "metrics.json").read_text())
    history = summary["history"]
    assert [row["epoch"] for row in history] == list(range(1, 6))
    assert [row["phase"] for row in history] == ["frozen"] * 4 + ["finetune"]


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda p: None, ["--data", "{tmp}/missing"], "does not exist"),
        (lambda p: (p / "flat").mkdir(), ["--data", "{tmp}/flat"], "No class folders"),
        (lambda p: None, ["--data", "{tmp}", "--arch", "resnet7"], "Unknown --arch"),
        (lambda p: None, ["--data", "{tmp}", "--unfreeze", "layer9"], "Unknown stage"),
        (lambda p: None, ["--data", "{tmp}", "--mixup-alpha", "0.2"], "use them with --objective single"),
        (lambda p: write_class_folders(str(p / "d"), CLASSES[:2], 2), ["--data", "{tmp}/d", "--boxes", "{tmp}/nope.csv"],
         "--boxes {tmp}/nope.csv does not exist"),
    ],
)
def test_train_bad_input_is_one_sentence(tmp_path, capsys, make, args, message):
    make(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert cli.main(["train", "--output", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message.replace("{tmp}", str(tmp_path)) in err and len(err.splitlines()) == 1


def test_evaluate_rejects_a_directory_that_is_not_a_model(tmp_path, capsys):
    write_flat_test_folder(str(tmp_path / "test"), ["bart_simpson"], 1)
    assert cli.main(["evaluate", "--model", str(tmp_path / "test"), "--data", str(tmp_path / "test")]) == 2
    assert "is not a simpsons-ray model" in capsys.readouterr().err


def test_unknown_flags_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--data", "x", "--output", "y", "--learning-rate", "3"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --learning-rate" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; CI has none, the CPU path above runs the same code")
def test_one_epoch_on_cuda_uses_bf16_and_channels_last():
    model = build_model("resnet18", 3).cuda().to(memory_format=torch.channels_last)
    batches = [{"image": torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8), "label": torch.randint(0, 3, (8,))}]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = train_one_epoch(model, batches, optimizer, torch.device("cuda"), PreprocessConfig(image_size=32))
    assert stats.count == 8 and np.isfinite(stats.loss)


def test_newest_stored_checkpoint_is_found_when_ray_has_not_registered_it(tmp_path):
    from simpsons_ray.train.state import TrainState, newest_stored_state

    assert newest_stored_state(str(tmp_path)) is None
    for name, epoch in (("checkpoint_2026-01-01_10-00-00.000001", 1), ("checkpoint_2026-01-01_10-00-05.000001", 2)):
        (tmp_path / "_train" / name).mkdir(parents=True)
        (tmp_path / "_train" / name / "state.pt").write_bytes(TrainState(epoch=epoch, history=[]).to_bytes())
    cut = tmp_path / "_train" / "checkpoint_2026-01-01_10-00-09.000001"
    cut.mkdir()
    (cut / "state.pt").write_bytes(b"half an upload")
    assert newest_stored_state(str(tmp_path)).epoch == 2


def test_unreadable_checkpoints_are_named_and_none_readable_is_said(tmp_path, caplog):
    """Corrupt checkpoints are named when passed over; when none loads, a warning says the run starts again (it was silent)."""
    from simpsons_ray.train.state import TrainState, newest_stored_state

    good = tmp_path / "_train" / "checkpoint_2026-01-01_10-00-00.000001"
    good.mkdir(parents=True)
    (good / "state.pt").write_bytes(TrainState(epoch=3, history=[]).to_bytes())
    corrupt = tmp_path / "_train" / "checkpoint_2026-01-01_10-00-05.000001"
    corrupt.mkdir()
    (corrupt / "state.pt").write_bytes(TrainState(epoch=4, history=[]).to_bytes()[:200])
    with caplog.at_level("WARNING", logger="simpsons_ray.train"):
        assert newest_stored_state(str(tmp_path)).epoch == 3
    assert "checkpoint_2026-01-01_10-00-05.000001" in caplog.text and "cannot be read" in caplog.text
    caplog.clear()
    (good / "state.pt").write_bytes(b"garbage")
    with caplog.at_level("WARNING", logger="simpsons_ray.train"):
        assert newest_stored_state(str(tmp_path)) is None
    assert "none of the 2 checkpoint(s)" in caplog.text and "starts again from its first epoch" in caplog.text


def test_checkpoint_lookup_tells_none_from_unreadable(tmp_path):
    """A missing or cut-short state file is passed over; storage that cannot be read fails instead of restarting from nothing."""
    from simpsons_ray.core.errors import StorageError
    from simpsons_ray.train.state import TrainState, newest_stored_state

    old = tmp_path / "_train" / "checkpoint_2026-01-01_10-00-00.000001"
    old.mkdir(parents=True)
    (old / "state.pt").write_bytes(TrainState(epoch=1, history=[]).to_bytes())
    (tmp_path / "_train" / "checkpoint_2026-01-01_10-00-05.000001").mkdir()  # its upload never began
    assert newest_stored_state(str(tmp_path)).epoch == 1
    unreadable = tmp_path / "_train" / "checkpoint_2026-01-01_10-00-09.000001" / "state.pt"
    unreadable.mkdir(parents=True)  # a read that fails for the storage's reasons, not the bytes'
    with pytest.raises(StorageError, match="Could not read .*state.pt from storage"):
        newest_stored_state(str(tmp_path))


def test_a_storage_failure_while_decoding_stops_training_instead_of_skipping_images(ray_session, tmp_path):
    """Only bytes that do not decode are skipped; a read the storage refuses fails the run (after Ray Data's retries)."""
    import pandas as pd

    from simpsons_ray.core.errors import StorageError
    from simpsons_ray.train import data as training_data

    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(encode(class_image(0, np.random.default_rng(0), 32), "PNG"))
    bad.write_bytes(b"not an image")
    table = pd.DataFrame({"uri": [str(good), str(bad)], "label_index": [0, 1]})
    kept, skipped = training_data.decode_or_stop(table, 32, 0, "training", str(tmp_path))
    assert kept.count() == 1 and [s["uri"] for s in skipped] == [str(bad)]

    unreachable = tmp_path / "unreachable.png"
    unreachable.mkdir()  # reading it fails in the storage layer, as an outage does
    table = pd.DataFrame({"uri": [str(good), str(unreachable)], "label_index": [0, 1]})
    with pytest.raises(StorageError, match="Could not read 1 of the training images under .* from storage, even after retries"):
        training_data.decode_or_stop(table, 32, 0, "training", str(tmp_path))


def test_decoding_flags_a_storage_failure_on_an_s3_endpoint_that_is_down(monkeypatch):
    """The same through pyarrow's S3 client, against an endpoint nobody answers: a storage failure, never an 'unreadable image'."""
    from simpsons_ray.core import storage
    from simpsons_ray.train import data as training_data

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(storage, "S3_MAX_ATTEMPTS", 2)
    storage._s3.cache_clear()
    try:
        batch = {"uri": np.array(["s3://some-bucket/homer/1.png"], dtype=object), "label_index": np.array([0])}
        decoded = training_data.decode_batch(batch, 32)
        assert decoded["error"][0] == "" and decoded["storage_error"][0]  # a storage failure, not a bad image
    finally:
        storage._s3.cache_clear()


def test_cpu_workers_are_sized_from_the_nodes_they_will_run_on(monkeypatch):
    """From the largest node (now or from the autoscaler's node types), not from the CPUs up at start-up."""
    from simpsons_ray.core import cluster
    from simpsons_ray.train.driver import _cpus_per_worker

    config = TrainConfig(num_workers=2)
    shapes = {"autoscaled 4 x 8 CPUs, none up yet": (8.0, 32.0, 7.0), "a 2-core laptop": (2.0, 2.0, 0.5),
              "one 16-core machine": (16.0, 16.0, 7.5), "nothing known": (0.0, 0.0, 1.0)}
    for name, (node, total, expected) in shapes.items():
        monkeypatch.setattr(cluster, "node_cpus", lambda node=node: node)
        monkeypatch.setattr(cluster, "max_cpus", lambda total=total: total)
        assert _cpus_per_worker(config) == expected, name
    assert _cpus_per_worker(dataclasses.replace(config, use_gpu=True)) == 1.0
