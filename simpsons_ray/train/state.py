"""What a training checkpoint holds, and finding the newest readable one in storage."""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from simpsons_ray.core import storage
from simpsons_ray.core.errors import first_line, storage_failure

log = logging.getLogger("simpsons_ray.train")

CHECKPOINT_RUN_NAME = "_train"  # OUTPUT/_train/: Ray Train's checkpoints and run record


STATE_FILE = "state.pt"


@dataclass
class TrainState:
    """What a checkpoint holds: enough to resume mid-run on any number of workers."""

    phase_index: int = 0
    epoch_in_phase: int = 0
    epoch: int = 0  # global epoch counter
    model: dict | None = None
    optimizer: dict | None = None
    scheduler: dict | None = None
    best_loss: float = math.inf  # what chose the epoch before the validation figure did (older checkpoints)
    best_score: float = -math.inf  # the best validation figure so far (selection.validate)
    bad_epochs: int = 0
    best_model: dict | None = None  # what validation scored: the weight average when there is one
    best_epoch: int = -1
    ema: dict | None = None  # the weight average mid-phase
    history: list = field(default_factory=list)
    done: bool = False

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(dataclasses.asdict(self), buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "TrainState":
        # weights_only: a checkpoint is data, never code.
        return cls(**torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))


def newest_stored_state(output_uri: str) -> TrainState | None:
    """The newest readable checkpoint under OUTPUT/_train/; None only when there is none.

    Ray Train registers a reported checkpoint only at its next poll of the
    workers (every 2 s), so a worker that dies right after reporting can restart
    with get_checkpoint() None although the checkpoint is already in storage.

    A checkpoint cut short by the failure (its state file missing or truncated)
    is passed over for the one before, with a warning that names it; when none
    can be read (a kill during the first checkpoint's upload), a warning says the
    run starts again from its first epoch, and None is returned. Storage that
    cannot be read is not "no checkpoint": it raises, and a rerun resumes once
    the storage answers.
    """
    root = storage.join(output_uri, CHECKPOINT_RUN_NAME)
    try:
        names = sorted((n for n, is_dir in storage.list_dir(root) if is_dir and n.startswith("checkpoint_")), reverse=True)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise storage_failure(f"the checkpoints under {root}", exc) from None
    passed_over: list[str] = []
    for name in names:  # names carry their timestamp, so newest sorts first
        uri = storage.join(root, name, STATE_FILE)
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:  # the upload of this checkpoint never finished
            passed_over.append(f"{name} (no {STATE_FILE})")
            continue
        except OSError as exc:
            raise storage_failure(uri, exc) from None
        try:
            state = TrainState.from_bytes(data)
        except Exception as exc:  # truncated or corrupt bytes: try the one before
            passed_over.append(f"{name} ({STATE_FILE} of {len(data):,} bytes does not load: {first_line(exc)[:120]})")
            continue
        if passed_over:
            log.warning("train: resuming from %s; passed over the newer checkpoint(s) that cannot be read: %s", name, "; ".join(passed_over))
        return state
    if passed_over:
        log.warning("train: none of the %d checkpoint(s) under %s can be read (%s%s): the run starts again from its first epoch",
                    len(passed_over), root, "; ".join(passed_over[:3]), " and more" if len(passed_over) > 3 else "")
    return None


def cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
