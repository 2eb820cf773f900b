"""Episode leases: several labeling jobs on one output, each episode held by one live job at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from simpsons_ray.core import storage, versioned
from simpsons_ray.label.leases import LeaseKeeper
from waiting import FakeClock, wait_until


def test_a_live_lease_keeps_other_jobs_off_and_is_given_back(labels_output):
    a, b = LeaseKeeper(labels_output, "job-a"), LeaseKeeper(labels_output, "job-b")
    assert a.acquire(["E1", "E2"]) == (["E1", "E2"], {})
    held, elsewhere = b.acquire(["E2", "E3"])
    assert held == ["E3"] and elsewhere == {"E2": "job-a"}
    assert a.live_jobs() == {"job-a", "job-b"}
    a.release(["E2"])
    assert b.acquire(["E2"]) == (["E2"], {})
    b.release(["E1"])  # not b's: left alone
    assert a.renew("E1") and a.holds("E1") and not a.renew("E2") and not a.holds("E2")


def test_racing_jobs_split_the_episodes_between_them(labels_output):
    """Jobs that start at the same moment: every episode ends up with exactly one of them."""
    episodes = [f"E{i:02d}" for i in range(24)]
    keepers = [LeaseKeeper(labels_output, f"job-{k}") for k in range(3)]
    results: dict[str, list[str]] = {}
    start = threading.Barrier(len(keepers))

    def run(keeper: LeaseKeeper) -> None:
        start.wait()
        results[keeper.job_id] = keeper.acquire(episodes)[0]

    threads = [threading.Thread(target=run, args=(k,)) for k in keepers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [e for h in results.values() for e in h]
    assert sorted(held) == episodes  # each exactly once


def epoch_clock() -> FakeClock:
    """Seconds since the epoch, as leases record them."""
    return FakeClock(1_000_000.0)


def test_an_expired_lease_is_taken_over_and_its_holder_notices(labels_output):
    clock = epoch_clock()
    slow = LeaseKeeper(labels_output, "job-slow", ttl_s=60, clock=clock, monotonic=clock)
    assert slow.acquire(["E1"])[0] == ["E1"]
    other = LeaseKeeper(labels_output, "job-other", clock=clock, monotonic=clock)
    clock.sleep(59)
    assert other.acquire(["E1"]) == ([], {"E1": "job-slow"})
    clock.sleep(1)  # no heartbeat: the lease expires
    assert other.acquire(["E1"]) == (["E1"], {})
    assert not slow.renew("E1") and slow.lost == {"E1"}
    assert other.live_jobs() == {"job-other"}


def test_the_heartbeat_renews_and_the_end_of_the_job_releases(labels_output):
    clock = epoch_clock()
    keeper = LeaseKeeper(labels_output, "job-a", ttl_s=60, heartbeat_s=0.05, clock=clock)
    other = LeaseKeeper(labels_output, "job-b", clock=clock)
    with keeper:  # the heartbeat thread: it renews on its own
        keeper.acquire(["E1", "E2"])
        first = storage.read_json(keeper.uri("E1"))["heartbeat_unix"]
        clock.sleep(45)
        assert wait_until(lambda: storage.read_json(keeper.uri("E1"))["heartbeat_unix"] > first, timeout=10, every=0.02)
        clock.sleep(45)  # 90 s after the lease was taken, past its TTL: only the heartbeat keeps it live
        lease = storage.read_json(keeper.uri("E1"))
        assert keeper.is_live(lease)
        assert other.acquire(["E1"]) == ([], {"E1": "job-a"})
    assert keeper.read("E1") is None and keeper.read("E2") is None


def test_a_heartbeat_notices_a_lease_taken_over_and_stops_renewing_it(labels_output):
    clock = epoch_clock()
    slow = LeaseKeeper(labels_output, "job-slow", ttl_s=60, clock=clock)
    slow.acquire(["E1", "E2"])
    clock.sleep(61)  # the heartbeat stalled past the TTL
    taker = LeaseKeeper(labels_output, "job-taker", clock=clock)
    assert taker.acquire(["E1"]) == (["E1"], {})
    slow.beat()
    assert slow.lost == {"E1"} and slow.held == {"E2"}
    assert storage.read_json(slow.uri("E1"))["job"] == "job-taker"  # not overwritten by the renewal
    assert storage.read_json(slow.uri("E2"))["heartbeat_unix"] == clock.now


def test_a_dead_process_on_this_machine_holds_nothing(tmp_path):
    """A job killed outright: a rerun on the same machine takes its episodes at once, not after the TTL."""
    labels_output = str(tmp_path / "labels")
    code = ("import sys; from simpsons_ray.label.leases import LeaseKeeper; "
            "print(LeaseKeeper(sys.argv[1], 'job-killed').acquire(['E1'])[0])")
    done = subprocess.run([sys.executable, "-c", code, labels_output], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert done.stdout.strip() == "['E1']"
    lease = json.loads(open(os.path.join(labels_output, "_leases", "E1.json")).read())
    rerun = LeaseKeeper(labels_output, "job-rerun")
    assert not rerun.is_live(lease)  # fresh, but its process has exited
    assert rerun.acquire(["E1"]) == (["E1"], {})
    assert rerun.is_live(storage.read_json(rerun.uri("E1")))  # ours, and we are alive


def test_exclusive_create_and_aborting_uploads_on_s3(s3_server):
    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/out/_leases/E1.json"
    assert versioned.write(uri, b"first", None) and versioned.write(uri, b"second", None) is None
    assert storage.read_bytes(uri) == b"first"
    client = s3_server.client()
    for key in ("out/_tmp/run-1/episode=E1.parquet", "out/_tmp/run-10/episode=E2.parquet"):
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)
        client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 100)
    assert storage.abort_uploads(f"s3://{bucket}/out/_tmp/run-1") == 1  # run-10 only shares a prefix
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == ["out/_tmp/run-10/episode=E2.parquet"]
    assert storage.abort_uploads("/tmp/not-s3") == 0


def test_a_dropped_episode_leaves_no_file_and_no_open_upload(s3_server):
    """A run that fails mid-episode drops what it wrote: the temporary file, and an upload the close could not finish."""
    import numpy as np

    from simpsons_ray.label.commit import EpisodeWriter
    from simpsons_ray.label.episodes import FOLDER, Episode
    from simpsons_ray.label.settings import LabelSettings
    from simpsons_ray.label.shots import SIGNATURE_SIZE
    from simpsons_ray.labels.layout import OutputLayout

    bucket = s3_server.new_bucket()
    writer = EpisodeWriter(OutputLayout(f"s3://{bucket}/labels"), "run-1", Episode("E1", "s3://x/E1", FOLDER), ["a", "b"],
                           LabelSettings("m", 2, 0.0))
    n = 20_000
    writer.add({"frame": np.arange(n), "source": np.array([f"s{i}" for i in range(n)], dtype=object),
                "error": np.array([""] * n, dtype=object), "timestamp": np.full(n, np.nan),
                "top_indices": np.zeros((n, 2), np.int64), "top_scores": np.full((n, 2), 0.5, np.float32),
                "scores": np.full((n, 2), 0.5, np.float32), "signature": np.zeros((n, SIGNATURE_SIZE), np.float32)})
    writer._flush()  # a row group written: the file is open on S3
    client = s3_server.client()
    key = writer.tmp_uri[len(f"s3://{bucket}/"):]
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)  # as a large file's writer leaves one
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"PAR1" * 1000)
    writer.discard()
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert not storage.exists(writer.tmp_uri)
