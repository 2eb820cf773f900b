"""The labeling pipeline's completion bookkeeping, fed batches by hand: no Ray, no model."""

from __future__ import annotations

import logging

import numpy as np

from simpsons_ray.label.completion import CHANGED, Completion


def _batch(rows: list[tuple[int, str, int, str]]) -> dict[str, np.ndarray]:
    """Rows of (task, episode, task_end, fingerprint); task_end is the task's row count on its last row, else 0."""
    task, episode, end, fingerprint = zip(*rows)
    return {"task": np.array(task), "episode": np.array(episode, dtype=object),
            "task_end": np.array(end), "fingerprint": np.array(fingerprint, dtype=object)}


def test_an_episode_completes_once_every_task_has_ended_and_every_row_arrived_in_any_order():
    # Episode a is read by tasks 0 and 1 (3 and 2 rows), episode b by task 2 (1 row).
    completion = Completion([(0, "a"), (1, "a"), (2, "b")])
    # Task 0's last row comes first; two of its rows are still on the way.
    assert completion.add(_batch([(0, "a", 3, "f"), (1, "a", 0, "f")])) == []
    assert completion.unfinished == ["a", "b"]
    # b's only task ends with its one row: b is done, a still waits for rows of both tasks.
    assert completion.add(_batch([(2, "b", 1, "g"), (0, "a", 0, "f")])) == ["b"]
    assert completion.add(_batch([(1, "a", 2, "f")])) == []  # task 1 ended and has both rows; task 0 lacks one
    assert completion.unfinished == ["a"]
    assert completion.add(_batch([(0, "a", 0, "f")])) == ["a"]
    assert completion.unfinished == [] and completion.rows == 6
    assert completion.fingerprint("a") == "f" and completion.fingerprint("b") == "g"


def test_one_batch_can_complete_several_episodes_and_none_completes_twice():
    completion = Completion([(0, "a"), (1, "b")])
    assert completion.add(_batch([(0, "a", 1, ""), (1, "b", 1, "")])) == ["a", "b"]
    # A duplicate row (a retried block) does not complete an episode again.
    assert completion.add(_batch([(1, "b", 1, "")])) == []


def test_rows_that_never_arrive_leave_their_episode_unfinished():
    completion = Completion([(0, "a"), (1, "b")])
    completion.add(_batch([(0, "a", 2, ""), (1, "b", 1, "")]))  # a announced 2 rows, 1 arrived
    assert completion.unfinished == ["a"]


def test_read_tasks_that_saw_different_sources_mark_the_episode_changed(caplog):
    completion = Completion([(0, "a"), (1, "a")])
    with caplog.at_level(logging.WARNING, logger="simpsons_ray.label"):
        completion.add(_batch([(0, "a", 1, "size=10")]))
        completion.add(_batch([(1, "a", 1, "size=12")]))
    assert completion.fingerprint("a") == CHANGED
    assert "changed while it was being read" in caplog.text


def test_the_frame_total_is_an_estimate_until_every_task_has_ended():
    completion = Completion([(0, "a"), (1, "a"), (2, "b"), (3, "b")])
    assert completion.frames_total() == (None, True)
    completion.add(_batch([(0, "a", 10, ""), (1, "a", 0, "")]))
    # One task ended with 10 rows: the other three count as 10 each.
    assert completion.frames_total() == (40.0, True)
    completion.add(_batch([(1, "a", 20, ""), (2, "b", 6, ""), (3, "b", 4, "")]))
    assert completion.frames_total() == (40, False)
