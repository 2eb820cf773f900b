"""When an episode's rows are all in: the bookkeeping of read tasks, whatever order their rows arrive in.

Every read block carries its read task's id, and the task's last row says how many
rows the task produced (``task_end``). An episode is complete once each of its read
tasks has ended and every row it announced has arrived; only then is it committed.
The same read tasks also report what they saw of their source (``fingerprint``):
two of one episode that disagree mean the source changed while it was being read.

No Ray here: the pipeline feeds it the batches it gets, and tests feed it batches by hand.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from typing import Iterable, Mapping

import numpy as np

logger = logging.getLogger("simpsons_ray.label")

CHANGED = "changed during the run"


class Completion:
    """Rows received and announced per read task, and the episodes each batch completes."""

    def __init__(self, tasks: Iterable[tuple[int, str]]):
        """``tasks``: (read task id, episode id) of every read task of the run."""
        self.episode_of: dict[int, str] = {}
        self.tasks_of: dict[str, set[int]] = defaultdict(set)
        for task, episode in tasks:
            self.episode_of[task] = episode
            self.tasks_of[episode].add(task)
        self.tasks = len(self.episode_of)
        self.received: Counter[int] = Counter()
        self.expected: dict[int, int] = {}  # task -> rows it produced, once it has ended
        self.fingerprints: dict[str, str] = {}  # what each episode's read tasks saw of its source
        self.rows = 0

    def add(self, batch: Mapping[str, np.ndarray]) -> list[str]:
        """Count a batch's rows (``task``, ``task_end``, ``episode``, ``fingerprint``); the episodes it completes, in order."""
        self.rows += len(batch["task"])
        tasks, counts = np.unique(batch["task"], return_counts=True)
        self.received.update(dict(zip(tasks.tolist(), counts.tolist())))
        ends = batch["task_end"] > 0
        self.expected.update(zip(batch["task"][ends].tolist(), batch["task_end"][ends].tolist()))
        for episode, fingerprint in zip(batch["episode"][ends].tolist(), batch["fingerprint"][ends].tolist()):
            if self.fingerprints.setdefault(episode, fingerprint) != fingerprint:
                logger.warning("label: episode %s changed while it was being read; a rerun will say so", episode)
                self.fingerprints[episode] = CHANGED
        done = []
        for task in tasks.tolist():
            if self.expected.get(task) != self.received[task]:
                continue
            episode = self.episode_of[task]
            self.tasks_of[episode].discard(task)
            if not self.tasks_of[episode]:
                del self.tasks_of[episode]
                done.append(episode)
        return done

    def fingerprint(self, episode: str) -> str:
        return self.fingerprints.get(episode, "")

    @property
    def unfinished(self) -> list[str]:
        """Episodes some of whose rows have not arrived (at the end of a run: rows went missing)."""
        return sorted(self.tasks_of)

    def frames_total(self) -> tuple[float | None, bool]:
        """(total frames, whether it is an estimate): a read task's count is known when it ends.

        Until every task has ended, each unfinished one counts as the mean of the ended
        ones, so the total and the ETA settle as the work goes.
        """
        if not self.expected:
            return None, True
        known = sum(self.expected.values())
        unfinished = self.tasks - len(self.expected)
        return known + unfinished * known / len(self.expected), unfinished > 0
