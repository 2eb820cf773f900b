"""The model a run starts from (``train --init-from MODEL``): what it fixes, its head grown to new characters, its lineage.

A review loop trains on: people correct the frames a model was unsure of, and the
next run starts from that model, on the corrections plus the original data. The run
keeps the model's characters in their order (one the new data lacks stays in the
head), appends the data's new ones (fresh head rows; the old rows are copied), and
takes the model's arch, image size, head and objective: a flag that says otherwise
is refused in one sentence. The new artifact's ``lineage`` names the model, then the
model's own lineage (:attr:`simpsons_ray.model.artifact.Artifact.lineage`).
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from simpsons_ray.core import storage
from simpsons_ray.core.errors import UserError, storage_failure
from simpsons_ray.model.artifact import WEIGHTS_FILE, read_artifact_config, weights_id
from simpsons_ray.train.config import TrainConfig, flag_of, parent_settings


@dataclass(frozen=True)
class Parent:
    """A model artifact a run starts from."""

    uri: str
    config: dict[str, Any]  # its config.json
    classes: list[str]
    model_id: str


def read_parent(uri: str) -> Parent:
    """The artifact at ``uri``; one sentence if it is not one."""
    config, classes = read_artifact_config(uri, flag="--init-from")
    model_id = config.get("model_id") or weights_id(_weights(uri), config["arch"])
    return Parent(uri, config, list(classes), str(model_id))


def check_fits(config: TrainConfig, parent: Parent) -> None:
    """One sentence for a setting that contradicts the model, or for ``--weights``, which the model's weights replace."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, value in parent_settings(parent.config).items():
        mine = getattr(config, name)
        if mine != value:
            flag = flag_of(fields[name])
            raise UserError(f"{flag} {mine} contradicts --init-from {parent.uri}, whose {name.replace('_', ' ')} is {value}: "
                            f"leave {flag} out (the model fixes it), or train without --init-from.")
    if config.weights != "none":
        raise UserError(f"--weights {config.weights} and --init-from {parent.uri} both say where the weights start: give one "
                        "(--init-from starts from every weight of that model, its head included).")


def lineage(parent: Parent, added: Sequence[str], without_data: Sequence[str]) -> list[dict[str, Any]]:
    """The new artifact's lineage: this parent, then the parent's own."""
    entry = {"model_id": parent.model_id, "model_uri": parent.uri, "classes_added": list(added),
             "classes_without_data": list(without_data)}
    return [entry, *parent.config.get("lineage", [])]


def load_parent_weights(model: nn.Module, uri: str, model_id: str, arch: str) -> None:
    """Every weight of the model at ``uri`` into ``model``, whose head may have more rows (characters appended after the model's).

    The weights must still be those the driver read (``model_id``): the lineage names them.
    """
    data = _weights(uri)
    now = weights_id(data, arch)
    if now != model_id:
        raise UserError(f"--init-from {uri} changed since this run started (its weights are now {now}, not {model_id}): "
                        "rerun to start from the new ones.")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model.load_state_dict(grown_state(state, model.state_dict(), uri))


def grown_state(parent_state: dict[str, torch.Tensor], start_state: dict[str, torch.Tensor], uri: str = "the model") -> dict[str, torch.Tensor]:
    """``parent_state`` in ``start_state``'s shapes: a head tensor with more rows keeps the parent's rows first, the rest as in ``start_state``."""
    out = {}
    for key, fresh in start_state.items():
        old = parent_state.get(key)
        if old is not None and old.shape == fresh.shape:
            out[key] = old
        elif old is not None and key.startswith("fc.") and old.shape[1:] == fresh.shape[1:] and old.shape[0] < fresh.shape[0]:
            out[key] = torch.cat([old.to(fresh.dtype), fresh[old.shape[0]:]])
        else:
            found = "no tensor" if old is None else f"shape {tuple(old.shape)}"
            raise UserError(f"--init-from {uri} does not fit the network of its own config.json ({key}: {found}, "
                            f"expected {tuple(fresh.shape)}): is its model.pt from another run?")
    return out


def _weights(uri: str) -> bytes:
    try:
        return storage.read_bytes(storage.join(uri, WEIGHTS_FILE))
    except OSError as exc:
        raise storage_failure(storage.join(uri, WEIGHTS_FILE), exc) from None
