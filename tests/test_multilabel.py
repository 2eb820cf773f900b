"""Frames of several characters, or nobody: composition, thresholds, set metrics, and a model that learns from them.

No Ray here: composition runs in the training workers' collate function and the
training step is plain PyTorch, so both are tested as they run, in this process.
The pictures are generated: one coloured shape per character on a noisy
background, with the shape's box as annotation.csv gives it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagegen import encode
from simpsons_ray.core.errors import UserError
from simpsons_ray.demo.synthetic import PALETTE, class_image_and_box, write_class_folders
from simpsons_ray.media.images import decode_rgb
from simpsons_ray.model import calibration, multilabel
from simpsons_ray.model.network import build_model
from simpsons_ray.model.preprocess import AugmentConfig, PreprocessConfig, normalize
from simpsons_ray.train import compose
from simpsons_ray.train.data import AugmentingCollate, decode_batch
from simpsons_ray.train.mixing import Mix, validation_frames
from simpsons_ray.train.selection import choose_thresholds, complete_truth
from simpsons_ray.train.steps import StepRecipe, train_one_epoch

SIZE = 32
CLASSES = ["bart", "homer", "lisa", "marge"]


def _pictures(n: int, seed: int, size: int = 64):
    """n generated pictures (PIL), their class and their shape's box."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img, box = class_image_and_box(i % len(CLASSES), rng, size)
        out.append((img, i % len(CLASSES), box))
    return out


def _cells(pictures, size: int = SIZE) -> dict[str, np.ndarray]:
    """The decode stage's output for these pictures: cells, aspects, backgrounds, as a batch."""
    cut = [compose.cut(img, box, size) for img, _, box in pictures]
    return {
        "image": np.stack([c[0] for c in cut]),
        "aspect": np.array([c[1] for c in cut], np.float32),
        "label": np.array([k for _, k, _ in pictures], np.int64),
        "background": np.stack([c[2] if c[2] is not None else np.zeros((size, size, 3), np.uint8) for c in cut]),
        "has_background": np.array([c[2] is not None for c in cut]),
    }


def _shows_colour(pixels: np.ndarray, k: int, tolerance: int = 25) -> bool:
    """Whether some pixels are within ``tolerance`` of character k's colour (a shape's colour jitters by up to 20)."""
    distance = np.abs(pixels.astype(np.int64) - np.array(PALETTE[k])).max(axis=-1)
    return bool((distance <= tolerance).sum() >= 3)


def test_background_strips_never_overlap_the_box():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        w, h = (int(v) for v in rng.integers(20, 300, 2))
        x1, y1 = rng.uniform(-10, w), rng.uniform(-10, h)
        box = (x1, y1, x1 + rng.uniform(1, w), y1 + rng.uniform(1, h))
        region = compose.background_region(w, h, box)
        if region is None:
            continue
        rx1, ry1, rx2, ry2 = region
        assert 0 <= rx1 < rx2 <= w and 0 <= ry1 < ry2 <= h
        # Disjoint: the strip ends before the box starts, or starts after it ends, on some axis.
        assert rx2 <= max(0, np.floor(box[0])) or rx1 >= min(w, np.ceil(box[2])) or ry2 <= max(0, np.floor(box[1])) or ry1 >= min(h, np.ceil(box[3]))
    assert compose.background_region(100, 100, (0, 0, 100, 100)) is None  # the box is the whole picture
    assert compose.background_region(100, 100, compose.NO_BOX) is None
    assert compose.background_region(100, 100, (40, 0, 100, 100)) == (0, 0, 40, 100)


def test_composition_targets_are_the_characters_pasted_and_no_background_holds_its_own_character():
    pictures = _pictures(48, seed=1)
    batch = _cells(pictures)
    assert batch["has_background"].sum() >= 16  # a big shape leaves no strip big enough
    for (_, k, _), background, has in zip(pictures, batch["background"], batch["has_background"]):
        # The picture's own character is cut away from its background...
        assert not has or not _shows_colour(background, k)
    for cell, k in zip(batch["image"], batch["label"]):
        assert _shows_colour(cell, int(k))  # ...and is in its cell.

    composite = compose.compose_batch(batch, len(CLASSES), np.random.default_rng(2), weights=(0.25, 0.25, 0.25, 0.25))
    counts = composite.targets.sum(axis=1)
    assert set(counts.tolist()) == {0.0, 1.0, 2.0, 3.0}
    for frame, target, placed, background in zip(composite.images, composite.targets, composite.placed, composite.backgrounds):
        classes = [k for k, _ in placed]
        assert len(classes) == len(set(classes)), "a frame never holds one character twice"
        assert sorted(np.flatnonzero(target).tolist()) == sorted(classes)
        for k, (x1, y1, x2, y2) in placed:
            assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
            assert _shows_colour(frame[y1:y2, x1:x2], k)
        if not placed:
            np.testing.assert_array_equal(frame, batch["background"][batch["has_background"]][background])
        # Pasted characters sit side by side: their boxes do not overlap.
        for i, (_, a) in enumerate(placed):
            for _, b in placed[i + 1:]:
                assert a[2] <= b[0] or b[2] <= a[0]


def test_a_box_that_is_missing_tiny_or_outside_leaves_the_whole_picture():
    img, box = class_image_and_box(0, np.random.default_rng(3), 64)
    whole = np.asarray(img.resize((SIZE, SIZE)))
    for bad in (compose.NO_BOX, (0, 0, 3, 3), (200, 200, 300, 300)):
        cell, aspect, background = compose.cut(img, bad, SIZE)
        assert background is None and aspect == pytest.approx(1.0)
        assert np.abs(cell.astype(int) - whole).mean() < 2
    cell, aspect, background = compose.cut(img, box, SIZE)
    assert background is not None and aspect == pytest.approx(1.0, abs=0.05)


def test_without_backgrounds_frames_are_flat_and_composition_still_works():
    batch = _cells(_pictures(8, seed=4))
    batch["has_background"][:] = False
    composite = compose.compose_batch(batch, len(CLASSES), np.random.default_rng(0))
    assert (composite.backgrounds == -1).all() and len(composite.images) == 8


def test_decode_stage_cuts_to_the_boxes_of_annotation_csv(tmp_path):
    write_class_folders(str(tmp_path), CLASSES, per_class=3, size=64, boxes=True)
    boxes = compose.read_boxes(str(tmp_path / "annotation.csv"))
    assert len(boxes) == 12 and compose.default_boxes_uri(str(tmp_path)) == str(tmp_path / "annotation.csv")
    uris = [str(tmp_path / name / "pic_0001.jpg") for name in CLASSES]
    table = compose.attach_boxes(__import__("pandas").DataFrame({"uri": uris}), boxes)
    out = decode_batch({"uri": np.array(uris, dtype=object), "label_index": np.arange(4), "box": np.stack(table["box"].map(np.asarray))},
                       SIZE, cells=True)
    assert out["has_background"].any() and (out["error"] == "").all()
    for k in range(4):
        assert _shows_colour(out["image"][k], k) and not (out["has_background"][k] and _shows_colour(out["background"][k], k))
    (tmp_path / "bad.csv").write_text("path,x1,y1,x2,y2,character\nbart/pic_0001.jpg,ten,1,2,3,bart\n")
    with pytest.raises(UserError, match="is not a box file"):
        compose.read_boxes(str(tmp_path / "bad.csv"))
    with pytest.raises(UserError, match="does not exist"):
        compose.read_boxes(str(tmp_path / "missing.csv"))


def test_thresholds_are_each_characters_best_f1_cut():
    scores = np.array([[0.9, 0.2], [0.8, 0.6], [0.7, 0.55], [0.3, 0.5], [0.1, 0.1]])
    targets = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [0, 0]])
    thresholds = multilabel.choose_thresholds(scores, targets)
    # Character 0: keeping the top two gives F1 1.0; the cut sits between 0.8 and 0.7.
    # Character 1: keeping 0.6 and 0.55 gives F1 1.0; the cut sits between 0.55 and 0.5.
    np.testing.assert_allclose(thresholds, [0.75, 0.525])
    np.testing.assert_array_equal(multilabel.predicted_sets(scores, thresholds), targets.astype(bool))
    # A character never on screen in validation keeps the default.
    assert multilabel.choose_thresholds(scores, np.zeros_like(targets))[0] == multilabel.DEFAULT_THRESHOLD


def test_thresholds_by_counts_name_each_character_on_as_many_frames_as_it_is_on():
    scores = np.array([[0.9, 0.2], [0.8, 0.6], [0.7, 0.55], [0.3, 0.5], [0.1, 0.4]])
    targets = np.array([[1, 0], [0, 1], [1, 0], [0, 0], [0, 0]])
    thresholds = multilabel.count_thresholds(scores, targets)
    # Character 0 is on 2 frames: the cut falls between its 2nd and 3rd highest scores, 0.8 and 0.7;
    # character 1 is on 1 frame: between 0.6 and 0.55. Each is then named on exactly its count of frames,
    # though character 0's second frame is the wrong one (F1 0.5; the F1 rule cuts lower, at 0.5, for F1 0.8
    # and one frame too many).
    np.testing.assert_allclose(thresholds, [0.75, 0.575])
    said = multilabel.predicted_sets(scores, thresholds)
    assert said.sum(axis=0).tolist() == targets.sum(axis=0).tolist() == [2, 1]
    assert multilabel.report(said, targets, ["a", "b"])["screen_time_error"] == 0.0
    np.testing.assert_allclose(multilabel.choose_thresholds(scores, targets), [0.5, 0.575])
    # A character never on screen in validation keeps the default.
    assert multilabel.count_thresholds(scores, np.zeros_like(targets))[0] == multilabel.DEFAULT_THRESHOLD


def test_temperature_and_thresholds_come_from_validation_only():
    from simpsons_ray.train.scores import multilabel_results

    rng = np.random.default_rng(1)
    targets = (rng.random((300, 4)) < 0.35).astype(np.float32)
    logits = (targets * 2 - 1) * rng.uniform(0, 4, (300, 4)) + rng.normal(0, 1.5, (300, 4))

    def frames(lg, tg):
        return {"logits": lg, "target": tg}

    scored = {"validation": frames(logits, targets), "test": frames(logits[:100], targets[:100])}
    temperature, thresholds, results = multilabel_results(scored, CLASSES)
    # Any test split, however wrong, leaves them as they are, and is scored with them...
    flipped = {"validation": scored["validation"], "test": frames(-logits[:100], targets[:100])}
    again = multilabel_results(flipped, CLASSES)
    assert again[0] == temperature and np.array_equal(again[1], thresholds)
    assert again[2]["test"]["macro_f1"] < 0.3 < results["test"]["macro_f1"]
    # ...while other validation frames move them.
    other = multilabel_results({"validation": frames(logits * 3 + 1, targets), "test": scored["test"]}, CLASSES)
    assert other[0] != temperature and not np.array_equal(other[1], thresholds)
    assert results["validation"]["calibration"]["temperature"] == temperature


def test_set_metrics_and_screen_time_by_hand():
    truth = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]])
    said = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 1], [1, 0, 0]], dtype=bool)
    r = multilabel.report(said, truth, ["a", "b", "c"])
    assert r["per_class"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2,
                                                 "true_seconds": 2.0, "predicted_seconds": 3.0})
    assert r["per_class"]["b"]["f1"] == 0.0 and r["per_class"]["c"]["f1"] == 1.0
    assert r["macro_f1"] == pytest.approx((0.8 + 0.0 + 1.0) / 3)
    assert r["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # tp 3, fp 2, fn 1
    assert r["exact_set_accuracy"] == pytest.approx(2 / 5)  # frames 0 and 2
    assert r["nobody"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert r["screen_time_error"] == pytest.approx((1 / 2 + 0 + 0) / 3)  # b: 1 said of 1 true
    # A single-label model's set is its top-1, above a cut when given.
    probs = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    np.testing.assert_array_equal(multilabel.top1_sets(probs), [[1, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(multilabel.top1_sets(probs, 0.5), [[1, 0, 0], [0, 0, 0]])


def test_binary_temperature_fit_lowers_the_nll():
    rng = np.random.default_rng(0)
    targets = (rng.random((400, 5)) < 0.3).astype(np.float32)
    logits = np.where(targets > 0, 1.0, -1.0) * rng.uniform(0.5, 3, (400, 5)) * 4  # right, but far too sure
    logits[rng.random((400, 5)) < 0.1] *= -1
    t = calibration.fit_temperature(logits, targets, loss=multilabel.binary_nll)
    assert t > 1.5
    assert multilabel.binary_nll(logits, targets, t) < multilabel.binary_nll(logits, targets)


def _decoded(pictures, size: int) -> dict[str, np.ndarray]:
    """The training decode stage's output (``decode_batch`` with cells) for pictures given as (PIL image, label, box)."""
    out = _cells([(decode_rgb(encode(img)), k, box) for img, k, box in pictures], size)
    out["whole"] = np.stack([np.asarray(img.resize((size, size))) for img, _, _ in pictures])
    return out


def _characters(indices, n: int, seed: int, label=None, size: int = 64):
    """n generated pictures of the given synthetic characters in turn, labelled ``label`` (default: their index)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = indices[i % len(indices)]
        img, box = class_image_and_box(k, rng, size)
        out.append((img, k if label is None else label, box))
    return out


def test_a_model_trained_on_pictures_scenes_and_composed_frames_names_who_is_there_and_nobody_else():
    """The training step and collate the workers run, on generated pictures of 4 characters and of a stranger.

    It names the one character of a whole picture, both of a shared frame, nobody on an
    empty background, and nobody on a character it never saw, not even as a stranger
    (a purple bars: the strangers were a purple ring, cyan bars, a red rectangle and a
    green triangle). At 16 px (the characters are colours and shapes) a resnet18 learns
    this from scratch in 12 short epochs, with the default mix of frames; the thresholds
    are chosen on validation frames by counts, as ``train`` chooses them.
    """
    size = 16
    torch.manual_seed(0)
    preprocess = PreprocessConfig(image_size=size)
    known, stranger, never_seen = [0, 1, 2, 3], [4, 5, 6, 7], 10
    train = _decoded(_characters(known, 192, seed=5) + _characters(stranger, 48, seed=15, label=compose.STRANGER), size)
    collate = AugmentingCollate(AugmentConfig(rotation_deg=0, shift=0.05, zoom=0.05), num_classes=len(CLASSES), seed=0)
    model = build_model("resnet18", len(CLASSES), head_hidden=0, dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    recipe = StepRecipe(label_smoothing=0.1, whole_ce=Mix().whole_ce)
    losses = []
    for epoch in range(12):
        order = np.random.default_rng(epoch).permutation(len(train["label"]))
        batches = (collate({k: v[order[s:s + 32]] for k, v in train.items()}) for s in range(0, len(order), 32))
        losses.append(train_one_epoch(model, batches, optimizer, torch.device("cpu"), preprocess, recipe).loss)
    assert losses[-1] < 0.6 * losses[0], losses

    def named(frames: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            scores = multilabel.sigmoid(model.eval()(normalize(frames, preprocess)).numpy())
        return multilabel.predicted_sets(scores, thresholds)

    val = validation_frames(_decoded(_characters(known, 128, seed=6) + _characters(stranger, 32, seed=16, label=-1), size),
                            len(CLASSES), seed=7)
    complete = complete_truth(val)  # composed frames and strangers' pictures: who is there and who is not is known
    with torch.inference_mode():
        val_scores = multilabel.sigmoid(model.eval()(normalize(val["image"][complete], preprocess)).numpy())
    thresholds = choose_thresholds(val_scores, val["target"][complete], "count")

    test = _decoded(_characters(known, 64, seed=8), size)
    alone = named(test["whole"])  # a picture as it is: its one character, and no one else
    assert np.mean([set(np.flatnonzero(s)) == {k} for s, k in zip(alone, test["label"])]) >= 0.75, alone
    # Two characters side by side on a real background, and a background alone.
    backgrounds = test["background"][test["has_background"]]
    rng = np.random.default_rng(9)
    shared, wanted = [], []
    for i in range(12):
        a, b = 4 * i, 4 * i + 1  # consecutive pictures are different characters
        frame = backgrounds[i].copy()
        compose._paste(frame, test["image"][a], float(test["aspect"][a]), (0, size // 2), rng)
        compose._paste(frame, test["image"][b], float(test["aspect"][b]), (size // 2, size), rng)
        shared.append(frame)
        wanted.append({int(test["label"][a]), int(test["label"][b])})
    said_shared = named(np.stack(shared))
    assert np.mean([set(np.flatnonzero(s).tolist()) == w for s, w in zip(said_shared, wanted)]) >= 0.75, (said_shared, wanted)
    assert np.mean(~named(backgrounds[:12]).any(axis=1)) >= 0.75
    # A character it never saw: no trained name for it.
    unseen = _decoded(_characters([never_seen], 24, seed=10), size)["whole"]
    assert np.mean(~named(unseen).any(axis=1)) >= 0.75, named(unseen)


def test_both_objectives_are_scored_by_the_same_figures_on_pictures_and_on_strangers():
    """evaluate's figures on pictures (one character each) and on characters the model does not know, checked by hand."""
    from types import SimpleNamespace

    from simpsons_ray.train.evaluation import false_name_rate, picture_figures

    classes = ["a", "b", "c"]
    logits = np.array([[3.0, 0.0, -1.0], [0.0, 2.0, 1.0], [0.5, 0.0, 1.0], [-2.0, -2.0, -2.0]])
    labels = np.array([0, 1, 0, 2])
    single = SimpleNamespace(objective="single", classes=classes, temperature=1.0, thresholds=None)
    multi = SimpleNamespace(objective="multilabel", classes=classes, temperature=1.0, thresholds=[0.5, 0.5, 0.5])
    for artifact in (single, multi):
        figures = picture_figures(artifact, logits, labels)
        # The top-1: a, b, c, and a tie resolved to the first (a): right on 2 of 4.
        assert figures["accuracy"] == 0.5 and figures["num_images"] == 4
        assert {"macro_f1", "per_class", "confusion_matrix", "calibration"} <= set(figures)
        assert 0 <= figures["calibration"]["ece_after"] <= 1
    multi_figures = picture_figures(multi, logits, labels)
    # sigmoid >= 0.5 where the logit >= 0: named [a, b], [a, b, c], [a, b, c], nobody.
    assert multi_figures["named_recall"] == 0.75 and multi_figures["named_exactly"] == 0.0 and multi_figures["named_nobody"] == 0.25
    # A softmax names its top-1 on every picture; a sigmoid model only where a score reaches its threshold.
    assert false_name_rate(single, logits) == 1.0 and false_name_rate(single, logits, min_confidence=0.95) == 0.0
    assert false_name_rate(multi, logits) == 0.75 and false_name_rate(multi, logits, min_confidence=0.99) == 0.0


def test_composed_frames_count_the_pictures_that_do_not_decode(tmp_path):
    """evaluate --composites leaves out pictures that do not decode, and says how many (it dropped them silently)."""
    import pandas as pd

    from simpsons_ray.train.evaluation import composite_frames

    rng = np.random.default_rng(4)
    rows = []
    for i in range(12):
        path = tmp_path / f"pic_{i}.png"
        path.write_bytes(encode(class_image_and_box(i % 3, rng, 48)[0], "PNG") if i % 4 else b"not a picture")
        rows.append({"uri": str(path), "label": ["a", "b", "c"][i % 3]})
    skipped: list[str] = []
    composite = composite_frames(pd.DataFrame(rows), ["a", "b", "c"], 20, 32, 0, None, skipped)
    assert sorted(skipped) == sorted(str(tmp_path / f"pic_{i}.png") for i in (0, 4, 8))
    assert len(composite.targets) == 20
