"""Running on a cluster: cluster.yaml, and jobs submitted to a real two-node Ray that loses parts.

The slow tests start their own Ray cluster of two nodes on loopback (`ray start`
twice, see cluster_fixtures.py), submit jobs/train.py and jobs/label.py with
`ray job submit --working-dir .` exactly as the README says, read and write
everything on the test S3 server, then kill a node, a training worker, or the S3
endpoint while a job runs, and check that nothing is lost or duplicated.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import yaml

from cluster_fixtures import REPO, FakeAutoscalingCluster, LocalCluster, S3Proxy
from imagegen import class_image, encode, upload_tree, write_class_folders, write_tar
from simpsons_ray import cli, query
from simpsons_ray.core import cluster as cluster_lib
from simpsons_ray.core import storage
from simpsons_ray.labels import schema
from simpsons_ray.model.artifact import load_artifact
from waiting import wait_until

CLUSTER_YAML = os.path.join(REPO, "cluster.yaml")
CLASSES = ["bart", "homer", "lisa"]
IMAGE_SIZE = 32
# resnet18 at 32 px from scratch: seconds per epoch on 2 cores, and it still learns
# the generated shapes well enough that a swapped label would show.
# The single-label objective: these tests are about the cluster, and check its top-1 labels.
TRAIN_FLAGS = ["--arch", "resnet18", "--weights", "none", "--image-size", str(IMAGE_SIZE), "--num-workers", "2", "--batch-size", "16",
               "--objective", "single"]


# ---------------------------------------------------------------------- cluster.yaml
@pytest.fixture(scope="module")
def cluster_config() -> dict:
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_is_valid_for_the_ray_cluster_launcher(cluster_config):
    """The schema that ships in the ray package, then the launcher's own checks on the filled-out config."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        jsonschema.validate(cluster_config, json.load(f))
    validate_config(prepare_config(copy.deepcopy(cluster_config)))


def test_cluster_yaml_head_takes_no_work_and_workers_scale_from_zero(cluster_config):
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    gpu = [t for t in types.values() if t["node_config"]["InstanceType"].split(".")[0] in ("g5", "g6", "g6e")]
    assert gpu, "no g5/g6 GPU worker type"
    for node_type in gpu:
        assert node_type["min_workers"] == 0 and 1 <= node_type["max_workers"] <= cluster_config["max_workers"]
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    cpu = [t for n, t in types.items() if t not in gpu and n != cluster_config["head_node_type"]]
    assert cpu and all(t["min_workers"] == 0 for t in cpu), "no CPU worker type for decoding"


def test_cluster_yaml_gives_every_node_an_instance_profile_and_no_keys(cluster_config):
    for name, node_type in cluster_config["available_node_types"].items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), f"{name}: {arn}"
    with open(CLUSTER_YAML) as f:
        text = f.read()
    assert not re.search(r"AWS_(SECRET_)?ACCESS_KEY|aws_access_key_id|AKIA[0-9A-Z]{16}", text)


def test_cluster_yaml_installs_the_project_with_pyproject_ray_pin(cluster_config):
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    ray_pin = next(d for d in deps if d.startswith("ray["))
    setup = "\n".join(cluster_config["setup_commands"])
    assert ray_pin in setup, f"setup_commands must install {ray_pin!r} (pyproject's pin)"
    mount = next(remote for remote, local in cluster_config["file_mounts"].items() if local == ".")
    assert re.search(rf"pip install .*-e {re.escape(mount)}(\s|$)", setup), "setup_commands must pip install the project"
    version = re.search(r">=(\d+\.\d+)", ray_pin).group(1)
    images = [cluster_config["docker"]["image"], cluster_config["docker"]["head_image"]]
    images += [t["docker"]["worker_image"] for t in cluster_config["available_node_types"].values() if "docker" in t]
    assert all(re.search(rf":{re.escape(version)}\.\d+-py311-", image) for image in images), images


# ------------------------------------------------------------------- a real cluster
@pytest.fixture(scope="module")
def cluster():
    """A head node that takes no work (0 CPUs, as in cluster.yaml) and one worker node (2 CPUs), stopped after the module."""
    local = LocalCluster(head_cpus=0, worker_cpus=2)
    try:
        local.start(workers=1)
        yield local
    finally:
        local.stop()


def make_frames(root: str, episodes: int, per_episode: int, seed: int = 0) -> dict[str, int]:
    """Folder and tar episodes of generated frames; returns frames per episode."""
    rng = np.random.default_rng(seed)
    counts = {}
    for e in range(episodes):
        eid = f"S01E{e + 1:02d}"
        frames = {f"frame_{i:05d}.jpg": encode(class_image((i // 4) % len(CLASSES), rng, 40)) for i in range(per_episode)}
        if e % 2:
            write_tar(os.path.join(root, f"{eid}.tar"), frames)
        else:
            os.makedirs(os.path.join(root, eid))
            for name, data in frames.items():
                with open(os.path.join(root, eid, name), "wb") as f:
                    f.write(data)
        counts[eid] = per_episode
    return counts


def assert_one_row_per_frame(labels_uri: str, counts: dict[str, int]) -> None:
    table = schema.labels_dataset(labels_uri).to_table(columns=["episode", "frame", "label"]).to_pandas()
    assert table.groupby("episode").size().to_dict() == counts
    assert not table.duplicated(["episode", "frame"]).any()
    for eid, n in counts.items():
        assert sorted(table.loc[table.episode == eid, "frame"]) == list(range(n))
    assert table["label"].notna().all()
    assert not storage.exists(storage.join(labels_uri, schema.ERRORS_DIR)), "frames were recorded as errors"


@pytest.fixture(scope="module")
def s3_data(s3_server, tmp_path_factory):
    """A bucket holding a Kaggle-layout training set and a frame dump of 4 episodes."""
    bucket = s3_server.new_bucket()
    client = s3_server.client()
    root = tmp_path_factory.mktemp("cluster-data")
    write_class_folders(str(root / "train"), CLASSES, per_class=20, size=40)
    (root / "train" / CLASSES[0] / "notes.txt").write_text("not an image: ignored by the listing")
    counts = make_frames(str(root / "frames"), episodes=4, per_episode=24)
    return {
        "bucket": bucket,
        "train": upload_tree(client, bucket, str(root / "train"), "train"),
        "frames": upload_tree(client, bucket, str(root / "frames"), "frames"),
        "counts": counts,
    }


TRAIN_EPOCHS = 5


@pytest.fixture(scope="module")
def trained(cluster, s3_data):
    """jobs/train.py submitted to the cluster, its rank-0 Ray Train worker SIGKILLed once epoch 3 is logged.

    One training run serves both the end-to-end test and the failure test: on 2
    cores a second run would cost more than a minute. Ray Train's controller collects
    reported checkpoints every couple of seconds, so a checkpoint reported just
    before a failure may not count yet: by epoch 3, epoch 1's has.
    """
    model = f"s3://{s3_data['bucket']}/models/r18"
    job = cluster.submit(
        "jobs/train.py", "--data", s3_data["train"], "--output", model, *TRAIN_FLAGS,
        "--finetune-epochs", str(TRAIN_EPOCHS), "--patience", str(TRAIN_EPOCHS), "--max-failures", "2",
        job_id=f"train-{uuid.uuid4().hex[:6]}", verbose=True,  # the workers' lines name rank 0's pid
    )  # fmt: skip
    logs = cluster.wait_for_log(job, f"epoch   3/{TRAIN_EPOCHS}", timeout=400)
    # Rank 0, the worker that prints the epoch lines and writes the checkpoints.
    rank0 = [int(p) for p in re.findall(rf"RayTrainWorker pid=(\d+)\)[^\n]*epoch   3/{TRAIN_EPOCHS}", logs)]
    victims = [p for p in rank0[:1] if p in cluster.worker_processes("RayTrainWorker")]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    status = cluster.wait(job, timeout=400)
    return {"job": job, "status": status, "model": model, "logs": cluster.logs(job), "killed": victims}


@pytest.mark.slow
def test_train_then_label_jobs_on_two_nodes(cluster, s3_server, s3_data, trained, capsys):
    assert trained["status"] == "SUCCEEDED", trained["logs"][-5000:]
    model = trained["model"]
    for name in ("model.pt", "config.json", "classes.json", "metrics.json", "confusion_matrix.png", "curves.png"):
        assert storage.is_file(storage.join(model, name)), name
    metrics = storage.read_json(storage.join(model, "metrics.json"))
    assert metrics["epochs_run"] == TRAIN_EPOCHS
    # 9 validation pictures (3 a character): one is 11 points, and a run that lost a worker
    # mid-way reaches 7 or 8 of them; chance is 3.
    assert metrics["validation"]["accuracy"] >= 0.7, metrics["history"]
    assert any(e.relpath.startswith("checkpoint_") for e in storage.list_files(storage.join(model, "_train")))
    artifact = load_artifact(model)
    assert artifact.classes == CLASSES and artifact.model_id.startswith("resnet18-")
    # evaluate reads the model and a labelled set straight from S3 too (notes.txt is not an image: not listed).
    capsys.readouterr()
    assert cli.main(["evaluate", "--model", model, "--data", s3_data["train"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_images"] == 20 * len(CLASSES)

    # The label job rides out an S3 outage: its endpoint resets every connection for a few
    # seconds mid-run (cleaning up, listing, reading); the clients' retries carry it through.
    labels = f"s3://{s3_data['bucket']}/labels"
    proxy = S3Proxy(s3_server.port)
    try:
        job = cluster.submit(
            "jobs/label.py", "--model", model, "--frames", s3_data["frames"], "--output", labels, "--fps", "24",
            "--batch-size", "8", job_id=f"label-{uuid.uuid4().hex[:6]}", env_vars={"AWS_ENDPOINT_URL": proxy.endpoint},
        )  # fmt: skip
        cluster.wait_for_log(job, "to do", timeout=300)
        proxy.outage(seconds=4)
        assert cluster.wait(job, timeout=400) == "SUCCEEDED", cluster.logs(job)[-5000:]
        assert proxy.refused > 0, "the job made no S3 request during the outage, so the test proved nothing"
    finally:
        proxy.close()
    # By default a job's log is its own lines and progress bar, not its Ray workers' output.
    logs = cluster.logs(job)
    worker_lines = re.findall(r"^\S*\([A-Za-z][^\n]*? pid=\d+\)", logs, flags=re.M)  # "(MapWorker(...) pid=123) ..."
    assert "label  [" in logs and "label: done in" in logs and not worker_lines and "Execution plan" not in logs, logs[-3000:]
    assert_one_row_per_frame(labels, s3_data["counts"])
    # The trained model tells the generated characters apart: frame i shows class (i // 4) % 3.
    table = schema.labels_dataset(labels).to_table(columns=["frame", "label"]).to_pandas()
    expected = [CLASSES[(f // 4) % len(CLASSES)] for f in table["frame"]]
    assert (table["label"] == expected).mean() >= 0.6
    # The labels answer questions straight from S3, as on a laptop.
    summary = query.summary(labels)
    assert summary.set_index("episode")["frames"].to_dict() == s3_data["counts"]
    assert {c for c in query.screen_time(labels)["character"]} <= set(CLASSES)


@pytest.mark.slow
def test_bad_input_ends_failed_with_one_sentence_in_the_logs(cluster, s3_data, trained):
    missing = f"s3://{s3_data['bucket']}/no-such-frames"
    job = cluster.submit(
        "jobs/label.py", "--model", trained["model"], "--frames", missing, "--output", f"s3://{s3_data['bucket']}/x",
        job_id=f"bad-{uuid.uuid4().hex[:6]}",
    )  # fmt: skip
    assert cluster.wait(job, timeout=200) == "FAILED"
    done = cluster.ray("job", "logs", "--address", cluster.address, job)
    assert done.returncode == 0, done.stderr
    assert f"simpsons-ray label: error: --frames {missing} does not exist" in done.stdout
    assert "Traceback" not in done.stdout
    status = cluster.ray("job", "status", "--address", cluster.address, job)
    assert "failed" in (status.stdout + status.stderr).lower()


@pytest.mark.slow
def test_two_jobs_on_one_output_survive_losing_a_worker_node(cluster, s3_server, s3_data, trained, tmp_path):
    """Two jobs on overlapping episodes share one output; a node dies with episodes in flight.

    The second job is submitted while the first writes. Every frame ends up exactly
    once, each episode labelled by the one job that held its lease.
    """
    counts = make_frames(str(tmp_path / "frames"), episodes=8, per_episode=200, seed=3)
    frames = upload_tree(s3_server.client(), s3_data["bucket"], str(tmp_path / "frames"), "frames-node-loss")
    labels = f"s3://{s3_data['bucket']}/labels-node-loss"
    ids = sorted(counts)
    cluster.add_worker()  # two worker nodes: whichever gets work first dies, the other survives
    workers = cluster.alive_workers()
    common = ["--model", trained["model"], "--frames", frames, "--output", labels, "--num-workers", "2", "--batch-size", "8"]
    first = cluster.submit("jobs/label.py", *common, "--episodes", ",".join(ids[:6]), job_id=f"nodeloss-{uuid.uuid4().hex[:6]}", verbose=True)
    cluster.wait_for_log(first, "to do", timeout=300)  # its leases are taken
    second = cluster.submit("jobs/label.py", *common, "--episodes", ",".join(ids[2:]), job_id=f"second-{uuid.uuid4().hex[:6]}")
    cluster.wait_for_log(first, "committed", timeout=300)
    # Kill a worker node while it holds part of the jobs (a read, decode or predictor worker) of
    # either job, as long as one runs. Either worker node will do: waiting for one chosen in
    # advance raced the jobs' end, since Ray may give all the work to the head and the other.
    def busy_node():
        return next((n for n in workers if n.busy_workers()), None)

    wait_until(lambda: busy_node() or "RUNNING" not in (cluster.status(first), cluster.status(second)), timeout=60)
    victim = busy_node()
    assert victim is not None, "no worker node ran part of the labeling jobs while they ran"
    cluster.kill_node(victim)
    for job in (first, second):
        assert cluster.wait(job, timeout=400) == "SUCCEEDED", cluster.logs(job)[-5000:]
    assert_one_row_per_frame(labels, counts)
    summaries = [storage.read_json(e.uri) for e in storage.list_files(storage.join(labels, schema.RUNS_DIR))]
    assert len(summaries) == 2 and sum(s["frames_labelled"] for s in summaries) == sum(counts.values())
    assert sum(s["episodes_labelled"] for s in summaries) == len(ids)  # each episode by one job
    second_summary = next(s for s in summaries if s["config"]["episodes"] == ids[2:])
    # The overlap was held by the first job, or already committed by it, when the second looked.
    assert second_summary["episodes_skipped"] + len(second_summary["episodes_held_elsewhere"]) == 4, second_summary
    leases = [e.relpath for e in storage.list_files(storage.join(labels, "_leases")) if e.relpath.endswith(".json")]
    assert not leases and not storage.list_files(storage.join(labels, "_tmp"))


@pytest.mark.slow
def test_training_resumes_from_its_checkpoint_after_a_worker_is_killed(trained):
    assert trained["killed"], "no Ray Train worker process was found to kill"
    assert trained["status"] == "SUCCEEDED", trained["logs"][-5000:]
    # Killed once epoch 3 was logged: at least epoch 1's checkpoint was registered by then.
    resumed = [int(m) for m in re.findall(r"resuming from epoch (\d+)", trained["logs"])]
    assert resumed and resumed[0] >= 1, "\n".join(
        line for line in trained["logs"].splitlines() if re.search(r"TrainController|resum|epoch |[Ee]rror", line)
    )[-6000:]
    metrics = storage.read_json(storage.join(trained["model"], "metrics.json"))
    # Every epoch exactly once in the history: the epochs before the kill came back
    # from the checkpoint instead of being run again.
    assert [row["epoch"] for row in metrics["history"]] == list(range(1, TRAIN_EPOCHS + 1))


# ------------------------------------------------------------------------- autoscaling
def test_node_types_come_from_the_cluster_launchers_config(ray_session, tmp_path, monkeypatch):
    """On a `ray up` head the autoscaler's node types are in its bootstrap config; cluster.yaml leaves resources to the cloud."""
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(yaml.safe_dump({
        "head_node_type": "head", "max_workers": 6,
        "available_node_types": {
            "head": {"resources": {"CPU": 0}, "node_config": {}},
            "cpu": {"resources": {"CPU": 8}, "max_workers": 4, "node_config": {}},
            "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 2, "node_config": {}},
        },
    }))  # fmt: skip
    monkeypatch.setattr(cluster_lib, "LAUNCHER_CONFIG", str(bootstrap))
    types = cluster_lib.node_types()
    assert {t.name: t.max_count for t in types} == {"head": 1, "cpu": 4, "gpu": 2}
    assert cluster_lib.can_add("GPU", types) and cluster_lib.max_cpus() == 8 * 4 + 8 * 2 and cluster_lib.node_cpus() == 8
    no_gpu = [t for t in types if t.name != "gpu"]
    assert not cluster_lib.can_add("GPU", no_gpu)
    # cluster.yaml names instance types; their resources are filled in when the cluster starts: GPUs may come.
    assert cluster_lib.can_add("GPU", cluster_lib._launcher_node_types(CLUSTER_YAML))
    monkeypatch.setattr(cluster_lib, "LAUNCHER_CONFIG", str(tmp_path / "missing.yaml"))
    assert cluster_lib.node_types() is None  # the test session's local Ray: no autoscaler


# Ray Data's cluster autoscaler asks for a node once the cluster's logical CPU use, averaged
# over a window (10 s by default), stays above 0.75, at most every 10 s; on these 2-CPU
# nodes a labeling job's reservations (a decode task's CPU, half of the actor's) sit right
# at that line, so with the defaults the second node came 40-80 s into the job, and a
# 3,600-frame job on a quiet machine had ended by then. Shorter windows make the request
# come within seconds of the load; the job is then far longer than the time growth takes.
FAST_RAY_DATA_AUTOSCALER = {"RAY_DATA_CLUSTER_UTIL_AVG_WINDOW_S": "2", "RAY_DATA_MIN_GAP_BETWEEN_AUTOSCALING_REQUESTS": "2"}


@pytest.mark.slow
def test_labeling_scales_out_on_an_autoscaling_cluster_that_starts_with_no_workers(shapes_model, tmp_path):
    """Ray's fake autoscaler adds worker nodes for the job's tasks; the predictor pool grows past one actor onto them.

    The job has minutes of work (24,000 frames), so it is still running when the pool
    grows; the test stops it once growth is seen, or fails, with the timeline, if the
    pool never grows while the frames queue. Every frame landing exactly once is the
    other cluster tests' to prove.
    """
    frames = tmp_path / "frames"
    frames.mkdir()
    pictures = [encode(class_image(k % len(CLASSES), np.random.default_rng(k), 40)) for k in range(12)]
    for e in range(8):
        write_tar(str(frames / f"S01E{e + 1:02d}.tar"), {f"frame_{i:05d}.jpg": pictures[i % 12] for i in range(3000)})
    autoscaling = FakeAutoscalingCluster(worker_cpus=2, max_workers=2)
    log = tmp_path / "job.log"
    timeline: list[tuple[float, int, int]] = []  # (seconds, worker nodes, predictor actors)
    try:
        autoscaling.start()
        assert autoscaling.worker_nodes() == 0
        start = time.monotonic()
        with open(log, "w") as out:
            job = subprocess.Popen(
                [sys.executable, os.path.join(REPO, "jobs", "label.py"), "--model", shapes_model, "--frames", str(frames),
                 "--output", str(tmp_path / "labels"), "--batch-size", "8"],
                env={**autoscaling.env, **FAST_RAY_DATA_AUTOSCALER}, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

            def grown() -> bool:
                timeline.append((round(time.monotonic() - start), autoscaling.worker_nodes(), autoscaling.actors("FramePredictor")))
                return timeline[-1][2] >= 2 or job.poll() is not None

            wait_until(grown, timeout=300, every=0.5)
            running = job.poll() is None
            job.terminate()
            job.wait(timeout=60)
    finally:
        autoscaling.stop()
    shown = f"(seconds, nodes, actors): {timeline[::4]}; the job's log ends: {log.read_text()[-2000:]}"
    assert running, f"the job ended before the pool grew {shown}"
    assert max(nodes for _, nodes, _ in timeline) >= 1, f"the autoscaler never added a worker node {shown}"
    assert max(actors for _, _, actors in timeline) >= 2, f"the predictor pool never grew past one actor {shown}"
