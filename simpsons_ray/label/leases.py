"""Per-episode leases: several labeling jobs on one output, each episode labelled and committed by one of them.

    OUTPUT/_leases/<episode id>.json   {"episode", "job", "host", "boot_id", "pid_ns", "pid", "write", "heartbeat_unix", "ttl_s"}

**Who may write what.** Every write of a lease is conditional (``core/versioned.py``:
a conditional PUT on S3, compare-and-rename under a lock on a local disk), so of two
jobs that act on the same version of a lease exactly one succeeds, and nobody ever
overwrites a lease it has not just read:

- *free -> held*: a job creates the lease only if there is none.
- *held -> held*: the holder renews it (new ``heartbeat_unix``) only if it is still
  the version the holder wrote last: from the heartbeat thread every ``heartbeat_s``,
  and once more right before it commits the episode (``renew``).
- *expired -> held by another*: a job that reads a lease whose heartbeat is older
  than its ``ttl_s`` (the holder died, or stalled) replaces that version with its own.
- *held -> free*: the holder deletes it after committing, or at the end of the job.

A holder whose conditional renewal fails has lost the episode: it drops its rows.
A holder whose renewal succeeds owns the episode until ``ttl_s`` (less the clock
allowance below) after the moment it sent the renewal, by its own monotonic clock;
:meth:`LeaseKeeper.holds` says whether that is still so, and the commit
(``commit.py``) asks before each file it makes visible. A job that stalls (paused,
swapping, a long GC) past that point writes nothing visible when it wakes.

**Clocks.** A taker compares a lease's ``heartbeat_unix`` (the holder's wall clock)
with its own wall clock, so the machines' clocks must agree to within
``MAX_CLOCK_SKEW_SHARE`` of ``ttl_s`` (30 s of 120 s; NTP keeps them within
milliseconds): the holder gives up that much of its TTL.

**A process that is gone.** A job killed outright holds its leases until they expire,
except to a job in the same process namespace of the same boot of the same machine
(same ``host``, ``boot_id`` and ``pid_ns``), which sees that its pid is gone. Containers
that share a hostname differ in ``pid_ns``, so none of them takes the pid of another's
job for its own; outside Linux (no ``/proc``) host and pid decide, as there is nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterable

from simpsons_ray.core import storage, versioned

logger = logging.getLogger("simpsons_ray.label")

LEASES_DIR = "_leases"
LEASE_TTL_S = 120.0  # a lease not renewed for this long is free to take
HEARTBEAT_S = 30.0  # renewals: four per TTL, so one slow write never loses a lease
MAX_CLOCK_SKEW_SHARE = 0.25  # of the TTL: how far the wall clocks of two machines may disagree


class LeaseKeeper:
    """The leases of one job on one output."""

    def __init__(self, output_uri: str, job_id: str, ttl_s: float = LEASE_TTL_S, heartbeat_s: float = HEARTBEAT_S,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        """``clock`` (seconds since the epoch, as leases record them) and ``monotonic`` are injectable, for tests of expiry."""
        self.clock, self.monotonic = clock, monotonic
        self.root = storage.join(output_uri, LEASES_DIR)
        self.job_id = job_id
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.held: set[str] = set()
        self.lost: set[str] = set()  # taken over by another job while this one held them
        self._tags: dict[str, str] = {}  # the version of each held lease that this job wrote last
        self._valid_until: dict[str, float] = {}  # by self.monotonic: until when each held lease is surely ours
        self._identity = _process_identity()
        self._lock = threading.Lock()
        self._episode_locks: dict[str, threading.Lock] = {}  # a renewal from the heartbeat and one before a commit take turns
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading
    def uri(self, episode_id: str) -> str:
        return storage.join(self.root, f"{episode_id}.json")

    def read(self, episode_id: str) -> dict[str, Any] | None:
        """The episode's lease, or None when there is none."""
        found = self._read(episode_id)
        return found[0] if found else None

    def _read(self, episode_id: str) -> tuple[dict[str, Any] | None, str] | None:
        """(lease, tag), or None when there is none. A lease that does not parse reads as an expired one."""
        found = versioned.read(self.uri(episode_id))
        if found is None:
            return None
        try:
            lease = json.loads(found[0])
        except ValueError:
            lease = None
        return (lease if isinstance(lease, dict) else None), found[1]

    def is_live(self, lease: dict[str, Any] | None, now: float | None = None) -> bool:
        """A lease renewed within its TTL, by a job that is not known to be dead.

        A holder in this machine's process namespace whose process is gone (killed,
        or stopped with Ctrl-C twice) is dead now: a rerun there (a laptop, or the
        head node that runs every `ray job submit` driver) takes its episodes at
        once instead of waiting out the TTL.
        """
        if not lease:
            return False
        now = self.clock() if now is None else now
        if now - float(lease.get("heartbeat_unix", 0)) >= float(lease.get("ttl_s", self.ttl_s)):
            return False
        same_processes = all(lease.get(k) == v for k, v in self._identity.items())
        return not (same_processes and not _pid_alive(int(lease.get("pid", 0))))

    def live_jobs(self) -> set[str]:
        """Jobs that hold at least one live lease on this output (their temporary files are not to be touched)."""
        names = [e.relpath[: -len(".json")] for e in storage.list_files(self.root, recursive=False)
                 if e.relpath.endswith(".json") and ".tmp-" not in e.relpath]
        leases = storage.in_threads(self.read, names)
        now = self.clock()
        return {str(lease["job"]) for lease in leases if self.is_live(lease, now)}

    def holds(self, episode_id: str) -> bool:
        """True while this job surely holds the episode: not lost, and within the TTL of its last renewal."""
        with self._lock:
            return episode_id in self.held and self.monotonic() < self._valid_until.get(episode_id, float("-inf"))

    # ------------------------------------------------------------------ taking
    def acquire(self, episode_ids: Iterable[str]) -> tuple[list[str], dict[str, str]]:
        """Take the lease of each episode that no live job holds (creating it, or replacing an expired one).

        Returns (episodes now held by this job, {episode: job that holds it} for the rest).
        """
        episode_ids = list(episode_ids)
        outcomes = storage.in_threads(self._take, episode_ids)
        held = sorted(e for e, holder in zip(episode_ids, outcomes) if holder is None)
        return held, {e: holder for e, holder in zip(episode_ids, outcomes) if holder is not None}

    def _take(self, episode_id: str) -> str | None:
        """None when this job now holds the episode; else the job that does."""
        for _ in range(3):  # a lease deleted or replaced between our read and our write: look again
            if self._swap(episode_id, None):
                return None
            found = self._read(episode_id)
            if found is None:
                continue
            lease, tag = found
            if self.is_live(lease) and (lease or {}).get("job") != self.job_id:
                return str((lease or {})["job"])
            if (lease or {}).get("job") != self.job_id:
                logger.info("label: episode %s: the lease of job %s expired; taking it over", episode_id, (lease or {}).get("job", "?"))
            if self._swap(episode_id, tag):
                return None
        found = self._read(episode_id)
        return str(((found or ({}, ""))[0] or {}).get("job", "another job"))

    def renew(self, episode_id: str) -> bool:
        """Renew the lease if this job still holds it (checked before each commit); False, and the episode is lost, if not."""
        with self._episode_lock(episode_id):
            with self._lock:
                if episode_id not in self.held:
                    return False
                tag = self._tags[episode_id]
            if self._swap(episode_id, tag):
                return True
            self._lose(episode_id)
            return False

    def release(self, episode_ids: Iterable[str]) -> None:
        """Give up leases (after a commit, or at the end of the job); only the versions this job wrote are deleted."""
        def drop(episode_id: str) -> None:
            with self._episode_lock(episode_id):
                with self._lock:
                    tag = self._tags.pop(episode_id, None)
                    self.held.discard(episode_id)
                    self._valid_until.pop(episode_id, None)
                if tag is not None:
                    versioned.delete(self.uri(episode_id), tag)

        storage.in_threads(drop, list(episode_ids))

    def abandon(self, episode_id: str) -> None:
        """Give up an episode whose commit outlasted its lease: counted as lost, its lease deleted if still this job's version."""
        with self._lock:
            if episode_id in self.held:
                self.lost.add(episode_id)
        self.release([episode_id])

    # ------------------------------------------------------------------ heartbeat
    def __enter__(self) -> "LeaseKeeper":
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            remaining = list(self.held)
        self.release(remaining)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one failure; the next beat tries again
                logger.warning("label: could not renew the episode leases (trying again in %.0f s): %s: %s",
                               self.heartbeat_s, type(exc).__name__, exc)

    def beat(self) -> None:
        """One heartbeat: renew every held lease; a renewal that fails means another job took the episode over."""
        with self._lock:
            held = list(self.held)
        for eid, renewed in zip(held, storage.in_threads(self.renew, held)):
            if not renewed:
                logger.warning("label: episode %s: another job took its lease over (this job was too slow to renew it); "
                               "its rows from this job will be dropped", eid)

    def _swap(self, episode_id: str, expected: str | None) -> bool:
        """Write this job's lease over version ``expected`` (None: only if there is none); whether it landed."""
        write_id = uuid.uuid4().hex
        sent = self.monotonic()  # the TTL runs from before the write, whatever it takes to land
        try:
            tag = versioned.write(self.uri(episode_id), self._lease(episode_id, write_id), expected)
        except OSError:
            tag = None
            found = self._read(episode_id)  # a write whose answer was lost may still have landed: ours if it carries our id
            if not (found and (found[0] or {}).get("write") == write_id):
                raise
        if tag is None:  # the condition failed, or a retry of a write that had landed failed it: look
            found = self._read(episode_id)
            if not (found and (found[0] or {}).get("write") == write_id):
                return False
            tag = found[1]
        with self._lock:
            self.held.add(episode_id)
            self._tags[episode_id] = tag
            self._valid_until[episode_id] = sent + self.ttl_s * (1 - MAX_CLOCK_SKEW_SHARE)
        return True

    def _episode_lock(self, episode_id: str) -> threading.Lock:
        with self._lock:
            return self._episode_locks.setdefault(episode_id, threading.Lock())

    def _lose(self, episode_id: str) -> None:
        with self._lock:
            if episode_id in self.held:
                self.lost.add(episode_id)
            self.held.discard(episode_id)
            self._tags.pop(episode_id, None)
            self._valid_until.pop(episode_id, None)

    def _lease(self, episode_id: str, write_id: str) -> bytes:
        return storage.json_bytes({
            "episode": episode_id,
            "job": self.job_id,
            **self._identity,
            "pid": os.getpid(),
            "write": write_id,
            "heartbeat_unix": self.clock(),
            "ttl_s": self.ttl_s,
        })


def _process_identity() -> dict[str, str | None]:
    """What a pid is relative to: the machine's name, its boot, and the pid namespace (None outside Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot_id: str | None = f.read().strip()
        pid_ns: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:
        boot_id = pid_ns = None
    return {"host": socket.gethostname(), "boot_id": boot_id, "pid_ns": pid_ns}


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process: alive
        return True
    try:  # a zombie (killed, not yet reaped) is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
