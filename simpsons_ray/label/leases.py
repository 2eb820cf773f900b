"""Per-episode leases: several labeling jobs on one output, each episode labelled by one of them.

    OUTPUT/_leases/<episode id>.json   {"episode", "job", "host", "pid", "heartbeat_unix", "ttl_s"}

A job takes the lease of every episode it is about to label, renews the leases it
holds from a heartbeat thread, and deletes each one when the episode is committed
(or when the job ends). Another job skips an episode whose lease is live (its
heartbeat younger than its ``ttl_s``) and takes over one whose lease has expired: the
job that held it died, or was stopped.

A free episode's lease is created only if no lease exists, in one atomic call
(a hard link locally, a conditional ``If-None-Match: *`` PUT on S3), so of two jobs
exactly one gets it. An expired lease is taken over by write, wait, read back: two
jobs that write it at the same moment both read back the one write that landed
last. The commit protocol is the backstop: a job reads its lease again before it commits an
episode and drops its rows if the lease moved, and a commit replaces an episode's
files whole, so even two jobs that both labelled an episode leave every frame in
exactly one row.

Heartbeats compare clocks of different machines: keep them within a fraction of
``ttl_s`` (NTP does). A job killed outright holds its leases until they expire,
except to a job on the same machine, which sees that its process is gone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Iterable

from simpsons_ray.core import storage

logger = logging.getLogger("simpsons_ray.label")

LEASES_DIR = "_leases"
LEASE_TTL_S = 120.0  # a lease not renewed for this long is free to take
HEARTBEAT_S = 30.0  # renewals: four per TTL, so one slow write never loses a lease
SETTLE_S = 2.0  # between writing leases and reading them back


class LeaseKeeper:
    """The leases of one job on one output."""

    def __init__(self, output_uri: str, job_id: str, ttl_s: float = LEASE_TTL_S, heartbeat_s: float = HEARTBEAT_S,
                 settle_s: float = SETTLE_S, clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep):
        """``clock`` (seconds since the epoch, as leases record them) and ``sleep`` are injectable, for tests of expiry."""
        self.clock, self.sleep = clock, sleep
        self.root = storage.join(output_uri, LEASES_DIR)
        self.job_id = job_id
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.settle_s = settle_s
        self.held: set[str] = set()
        self.lost: set[str] = set()  # taken over by another job while this one held them
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading
    def uri(self, episode_id: str) -> str:
        return storage.join(self.root, f"{episode_id}.json")

    def read(self, episode_id: str) -> dict[str, Any] | None:
        """The episode's lease, or None when there is none (a lease half written by a killed job counts as none)."""
        try:
            return storage.read_json(self.uri(episode_id))
        except FileNotFoundError:
            return None
        except ValueError:
            return None

    def is_live(self, lease: dict[str, Any] | None, now: float | None = None) -> bool:
        """A lease renewed within its TTL, by a job that is not known to be dead.

        A holder on this machine whose process is gone (killed, or stopped with
        Ctrl-C twice) is dead now: a rerun on the same machine (a laptop, or the
        head node that runs every `ray job submit` driver) takes its episodes at
        once instead of waiting out the TTL.
        """
        if not lease:
            return False
        now = self.clock() if now is None else now
        if now - float(lease.get("heartbeat_unix", 0)) >= float(lease.get("ttl_s", self.ttl_s)):
            return False
        return not (lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", 0))))

    def live_jobs(self) -> set[str]:
        """Jobs that hold at least one live lease on this output (their temporary files are not to be touched)."""
        names = [e.relpath[: -len(".json")] for e in storage.list_files(self.root, recursive=False)
                 if e.relpath.endswith(".json") and ".tmp-" not in e.relpath]
        leases = storage.in_threads(self.read, names)
        now = self.clock()
        return {str(lease["job"]) for lease in leases if self.is_live(lease, now)}

    # ------------------------------------------------------------------ taking
    def acquire(self, episode_ids: Iterable[str]) -> tuple[list[str], dict[str, str]]:
        """Take the lease of each episode that no live job holds.

        A free episode's lease is created only if absent (one atomic call: a link on
        a local disk, a conditional PUT on S3), so of two jobs exactly one gets it.
        An expired lease is taken over by write, wait, read back.
        Returns (episodes now held by this job, {episode: job that holds it} for the rest).
        """
        episode_ids = list(episode_ids)
        created = dict(zip(episode_ids, storage.in_threads(lambda e: storage.create_exclusive(self.uri(e), self._lease(e)), episode_ids)))
        held = [e for e in episode_ids if created[e]]
        taken = [e for e in episode_ids if not created[e]]
        current = dict(zip(taken, storage.in_threads(self.read, taken)))
        now = self.clock()
        elsewhere: dict[str, str] = {}
        expired = []
        for eid, lease in current.items():
            if self.is_live(lease, now) and lease.get("job") != self.job_id:
                elsewhere[eid] = str(lease["job"])
            else:
                logger.info("label: episode %s: the lease of job %s expired; taking it over", eid, (lease or {}).get("job", "?"))
                expired.append(eid)
        if expired:
            storage.in_threads(self._write, expired)
            self.sleep(self.settle_s)
            for eid, lease in zip(expired, storage.in_threads(self.read, expired)):
                if lease and lease.get("job") == self.job_id:
                    held.append(eid)
                else:  # another job's takeover landed after ours
                    elsewhere[eid] = str((lease or {}).get("job", "another job"))
        with self._lock:
            self.held.update(held)
        return sorted(held), elsewhere

    def still_mine(self, episode_id: str) -> bool:
        """Read the lease again: True when this job still holds it (checked before each commit)."""
        lease = self.read(episode_id)
        mine = lease is not None and lease.get("job") == self.job_id
        if not mine:
            with self._lock:
                self.held.discard(episode_id)
                self.lost.add(episode_id)
        return mine

    def release(self, episode_ids: Iterable[str]) -> None:
        """Give up leases (after a commit, or at the end of the job); only this job's own are deleted."""
        ids = list(episode_ids)
        with self._lock:
            for eid in ids:
                self.held.discard(eid)

        def drop(eid: str) -> None:
            lease = self.read(eid)
            if lease and lease.get("job") == self.job_id:
                storage.delete(self.uri(eid))

        storage.in_threads(drop, ids)

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
            except OSError as exc:  # storage briefly away: the next beat tries again, well within the TTL
                logger.warning("label: could not renew the episode leases: %s", exc)

    def beat(self) -> None:
        """One heartbeat: note the leases another job took over, renew the others."""
        with self._lock:
            held = list(self.held)
        current = dict(zip(held, storage.in_threads(self.read, held)))
        for eid, lease in current.items():
            if lease and lease.get("job") != self.job_id:
                logger.warning("label: episode %s: job %s took its lease over (this job was too slow to renew it); "
                               "its rows from this job will be dropped", eid, lease.get("job"))
                with self._lock:
                    self.held.discard(eid)
                    self.lost.add(eid)
        with self._lock:
            renew = [eid for eid in held if eid in self.held]
        storage.in_threads(self._write, renew)

    def _lease(self, episode_id: str) -> bytes:
        return storage.json_bytes({
            "episode": episode_id,
            "job": self.job_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat_unix": self.clock(),
            "ttl_s": self.ttl_s,
        })

    def _write(self, episode_id: str) -> None:
        storage.write_bytes(self.uri(episode_id), self._lease(episode_id))


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
