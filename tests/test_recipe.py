"""The training recipe's parts, one by one: optimizer, schedule, mixing, augmentation, EMA, calibration."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from simpsons_ray import cli
from simpsons_ray.model import calibration
from simpsons_ray.model.network import build_model
from simpsons_ray.model.preprocess import AugmentConfig, TrainAugment
from simpsons_ray.train.config import Phase, TrainConfig, recipe_defaults, recorded_config
from simpsons_ray.train.data import AugmentingCollate
from simpsons_ray.train.recipe import BatchMix, LrSchedule, WeightEma, flip_tta, make_optimizer
from simpsons_ray.train.state import TrainState
from simpsons_ray.train.worker import _Worker


def _parse_train(*flags: str) -> TrainConfig:
    """The TrainConfig that `simpsons-ray train` builds from these flags."""
    return cli.train_config(cli.build_parser().parse_args(["train", "--data", "d", "--output", "o", *flags]))


def test_notebook_recipe_is_the_old_optimizer_and_schedule():
    config = _parse_train("--recipe", "notebook")
    assert (config.optimizer, config.lr, config.finetune_lr, config.weight_decay) == ("adam", 1e-3, 1e-4, 0.0)
    assert (config.lr_schedule, config.lr_patience, config.lr_factor) == ("plateau", 1, 0.1)
    assert (config.label_smoothing, config.ema_decay, config.tta_flip, config.mixup_alpha, config.cutmix_alpha) == (0, 0, False, 0, 0)
    assert (config.head_hidden, config.dropout) == (512, 0.5)  # Dense(512) + Dropout(0.5)
    assert [type(m).__name__ for m in build_model("resnet18", 3, config.head_hidden, config.dropout).fc] == [
        "Linear", "ReLU", "Dropout", "Linear"]
    assert config.augment == AugmentConfig(rotation_deg=15.0, shift=0.1, zoom=0.1, hflip=True, policy="none", erasing=0.0)
    optimizer = make_optimizer(build_model("resnet18", 3).parameters(), config.optimizer, config.lr, config.weight_decay)
    assert type(optimizer) is torch.optim.Adam and len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    schedule = LrSchedule(optimizer, config.lr_schedule, config.lr, 10, config.warmup_epochs, config.lr_patience)
    lrs = []
    for val_loss in (1.0, 0.9, 0.95, 0.96, 0.97, 0.98):  # Keras' ReduceLROnPlateau(patience=1, factor=0.1)
        schedule.set_progress(len(lrs) + 0.5)  # never moves a plateau LR
        schedule.end_epoch(val_loss)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5])


def test_default_recipe_and_single_knob_overrides():
    assert _parse_train() == TrainConfig.for_recipe("default", data_uris=("d",), output_uri="o") == TrainConfig(data_uris=("d",), output_uri="o")
    config = _parse_train("--recipe", "notebook", "--ema-decay", "0.9", "--augment", "randaugment", "--tta-flip")
    assert (config.recipe, config.optimizer, config.ema_decay, config.tta_flip) == ("notebook", "adam", 0.9, True)
    assert config.augment.policy == "randaugment"
    off = _parse_train("--no-tta-flip", "--ema-decay", "0", "--augment", "none")
    assert (off.tta_flip, off.ema_decay, off.augment.policy, off.optimizer) == (False, 0.0, "none", recipe_defaults("default")["optimizer"])
    linear = build_model("resnet18", 3, off.head_hidden, off.dropout).fc
    assert off.head_hidden == 0 and [type(m).__name__ for m in linear] == ["Dropout", "Linear"]
    # AdamW: decoupled decay on weights, none on BatchNorm scales and biases.
    model = build_model("resnet18", 3)
    optimizer = make_optimizer(model.parameters(), "adamw", 1e-3, 0.05)
    assert type(optimizer) is torch.optim.AdamW
    decays = {p.ndim > 1: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays == {True: 0.05, False: 0.0}


def test_records_older_than_recipes_resume_as_the_notebook_recipe():
    old_record = {k: v for k, v in TrainConfig.for_recipe("notebook").to_dict().items()
                  if k not in ("recipe", "optimizer", "weight_decay", "warmup_epochs", "label_smoothing", "mixup_alpha",
                               "cutmix_alpha", "ema_decay", "tta_flip", "test_fraction")}
    old_record["augment"] = {"rotation_deg": 15.0, "shift": 0.1, "zoom": 0.1, "hflip": True}
    assert recorded_config(old_record) == TrainConfig.for_recipe("notebook", test_fraction=0.0).to_dict()


def test_mixup_and_cutmix_targets_sum_to_one_and_carry_the_labels():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    y = torch.arange(16) % 4
    for mix in (BatchMix(4, mixup_alpha=0.4), BatchMix(4, cutmix_alpha=1.0), BatchMix(4, 0.4, 1.0)):
        for _ in range(5):
            mixed, target = mix(x, y)
            assert mixed.shape == x.shape and target.shape == (16, 4)
            torch.testing.assert_close(target.sum(1), torch.ones(16))
            # Each row's mass sits on its own label and (for the partner it was mixed with) one other.
            own = target[torch.arange(16), y]
            assert (own >= 0).all() and ((target > 0).sum(1) <= 2).all()
            # torchvision mixes each image with its neighbour in the batch: partner = roll by 1.
            partner = y.roll(1)
            rebuilt = torch.zeros_like(target)
            lam = own.where(partner != y, torch.ones_like(own))
            rebuilt[torch.arange(16), y] += lam
            rebuilt[torch.arange(16), partner] += 1 - lam
            torch.testing.assert_close(rebuilt, target)
    plain = BatchMix(4)
    assert not plain.enabled
    same, onehot = plain(x, y)
    assert same is x and onehot.argmax(1).tolist() == y.tolist()


def test_augmentation_policies_keep_shape_dtype_and_labels():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(8, dtype=np.int64)
    for policy in ("none", "trivialaugment", "randaugment"):
        torch.manual_seed(1)
        collate = AugmentingCollate(AugmentConfig(policy=policy, erasing=1.0))
        batch = collate({"image": images, "label": labels})
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 32, 32, 3)
        assert batch["label"].tolist() == labels.tolist()
        assert not torch.equal(batch["image"], torch.from_numpy(images))
    # Erasing paints one rectangle in the mean colour.
    erase = TrainAugment(AugmentConfig(rotation_deg=0, shift=0, zoom=0, hflip=False, erasing=1.0))
    flat = np.full((32, 32, 3), 7, dtype=np.uint8)
    out = erase(flat)
    painted = np.all(out == np.array([124, 116, 104], dtype=np.uint8), axis=2)
    assert painted.sum() > 0 and np.all(out[~painted] == 7)
    with pytest.raises(ValueError, match="unknown augmentation policy"):
        TrainAugment(AugmentConfig(policy="autoaugment-v9"))


def test_weight_ema_averages_and_warms_up():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = WeightEma(model, decay=0.9)
    values = []
    for step in range(1, 201):
        with torch.no_grad():
            model.weight.fill_(float(step))
        ema.update_parameters(model)
        values.append(float(ema.module.weight[0, 0].detach()))
    # Warm-up: the first decays are (1+n)/(10+n) = 0.1, 0.18, ..., so the average follows the
    # weights closely at first: the first update copies, the second keeps 2/11 of the average...
    assert values[0] == pytest.approx(1.0) and values[1] == pytest.approx(2 / 11 * 1 + 9 / 11 * 2)
    # ... and once the decay has reached 0.9 it lags a linear ramp by decay/(1-decay) = 9 steps.
    assert 200 - values[-1] == pytest.approx(9.0, abs=0.1)


def test_resuming_mid_phase_restores_the_ema_weights_and_optimizer():
    config = TrainConfig(arch="resnet18", weights="none", ema_decay=0.99, finetune_epochs=3)
    model = build_model("resnet18", 3)
    ema = WeightEma(model, 0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    ema.update_parameters(model)
    ema.update_parameters(model)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    state = TrainState(phase_index=0, epoch_in_phase=1, epoch=1, model=copy.deepcopy(model.state_dict()), ema=saved, history=[])
    worker = _Worker(config, 3, 0, 1, torch.device("cpu"), None, None, 10)
    worker.model, worker.state, worker.phases = model, state, [Phase("full", 3, 1e-3, "all")]
    parts = worker._start_phase(worker.phases[0])
    assert parts.ema is not None and int(parts.ema.n_averaged) == 2
    for key, value in parts.ema.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    assert not torch.equal(parts.eval_model.conv1.weight, model.conv1.weight)  # validation scores the average
    # A new phase (epoch_in_phase 0) starts its average from the current weights.
    state.epoch_in_phase = 0
    fresh = worker._start_phase(worker.phases[0])
    torch.testing.assert_close(fresh.ema.module.conv1.weight, model.conv1.weight)


def test_flip_tta_averages_the_mirror():
    model = build_model("resnet18", 3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = (model(x) + model(x.flip(3))) / 2
        torch.testing.assert_close(flip_tta(model, x), expected)
        torch.testing.assert_close(flip_tta(model, x.flip(3)), expected, rtol=1e-4, atol=1e-5)  # mirror-invariant


# ------------------------------------------------------------------------- calibration
def _miscalibrated(n: int = 4000, classes: int = 5, sharpen: float = 4.0, seed: int = 0):
    """Labels drawn from softmax(true logits); the model reports the logits times ``sharpen`` (overconfident)."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 1.5, (n, classes))
    probs = calibration.softmax(true_logits)
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return true_logits * sharpen, labels


def test_temperature_fit_recovers_the_sharpening_and_lowers_nll_and_ece():
    logits, labels = _miscalibrated(sharpen=4.0)
    temperature = calibration.fit_temperature(logits, labels)
    assert temperature == pytest.approx(4.0, rel=0.1)
    result = calibration.summary(logits, labels, temperature)
    assert result["nll_after"] < result["nll_before"] - 0.3
    assert result["ece_after"] < 0.03 < result["ece_before"]
    # The top-1 class never changes, and an underconfident model gets T < 1.
    assert (calibration.softmax(logits, temperature).argmax(1) == logits.argmax(1)).all()
    soft_logits, soft_labels = _miscalibrated(sharpen=0.5, seed=1)
    assert calibration.fit_temperature(soft_logits, soft_labels) == pytest.approx(0.5, rel=0.1)
    assert calibration.fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=np.int64)) == 1.0


def test_ece_and_reliability_bins_by_hand():
    # Two images at confidence 0.9 (one right), two at 0.6 (both right).
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    rel = calibration.reliability(probs, labels, bins=10)
    assert rel.count.sum() == 4 and rel.count[8] == 2 and rel.count[5] == 2
    assert rel.accuracy[8] == pytest.approx(0.5) and rel.confidence[8] == pytest.approx(0.9)
    assert rel.accuracy[5] == pytest.approx(1.0) and rel.confidence[5] == pytest.approx(0.6)
    assert rel.ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
