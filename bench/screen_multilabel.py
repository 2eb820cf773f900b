"""Multi-label screening: what a batch of training frames is made of, one variant at a time, on validation only.

One process, no Ray, the library's model, augmentation and composition; the test
split is never loaded, so choosing here cannot leak into ``bench_multilabel.py``'s
test figures. Each variant is a JSON object of knobs over BASE:

- ``whole``, ``scene``, ``comp``: shares of a batch's frames that are a whole picture,
  a scene of two or three whole pictures (side by side, or one inset in another),
  and a frame composed from box crops on a background (0-3 characters);
- ``w_other``: the weight of the "absent" loss of the characters a whole picture or
  scene does not name (they may be in it: the data does not say);
- ``ce``: the weight of a softmax cross-entropy over the logits on whole pictures;
- ``unknown``: pictures of the characters under 200 pictures, as "someone else":
  whole pictures whose every known character is absent (weight ``w_unknown``) and
  crops pasted into composed frames as strangers.

Validation, at the end: top-1 on whole pictures of the known characters; on frames
composed from validation pictures, thresholds chosen (max F1, or matching counts) on
one half and scored on the other (macro-F1, nobody recall, screen-time error, and the
model's own top-1 read as a set); the false-name rate on validation pictures of the
strangers it trained against, and on every picture of a third of them that it never
saw ("withheld").

    python bench/screen_multilabel.py '{"name": "comp"}' '{"name": "mix", "whole": 0.5, "comp": 0.5}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from simpsons_ray.core import storage  # noqa: E402
from simpsons_ray.media.images import decode_rgb  # noqa: E402
from simpsons_ray.model import multilabel  # noqa: E402
from simpsons_ray.model.multilabel import count_thresholds  # noqa: E402
from simpsons_ray.model.network import build_model  # noqa: E402
from simpsons_ray.model.preprocess import AugmentConfig, PreprocessConfig, TrainAugment, normalize, resize  # noqa: E402
from simpsons_ray.train import compose, datasets  # noqa: E402
from simpsons_ray.train.recipe import LrSchedule, make_optimizer  # noqa: E402

DEFAULT_ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "simpsons-kaggle")
BASE = dict(whole=0.0, scene=0.0, comp=1.0, w_other=0.0, ce=0.0, bce=1.0, unknown=False, w_unknown=1.0, lr=2e-3, seed=0,
            count_weights=list(compose.COUNT_WEIGHTS))


def _decode(uri: str, box, size: int) -> tuple:
    img = decode_rgb(storage.read_bytes(uri))
    cell, aspect, background = compose.cut(img, box, size)
    return resize(img, size), cell, aspect, background


def load(root: str, size: int, cap: int, seed: int = 0) -> dict:
    images = datasets.list_labelled_images(os.path.join(root, "train"))
    counts = images["label"].value_counts()
    known_names = sorted(counts[counts >= 200].index)
    strangers = sorted(counts[counts < 200].index)
    withheld = strangers[::3]
    seen = [n for n in strangers if n not in withheld]
    boxes = compose.read_boxes(os.path.join(root, "annotation.csv"))
    known = datasets.cap_per_class(images[images["label"].isin(known_names)].reset_index(drop=True), cap, seed)
    split = datasets.stratified_split(known, 0.15, seed, 0.15)
    others = datasets.stratified_split(images[images["label"].isin(seen)].reset_index(drop=True), 0.15, seed, 0.15)
    never = images[images["label"].isin(withheld)].reset_index(drop=True)
    parts = {"train": (split.train, True), "val": (split.val, True), "other_train": (others.train, False),
             "other_val": (others.val, False), "withheld": (never, False)}
    out: dict = {"classes": split.classes}
    with ThreadPoolExecutor(4) as pool:
        for name, (table, is_known) in parts.items():
            table = compose.attach_boxes(table, boxes)
            decoded = list(pool.map(lambda r: _decode(r.uri, r.box, size), table.itertuples(index=False)))
            out[name] = {
                "whole": np.stack([d[0] for d in decoded]), "cell": np.stack([d[1] for d in decoded]),
                "aspect": np.array([d[2] for d in decoded], np.float32),
                "background": np.stack([d[3] if d[3] is not None else np.zeros_like(d[0]) for d in decoded]),
                "has_background": np.array([d[3] is not None for d in decoded]),
                "label": table["label_index"].to_numpy() if is_known else np.full(len(table), -1),
            }
    return out


# ---------------------------------------------------------------- frames of a batch
def scene(wholes: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Two or three whole pictures side by side (each a centre crop, squeezed into its panel), or one inset in another."""
    size = wholes[0].shape[0]
    if len(wholes) == 2 and rng.random() < 0.4:  # picture in picture
        frame = wholes[0].copy()
        side = int(size * rng.uniform(0.35, 0.55))
        x, y = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        frame[y : y + side, x : x + side] = np.asarray(Image.fromarray(wholes[1]).resize((side, side), Image.BILINEAR))
        return frame
    edges = np.linspace(0, size, len(wholes) + 1).astype(int)
    frame = np.empty_like(wholes[0])
    for j, picture in enumerate(wholes):
        width = edges[j + 1] - edges[j]
        keep = int(size * rng.uniform(width / size, 1.0))  # a centre crop of this width, squeezed to the panel
        left = (size - keep) // 2
        frame[:, edges[j] : edges[j + 1]] = np.asarray(Image.fromarray(picture[:, left : left + keep]).resize((width, size), Image.BILINEAR))
    return frame


def batch_frames(b: dict, idx: np.ndarray, classes: int, rng: np.random.Generator, k: dict) -> dict:
    """The frames, targets, loss weights and softmax labels of one batch of pictures."""
    n = len(idx)
    label = b["label"][idx]
    shares = np.array([k["whole"], k["scene"], k["comp"]], dtype=np.float64)
    kind = rng.choice(3, size=n, p=shares / shares.sum())
    size = b["whole"].shape[1]
    images = np.empty((n, size, size, 3), np.uint8)
    targets = np.zeros((n, classes), np.float32)
    weights = np.ones((n, classes), np.float32)
    ce_label = np.full(n, -1, np.int64)
    known = np.flatnonzero(label >= 0)
    for i in np.flatnonzero(kind == 0):
        images[i] = b["whole"][idx[i]]
        if label[i] >= 0:
            weights[i] = k["w_other"]
            weights[i, label[i]] = 1.0
            targets[i, label[i]] = 1.0
            ce_label[i] = label[i]
        else:
            weights[i] = k["w_unknown"]
    for i in np.flatnonzero(kind == 1):
        others = rng.choice(n, size=int(rng.integers(1, 3)), replace=False)
        members = [i] + [int(o) for o in others if o != i][:2]
        images[i] = scene([b["whole"][idx[m]] for m in members], rng)
        weights[i] = k["w_other"]
        for m in members:
            if label[m] >= 0:
                targets[i, label[m]] = 1.0
                weights[i, label[m]] = 1.0
    comp = np.flatnonzero(kind == 2)
    if len(comp):
        pool = np.arange(n) if k["unknown"] else known
        backgrounds = b["background"][idx][b["has_background"][idx]]
        made = compose.compose(b["cell"][idx[pool]], b["aspect"][idx[pool]], label[pool], backgrounds, classes, rng, len(comp),
                               tuple(k["count_weights"]))
        images[comp], targets[comp] = made.images, made.targets
    return {"images": images, "targets": targets, "weights": weights, "ce_label": ce_label}


# ---------------------------------------------------------------- train and score
def logits_of(model: nn.Module, images: np.ndarray, prep: PreprocessConfig) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), 256):
            out.append(model(normalize(torch.from_numpy(images[i : i + 256]), prep)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def score(model: nn.Module, data: dict, prep: PreprocessConfig, seed: int, frames: int) -> dict:
    classes = len(data["classes"])
    val = data["val"]
    whole_logits = logits_of(model, val["whole"], prep)
    out = {"top1_whole": float((whole_logits.argmax(1) == val["label"]).mean())}
    rng = np.random.default_rng(seed + 1000)
    backgrounds = val["background"][val["has_background"]]
    made = compose.compose(val["cell"], val["aspect"], val["label"], backgrounds, classes, rng, frames, compose.EVAL_COUNT_WEIGHTS)
    scores = multilabel.sigmoid(logits_of(model, made.images, prep))
    half = frames // 2
    a, b = slice(0, half), slice(half, frames)
    whole_scores = multilabel.sigmoid(whole_logits)
    stranger_scores = multilabel.sigmoid(logits_of(model, data["other_val"]["whole"], prep))
    # As the library chooses them: on the frames whose truth is whole, composed frames and strangers' pictures (nobody).
    union_scores = np.concatenate([scores[a], stranger_scores])
    whole_targets = np.zeros((len(val["label"]), classes), np.float32)
    whole_targets[np.arange(len(val["label"])), val["label"]] = 1
    union_targets = np.concatenate([made.targets[a], np.zeros((len(stranger_scores), classes), np.float32)])
    rules = (("f1", multilabel.choose_thresholds, False), ("count", count_thresholds, False), ("lib-count", count_thresholds, True),
             ("lib-f1", multilabel.choose_thresholds, True))
    for how, choose, union in rules:
        cut = choose(union_scores, union_targets) if union else choose(scores[a], made.targets[a])
        r = multilabel.report(multilabel.predicted_sets(scores[b], cut), made.targets[b], data["classes"])
        listed = multilabel.predicted_sets(whole_scores, cut)
        exact = listed[np.arange(len(listed)), val["label"]] & (listed.sum(1) == 1)
        out[how] = {"macro_f1": r["macro_f1"], "nobody_r": r["nobody"]["recall"], "screen_err": r["screen_time_error"],
                    "exact_set": r["exact_set_accuracy"], "whole_exact": float(exact.mean()),
                    "whole_recall": float(listed[np.arange(len(listed)), val["label"]].mean())}
        for part in ("other_val", "withheld"):
            named = multilabel.predicted_sets(multilabel.sigmoid(logits_of(model, data[part]["whole"], prep)), cut).any(1)
            out[how][f"false_name_{part}"] = float(named.mean())
    # Calibration of the top-1 score on the pictures (half B), by where the temperature is fitted.
    comp_logits = logits_of(model, made.images, prep)
    half_w = len(whole_logits) // 2
    wa, wb = slice(0, half_w), slice(half_w, len(whole_logits))
    correct = whole_logits.argmax(1) == val["label"]

    def top1_nll(logits, right, t):
        p = np.clip(multilabel.sigmoid(logits.max(1), t), 1e-12, 1 - 1e-12)
        return float(-np.mean(np.where(right, np.log(p), np.log(1 - p))))

    from simpsons_ray import calibration as cal
    union_logits = np.concatenate([comp_logits[a], whole_logits[wa]])
    union_t = np.concatenate([made.targets[a], whole_targets[wa]])
    temps = {"comp": cal.fit_temperature(comp_logits[a], made.targets[a], loss=multilabel.binary_nll),
             "union": cal.fit_temperature(union_logits, union_t, loss=multilabel.binary_nll),
             "top1": cal.fit_temperature(whole_logits[wa], correct[wa], loss=lambda lg, y, t=1.0: top1_nll(lg, y, t))}
    out["ece_pictures"] = {name: cal.binned(multilabel.sigmoid(whole_logits[wb].max(1), t), correct[wb]).ece for name, t in temps.items()}
    out["ece_pictures"]["T1"] = cal.binned(multilabel.sigmoid(whole_logits[wb].max(1)), correct[wb]).ece
    out["temperatures"] = temps
    top1 = multilabel.report(multilabel.top1_sets(scores[b]), made.targets[b], data["classes"])
    out["own_top1_macro_f1"] = top1["macro_f1"]
    return out


def run(data: dict, size: int, epochs: int, frames: int, name: str, **knobs) -> dict:
    k = BASE | knobs
    torch.manual_seed(k["seed"])
    torch.set_num_threads(os.cpu_count() or 1)
    classes = len(data["classes"])
    prep = PreprocessConfig(image_size=size)
    model = build_model("resnet18", classes, 0, 0.0)
    optimizer = make_optimizer(model.parameters(), "adamw", k["lr"], 0.05)
    train = data["train"]
    if k["unknown"]:
        train = {key: np.concatenate([train[key], data["other_train"][key]]) for key in train}
    batch = 64
    steps = int(np.ceil(len(train["label"]) / batch))
    schedule = LrSchedule(optimizer, "cosine", k["lr"], epochs, 1.0)
    augment = TrainAugment(AugmentConfig())
    rng = np.random.default_rng(k["seed"])
    bce = nn.BCEWithLogitsLoss(reduction="none")
    ce = nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1, ignore_index=-1)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(train["label"]))
        total, seen, t0 = 0.0, 0, time.time()
        for step in range(steps):
            schedule.set_progress(epoch + step / steps)
            idx = order[step * batch : (step + 1) * batch]
            made = batch_frames(train, idx, classes, rng, k)
            x = normalize(torch.from_numpy(augment.batch(made["images"])), prep)
            logits = model(x)
            loss = k["bce"] * (bce(logits, torch.from_numpy(made["targets"])) * torch.from_numpy(made["weights"])).sum()
            if k["ce"] > 0 and (made["ce_label"] >= 0).any():
                loss = loss + k["ce"] * ce(logits, torch.from_numpy(made["ce_label"]))
            optimizer.zero_grad(set_to_none=True)
            (loss / len(idx)).backward()
            optimizer.step()
            total += loss.item()
            seen += len(idx)
        print(f"{name} epoch {epoch + 1} loss {total / seen:.3f} {seen / (time.time() - t0):.0f} img/s", flush=True)
    result = score(model, data, prep, k["seed"], frames)
    print(f"{name}: {json.dumps(result)}", flush=True)
    return {"name": name, "knobs": knobs, "result": result, "seconds": round(time.time() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="JSON objects of knobs, each with a name")
    parser.add_argument("--root", default=os.path.abspath(DEFAULT_ROOT))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-images-per-class", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--frames", type=int, default=2400, help="validation frames composed (half choose thresholds, half score)")
    args = parser.parse_args()
    data = load(args.root, args.image_size, args.max_images_per_class)
    print(f"{len(data['train']['label'])} training pictures of {len(data['classes'])} characters, "
          f"{len(data['other_train']['label'])} of strangers; validation {len(data['val']['label'])}, "
          f"{len(data['other_val']['label'])} of strangers, {len(data['withheld']['label'])} withheld", flush=True)
    results = [run(data, args.image_size, args.epochs, args.frames, **json.loads(text)) for text in args.variants]
    print(f"\n{args.image_size} px, {args.epochs} epochs; thresholds chosen on half the validation frames, scored on the other")
    head = ("variant", "top1", "own_t1_F1", "thr", "macro_F1", "nobody_R", "screen_err", "whole_exact", "false_val", "false_new", "s")
    print(("{:<14}" + " {:>10}" * (len(head) - 1)).format(*head))
    for r in results:
        x = r["result"]
        for how in ("f1", "count", "lib-count", "lib-f1"):
            y = x[how]
            print(("{:<14}" + " {:>10.4f}" * 2 + " {:>10}" + " {:>10.4f}" * 6 + " {:>10}").format(
                r["name"], x["top1_whole"], x["own_top1_macro_f1"], how, y["macro_f1"], y["nobody_r"], y["screen_err"],
                y["whole_exact"], y["false_name_other_val"], y["false_name_withheld"], r["seconds"]))


if __name__ == "__main__":
    main()
