"""The commit protocol under a lost lease (label/commit.py, label/leases.py): a job that lost an episode writes nothing visible.

Two jobs on one labels_output, local and on S3. The first job's heartbeat stalls past its
lease's expiry while the second takes the episode over; whatever order the two then
commit in, the output holds the second job's labels, errors and marker only, and the
first job's files are gone from its temporary folder.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from simpsons_ray.core import storage, versioned
from simpsons_ray.label.commit import EpisodeWriter
from simpsons_ray.label.episodes import FOLDER, Episode
from simpsons_ray.label.leases import LeaseKeeper
from simpsons_ray.label.pipeline import Progress, _commit
from simpsons_ray.label.settings import LabelSettings
from simpsons_ray.label.shots import SIGNATURE_SIZE
from simpsons_ray.labels.layout import OutputLayout
from waiting import FakeClock, wait_until

TTL_S = 60.0


def episode_writer(labels_output: str, run_id: str, frames: int, errors: int) -> EpisodeWriter:
    """A writer holding ``frames`` labelled rows (all 'a' for run-a, 'b' otherwise) and ``errors`` error rows of episode E1."""
    writer = EpisodeWriter(OutputLayout(labels_output), run_id, Episode("E1", "/frames/E1", FOLDER), ["a", "b"], LabelSettings("m", 2, 0.0))
    n = frames + errors
    top = np.zeros((n, 2), np.int64) if run_id == "run-a" else np.tile([1, 0], (n, 1))
    writer.add({"frame": np.arange(n), "source": np.array([f"{run_id}/{i}.jpg" for i in range(n)], dtype=object),
                "error": np.array([""] * frames + ["cannot decode"] * errors, dtype=object), "timestamp": np.full(n, np.nan),
                "top_indices": top, "top_scores": np.tile(np.array([0.9, 0.1], np.float32), (n, 1)),
                "scores": np.tile(np.array([0.9, 0.1], np.float32), (n, 1)), "signature": np.zeros((n, SIGNATURE_SIZE), np.float32)})
    return writer


def visible(labels_output: str) -> dict[str, object]:
    """What a reader of the output sees of episode E1: who wrote its labels, how many error rows, whose marker."""
    layout = OutputLayout(labels_output)
    labels = pq.read_table(storage.open_input_file(layout.labels_file("E1"))) if storage.exists(layout.labels_file("E1")) else None
    errors = pq.read_table(storage.open_input_file(layout.errors_file("E1"))) if storage.exists(layout.errors_file("E1")) else None
    marker = storage.read_json(layout.marker("E1")) if storage.exists(layout.marker("E1")) else None
    return {
        "labels": sorted({s.split("/")[0] for s in labels.column("source").to_pylist()}) if labels is not None else None,
        "rows": labels.num_rows if labels is not None else 0,
        "errors": errors.num_rows if errors is not None else 0,
        "marker": marker["run_id"] if marker else None,
    }


def two_jobs(labels_output: str) -> tuple[FakeClock, LeaseKeeper, LeaseKeeper]:
    """Job a holds E1; its heartbeat then stalls past the TTL, and job b takes E1 over."""
    clock = FakeClock(1_000_000.0)
    a = LeaseKeeper(labels_output, "run-a", ttl_s=TTL_S, clock=clock, monotonic=clock)
    assert a.acquire(["E1"]) == (["E1"], {})
    clock.sleep(TTL_S + 1)  # no renewal: the heartbeat stalled
    b = LeaseKeeper(labels_output, "run-b", ttl_s=TTL_S, clock=clock, monotonic=clock)
    assert b.acquire(["E1"]) == (["E1"], {})
    return clock, a, b


@pytest.mark.parametrize("order", ["taker first", "stalled first"])
def test_a_job_that_lost_its_lease_writes_nothing_visible(labels_output, order):
    _, a, b = two_jobs(labels_output)
    stalled, taker = episode_writer(labels_output, "run-a", frames=5, errors=2), episode_writer(labels_output, "run-b", frames=7, errors=0)
    commits = [(taker, b, "run-b"), (stalled, a, "run-a")]
    if order == "stalled first":
        commits.reverse()
    after: list[dict[str, object]] = []
    for writer, keeper, run_id in commits:
        _commit(writer, "", run_id, keeper, Progress(1), [])
        after.append(visible(labels_output))
    b_only = {"labels": ["run-b"], "rows": 7, "errors": 0, "marker": "run-b"}
    if order == "taker first":
        assert after == [b_only, b_only]  # the stalled job's labels and errors never replace the taker's
    else:
        assert after == [{"labels": None, "rows": 0, "errors": 0, "marker": None}, b_only]  # nothing at all from job a
    assert a.lost == {"E1"} and b.lost == set()
    assert not any(storage.exists(u) for u in (stalled.tmp_uri, stalled.finished_uri, stalled.errors_uri))


def test_a_commit_that_stalls_past_its_lease_stops_before_its_next_write(labels_output):
    clock = FakeClock(1_000_000.0)
    a = LeaseKeeper(labels_output, "run-a", ttl_s=TTL_S, clock=clock, monotonic=clock)
    a.acquire(["E1"])
    writer = episode_writer(labels_output, "run-a", frames=5, errors=2)
    writer.stage()
    assert a.renew("E1")
    calls = []

    def held_then_stall() -> bool:
        calls.append(a.holds("E1"))
        clock.sleep(TTL_S)  # the job stalls right after its first visible write
        return calls[-1]

    assert writer.land("run-a", "", held_then_stall) is None
    assert calls == [True, False]
    # The labels landed before the stall; the errors file and the marker did not: an unmarked episode, which the
    # run that takes it up clears before labelling it.
    assert visible(labels_output) == {"labels": ["run-a"], "rows": 5, "errors": 0, "marker": None}


def test_a_commit_replaces_or_removes_both_files(labels_output):
    """A rerun with no errors removes the last run's errors file; one with no labelled frame removes its labels file."""
    for run_id, frames, errors, expected in [("run-a", 5, 2, {"labels": ["run-a"], "rows": 5, "errors": 2}),
                                             ("run-b", 4, 0, {"labels": ["run-b"], "rows": 4, "errors": 0}),
                                             ("run-c", 0, 3, {"labels": None, "rows": 0, "errors": 3})]:
        keeper = LeaseKeeper(labels_output, run_id)
        keeper.acquire(["E1"])
        _commit(episode_writer(labels_output, run_id, frames, errors), "", run_id, keeper, Progress(1), [])
        assert visible(labels_output) == {**expected, "marker": run_id}


def test_conditional_writes_let_exactly_one_of_racing_writers_through(labels_output):
    uri = storage.join(labels_output, "_leases", "E1.json")
    tag = versioned.write(uri, b"v1", None)
    assert tag and versioned.write(uri, b"again", None) is None
    results: list[str | None] = []
    start = threading.Barrier(6)

    def write(k: int) -> None:
        start.wait()
        results.append(versioned.write(uri, f"v2 by {k}".encode(), tag))

    threads = [threading.Thread(target=write, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and versioned.read(uri)[1] == winners[0]
    assert not versioned.delete(uri, tag) and versioned.delete(uri, winners[0]) and versioned.read(uri) is None


def test_racing_takeovers_of_an_expired_lease_leave_one_holder(labels_output):
    clock = FakeClock(1_000_000.0)
    LeaseKeeper(labels_output, "run-dead", ttl_s=TTL_S, clock=clock, monotonic=clock).acquire(["E1", "E2"])
    clock.sleep(TTL_S + 1)
    keepers = [LeaseKeeper(labels_output, f"run-{k}", ttl_s=TTL_S, clock=clock, monotonic=clock) for k in range(4)]
    held: dict[str, list[str]] = {}
    start = threading.Barrier(len(keepers))

    def take(keeper: LeaseKeeper) -> None:
        start.wait()
        held[keeper.job_id] = keeper.acquire(["E1", "E2"])[0]

    threads = [threading.Thread(target=take, args=(k,)) for k in keepers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e for h in held.values() for e in h) == ["E1", "E2"]
    for eid in ("E1", "E2"):
        holder = next(job for job, h in held.items() if eid in h)
        assert storage.read_json(keepers[0].uri(eid))["job"] == holder


def test_the_heartbeat_outlives_an_unexpected_error(tmp_path, caplog):
    keeper = LeaseKeeper(str(tmp_path / "labels"), "run-a", heartbeat_s=0.02)
    keeper.acquire(["E1"])
    first = storage.read_json(keeper.uri("E1"))["write"]
    real_renew, failures = keeper.renew, []

    def renew_failing_once(episode_id: str) -> bool:
        if not failures:
            failures.append(episode_id)
            raise RuntimeError("a bug in a storage library")
        return real_renew(episode_id)

    keeper.renew = renew_failing_once  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="simpsons_ray.label"), keeper:
        assert wait_until(lambda: storage.read_json(keeper.uri("E1"))["write"] != first, timeout=10, every=0.02)
        assert keeper._thread is not None and keeper._thread.is_alive()
    assert failures == ["E1"] and "RuntimeError: a bug in a storage library" in caplog.text


def test_a_dead_pid_counts_only_in_this_process_namespace(tmp_path):
    keeper = LeaseKeeper(str(tmp_path / "labels"), "run-a")
    keeper.acquire(["E1"])
    lease = keeper.read("E1")
    assert keeper.is_live(lease)
    dead = {**lease, "pid": 2**22 + 12345}  # no such process here
    assert not keeper.is_live(dead)
    # Another container on a host of the same name, or this host after a reboot: its pids are not ours to judge.
    assert keeper.is_live({**dead, "pid_ns": "pid:[1]"}) and keeper.is_live({**dead, "boot_id": "another boot"})
