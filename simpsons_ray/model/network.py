"""The network: a torchvision ResNet with this project's head; which parts train; BatchNorm folded for inference."""

from __future__ import annotations

import copy
import io
from typing import Iterable

import torch
from torch import nn
from torchvision import models

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError

ARCHS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights),
    "resnet34": (models.resnet34, models.ResNet34_Weights),
    "resnet50": (models.resnet50, models.ResNet50_Weights),
    "resnet101": (models.resnet101, models.ResNet101_Weights),
}
STAGES = ("layer1", "layer2", "layer3", "layer4")


def build_model(arch: str, num_classes: int, head_hidden: int = 512, dropout: float = 0.5) -> nn.Module:
    """A randomly initialised ResNet whose fc is GAP -> Linear(hidden) -> ReLU -> Dropout -> Linear.

    ``head_hidden=0`` gives torchvision's own head, GAP -> Dropout -> Linear.
    """
    if arch not in ARCHS:
        raise UserError(f"Unknown --arch {arch!r}: choose one of {', '.join(ARCHS)}.")
    model = ARCHS[arch][0](weights=None)
    # ResNet already ends in global average pooling (model.avgpool); only fc changes.
    if head_hidden:
        model.fc = nn.Sequential(
            nn.Linear(model.fc.in_features, head_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(head_hidden, num_classes),
        )
    else:
        model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, num_classes))
    return model


def load_backbone_weights(model: nn.Module, arch: str, weights: str) -> str:
    """Load pretrained backbone weights into ``model``; returns a description.

    ``weights`` is ``imagenet`` (torchvision's IMAGENET1K enum: from the torch hub
    cache, else downloaded), ``none`` (keep the random init), or a path/URI of a
    state dict (a plain torchvision ResNet's, or a full simpsons-ray model's).
    The head (``fc``) is never taken from ImageNet: its shape is ours.
    """
    if weights == "none":
        return "random init"
    if weights == "imagenet":
        enum = ARCHS[arch][1].DEFAULT
        try:
            state = enum.get_state_dict(progress=False)
        except Exception as exc:
            raise UserError(
                f"Cannot get the ImageNet weights for {arch} ({enum.url}): {exc}. "
                "Put the file in the torch hub cache ($TORCH_HOME/hub/checkpoints), or pass "
                "--weights PATH_OR_URI, or --weights none."
            ) from None
        source = f"torchvision {enum}"
    else:
        if not storage.exists(weights):
            raise UserError(f"--weights {weights} does not exist: give a state dict path or URI, 'imagenet' or 'none'.")
        try:
            state = torch.load(io.BytesIO(storage.read_bytes(weights)), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"--weights {weights} is not a PyTorch state dict: {exc}.") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        source = weights
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(
            f"--weights {weights} does not fit {arch}: {len(missing)} missing and "
            f"{len(unexpected)} unexpected tensors (first: {(missing + list(unexpected))[0]})."
        )
    return source


def set_trainable(model: nn.Module, stages: Iterable[str] | str) -> None:
    """Train the head plus the named residual stages; ``"all"`` trains everything."""
    if stages == "all":
        for p in model.parameters():
            p.requires_grad = True
        return
    stages = list(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise UserError(f"Unknown stage(s) {unknown} in --unfreeze: choose from {', '.join(STAGES)}.")
    for name, p in model.named_parameters():
        top = name.split(".", 1)[0]
        p.requires_grad = top == "fc" or top in stages


def freeze_frozen_batchnorm(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are frozen into eval mode.

    Call after every ``model.train()``: a frozen stage must not keep updating its
    running mean/var from our batches, or the pretrained features drift although
    no weight changed.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of a torchvision ResNet with every BatchNorm folded into its convolution.

    In inference a BatchNorm is a per-channel scale and shift, which the
    convolution before it can absorb; the outputs agree to float rounding. On a
    2-core CPU, folding plus channels_last ran resnet18 at 64 px about 35% faster.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()

    def fold(parent: nn.Module, conv: str, bn: str) -> None:
        setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
        setattr(parent, bn, nn.Identity())

    fold(model, "conv1", "bn1")
    for stage in STAGES:
        for block in getattr(model, stage):
            for i in (1, 2, 3):  # BasicBlock has two conv/bn pairs, Bottleneck three
                if hasattr(block, f"conv{i}"):
                    fold(block, f"conv{i}", f"bn{i}")
            if block.downsample is not None:
                fold(block.downsample, "0", "1")  # Sequential(conv, bn): children named "0", "1"
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


