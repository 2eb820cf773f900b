"""What people said about each exported frame, and the one rule that turns it into an answer or a reason to leave it out.

Each format reads its reviews into :class:`Answer` s (Label Studio: one per
annotation; folders: the folders a picture lies in), and :func:`decide` keeps a
frame only when what was said is clear: nothing is guessed. A frame is left out,
with its reason, when nobody reviewed it, every reviewer skipped it, reviewers
disagree on who is in it, a review names a choice the export did not offer, or one
review says both nobody and someone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from simpsons_ray.review.manifest import NOBODY, ExportedFrame

# Why a frame is left out of the training set (skipped.csv's ``reason``).
NOT_REVIEWED = "not reviewed"
CANCELLED = "skipped by the reviewer"
CONFLICTING = "conflicting reviews"
UNKNOWN_CHOICE = "choices not in the export"
CONTRADICTORY = "nobody and characters in one review"
EMPTY = "a review with no answer"
# Label Studio's Export -> JSON leaves out the tasks nobody annotated (unless asked for all tasks).
NOT_FOUND = "not reviewed (not in Label Studio's export)"
REMOVED = "removed from the folders"


@dataclass(frozen=True)
class Box:
    """A rectangle a reviewer drew, in percent of the picture as Label Studio gives it; turned clockwise by ``rotation`` degrees about its top left."""

    character: str
    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int] | None:
        """(x1, y1, x2, y2) in pixels of a ``width`` x ``height`` picture: the box's bounds, clipped to it; None when empty."""
        x0, y0 = self.x / 100 * width, self.y / 100 * height
        w, h = self.width / 100 * width, self.height / 100 * height
        turn = math.radians(self.rotation)
        cos, sin = math.cos(turn), math.sin(turn)
        corners = [(x0 + dx * cos - dy * sin, y0 + dx * sin + dy * cos) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
        x1 = max(0, min(width, round(min(c[0] for c in corners))))
        x2 = max(0, min(width, round(max(c[0] for c in corners))))
        y1 = max(0, min(height, round(min(c[1] for c in corners))))
        y2 = max(0, min(height, round(max(c[1] for c in corners))))
        return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


@dataclass(frozen=True)
class Answer:
    """One person's review of one frame: the characters they chose (``nobody`` among them, as chosen) and the boxes they drew."""

    choices: tuple[str, ...]
    boxes: tuple[Box, ...] = ()
    reviewer: str = ""
    cancelled: bool = False

    @property
    def characters(self) -> tuple[str, ...]:
        """Who the review puts in the frame: the choices, then any boxed character not chosen; () for nobody."""
        named = [c for c in self.choices if c != NOBODY]
        return tuple(dict.fromkeys([*named, *(b.character for b in self.boxes)]))


@dataclass(frozen=True)
class Review:
    """A frame with a clear answer: who is in it (() = nobody), the boxes drawn, who said so, and where its picture lies."""

    frame: ExportedFrame
    characters: tuple[str, ...]
    boxes: tuple[Box, ...]
    reviewer: str
    file: str  # the picture, below the export folder
    changed: bool  # whether the reviewers said other than what the export showed them


@dataclass(frozen=True)
class Skip:
    """A frame left out of the training set, and why."""

    frame: ExportedFrame
    reason: str


def decide(frame: ExportedFrame, answers: list[Answer], allowed: tuple[str, ...], file: str | None = None,
           shown: tuple[str, ...] | None = None) -> Review | Skip:
    """The frame's answer when its reviews agree and stay within ``allowed``; else why it is left out.

    ``shown`` is the answer the reviewers were shown (default: the model's): a review
    that keeps it is not a change.
    """
    if not answers:
        return Skip(frame, NOT_REVIEWED)
    kept = [a for a in answers if not a.cancelled]
    if not kept:
        return Skip(frame, CANCELLED)
    unknown = sorted({c for a in kept for c in (*a.choices, *(b.character for b in a.boxes))} - set(allowed))
    if unknown:
        return Skip(frame, f"{UNKNOWN_CHOICE}: {', '.join(unknown)}")
    if any(NOBODY in a.choices and a.characters for a in kept):
        return Skip(frame, CONTRADICTORY)
    if any(not a.choices and not a.boxes for a in kept):
        return Skip(frame, EMPTY)
    if len({frozenset(a.characters) for a in kept}) > 1:
        return Skip(frame, CONFLICTING)
    first = kept[0]
    reviewers = ";".join(dict.fromkeys(a.reviewer for a in kept if a.reviewer))
    changed = set(first.characters) != set(frame.answer if shown is None else shown)
    return Review(frame, first.characters, first.boxes, reviewers, file or frame.file, changed)
