"""A real multi-node Ray cluster on loopback, driven the way a user drives one: `ray start`, `ray job`.

Every node is a separate `ray start` with its own temp dir and ports, so the cluster
never meets the test session's own local Ray (``ray_session``) or anyone else's:
``ray.init()`` without an address only finds clusters recorded under /tmp/ray. The
nodes share a random auth token (Ray's token authentication), passed in their
environment only. Nodes are stopped, or killed to simulate a lost machine, by the
process ids they own (found under /proc), never by name.

``S3Proxy`` stands between the jobs and the S3 server so a test can take the
endpoint away for a few seconds without losing the server's in-memory buckets.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

from imagegen import free_port
from waiting import wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# ------------------------------------------------------------------------ processes
def _children() -> dict[int, list[int]]:
    """ppid -> child pids, from /proc."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(name))
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (Ray's daemons carry their temp dir)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and text in _cmdline(int(p))]


def process_tree(roots: list[int]) -> list[int]:
    """``roots`` and all their descendants (Ray's workers and agents are children of the raylet)."""
    children, seen, stack = _children(), [], list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.append(pid)
        stack.extend(children.get(pid, []))
    return seen


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -------------------------------------------------------------------------- cluster
@dataclass
class RayNode:
    temp_dir: str
    head: bool

    def pids(self) -> list[int]:
        return process_tree(processes_mentioning(self.temp_dir + "/"))

    def busy_workers(self) -> list[str]:
        """Titles of the node's Ray workers that run a task or an actor (``ray::<name>``)."""
        idle = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
        titles = [_cmdline(p).strip() for p in self.pids()]
        return [t for t in titles if t.startswith("ray::") and not t.startswith(idle)]

    def kill(self) -> None:
        """SIGKILL every process of the node at once, as when the machine goes away."""
        _signal_all(self.pids(), signal.SIGKILL)


@dataclass
class LocalCluster:
    """A head node plus worker nodes, each its own `ray start` on 127.0.0.1."""

    head_cpus: int = 2
    worker_cpus: int = 2
    object_store_bytes: int = 150 * 1024 * 1024
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: list[RayNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def env(self) -> dict[str, str]:
        # The AWS_* variables conftest set are inherited: every node, and so every
        # job, reaches the test S3 server as a real cluster reaches S3.
        return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}

    def _start_node(self, head: bool) -> RayNode:
        # Short paths: Ray's Unix sockets live under the temp dir (108-byte limit).
        temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
        cmd = [
            "ray", "start", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.head_cpus if head else self.worker_cpus}", "--num-gpus=0",
            f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        ]  # fmt: skip
        if head:
            cmd += [
                "--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
            ]  # fmt: skip
        else:
            cmd += [f"--address=127.0.0.1:{self.gcs_port}"]
        node = RayNode(temp_dir, head)
        self.nodes.append(node)  # before starting, so stop() cleans up a half-started node
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"`ray start` failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return node

    def start(self, workers: int = 1) -> "LocalCluster":
        self._start_node(head=True)
        for _ in range(workers):
            self._start_node(head=False)
        self.wait_for_nodes(1 + workers)
        return self

    def add_worker(self) -> RayNode:
        node = self._start_node(head=False)
        self.wait_for_nodes(len(self.alive_workers()) + 1)
        return node

    def alive_workers(self) -> list[RayNode]:
        return [n for n in self.nodes if not n.head and n.pids()]

    def kill_node(self, node: RayNode) -> None:
        node.kill()
        wait_until(lambda: not any(_alive(p) for p in node.pids()), timeout=30)
        self.nodes.remove(node)
        shutil.rmtree(node.temp_dir, ignore_errors=True)

    def stop(self) -> None:
        """Stop every node: SIGTERM, then SIGKILL what is left; remove the temp dirs."""
        pids = [p for n in self.nodes for p in n.pids()]
        _signal_all(pids, signal.SIGTERM)
        wait_until(lambda: not any(_alive(p) for p in pids), timeout=15)
        _signal_all([p for n in self.nodes for p in n.pids()] + pids, signal.SIGKILL)
        for node in self.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        self.nodes.clear()

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        def enough() -> bool:
            try:
                return sum(n["raylet"]["state"] == "ALIVE" for n in self._get("/nodes?view=summary")["data"]["summary"]) >= count
            except (OSError, KeyError, ValueError):
                return False

        if not wait_until(enough, timeout, every=0.5):
            raise RuntimeError(f"the cluster did not reach {count} live nodes in {timeout:.0f} s")

    # ------------------------------------------------------------------------ jobs
    def _get(self, path: str) -> dict:
        import urllib.request

        request = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def ray(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """Run the `ray` CLI against this cluster (the token travels in the environment)."""
        return subprocess.run(["ray", *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def submit(self, script: str, *args: str, job_id: str, env_vars: dict[str, str] | None = None, verbose: bool = False) -> str:
        """`ray job submit --working-dir . -- python <script> <args>`, without waiting.

        ``verbose``: the job's logs carry its Ray workers' output too (SIMPSONS_RAY_VERBOSE),
        for tests that read a worker's lines; by default a job shows only its own lines.
        """
        cmd = ["job", "submit", "--address", self.address, "--working-dir", ".", "--submission-id", job_id, "--no-wait"]
        env_vars = {**(env_vars or {}), **({"SIMPSONS_RAY_VERBOSE": "1"} if verbose else {})}
        if env_vars:
            cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars})]
        done = self.ray(*cmd, "--", "python", script, *args)
        if done.returncode != 0:
            raise RuntimeError(f"`ray job submit` failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return job_id

    def status(self, job_id: str) -> str:
        return self._get(f"/api/jobs/{job_id}")["status"]

    def logs(self, job_id: str) -> str:
        return self._get(f"/api/jobs/{job_id}/logs")["logs"]

    def wait(self, job_id: str, timeout: float = 300) -> str:
        """Block until the job ends; returns its final status (or raises, with its logs, on timeout)."""
        def ended() -> str | None:
            status = self.status(job_id)
            return status if status in TERMINAL else None

        status = wait_until(ended, timeout, every=0.5)
        if status:
            return status
        self.ray("job", "stop", "--address", self.address, job_id)
        raise TimeoutError(f"job {job_id} still running after {timeout:.0f} s; its logs:\n{self.logs(job_id)[-5000:]}")

    def wait_for_log(self, job_id: str, text: str, timeout: float = 300) -> str:
        """Block until ``text`` appears in the job's logs; returns the logs."""

        def logged() -> str | None:
            logs = self.logs(job_id)
            if text in logs:
                return logs
            if self.status(job_id) in TERMINAL:
                raise AssertionError(f"job {job_id} ended before logging {text!r}; its logs:\n{logs[-5000:]}")
            return None

        found = wait_until(logged, timeout, every=0.3)
        if found is None:
            raise TimeoutError(f"job {job_id} did not log {text!r} in {timeout:.0f} s")
        return found

    def worker_processes(self, title: str) -> list[int]:
        """Pids of this cluster's Ray worker processes whose title contains ``title``."""
        return [p for n in self.nodes for p in n.pids() if title in _cmdline(p)]


# ----------------------------------------------------------------------------- S3
class S3Proxy:
    """A TCP proxy on loopback in front of the S3 server; ``outage()`` takes the endpoint away.

    During an outage every connection, open or new, is reset, as when an endpoint
    restarts or a network path flaps; the server behind keeps its buckets.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._down = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self.refused = 0  # sockets reset during outages, new connections and open ones
        self.proxied = 0
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        # shutdown() first: a bare close() leaves the connection up while a pump
        # thread is blocked in recv() on it, and the client would wait on a black hole.
        for step in (
            lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"),
            lambda: sock.shutdown(socket.SHUT_RDWR),
            sock.close,
        ):
            try:
                step()
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._down.is_set():
                self.refused += 1
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                self._reset(client)
                continue
            self.proxied += 1
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with self._lock:
                self._open.discard(sock)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def outage(self, seconds: float) -> None:
        """Reset every open connection and every new one for ``seconds``."""
        self._down.set()
        with self._lock:
            open_now = list(self._open)
            self._open.clear()
        for sock in open_now:
            self.refused += 1
            self._reset(sock)
        time.sleep(seconds)
        self._down.clear()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for sock in self._open:
                self._reset(sock)


# ---------------------------------------------------------------- autoscaling cluster
@dataclass
class FakeAutoscalingCluster:
    """Ray's fake multi-node autoscaler on loopback: a head that takes no work, worker nodes added on demand.

    The same provider ``ray.cluster_utils.AutoscalingCluster`` starts, but started
    like LocalCluster's nodes (own temp dir and ports, stopped by the processes it
    owns): AutoscalingCluster runs ``ray stop --force``, which would take down
    every other Ray on the machine, the test session's included, and its config
    template is not shipped in Ray's wheel. The autoscaler starts each worker node
    as a set of local processes below its monitor process.
    """

    worker_cpus: int = 2
    max_workers: int = 2
    object_store_bytes: int = 150 * 1024 * 1024
    gcs_port: int = field(default_factory=free_port)
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="ra", dir="/tmp"))
    token: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def config(self) -> dict:
        return {
            "cluster_name": "fake-autoscaling",
            "max_workers": self.max_workers,
            "provider": {
                "type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                "disable_launch_config_check": True, "gcs_address": self.address,
            },
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                "cpu_worker": {
                    "resources": {"CPU": self.worker_cpus, "object_store_memory": self.object_store_bytes},
                    "node_config": {}, "min_workers": 0, "max_workers": self.max_workers,
                },
            },
            "head_node_type": "ray.head.default",
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 5,
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
            "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts_sync_continuously": False,
        }  # fmt: skip

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_ADDRESS": self.address}

    def start(self) -> "FakeAutoscalingCluster":
        config_path = os.path.join(self.temp_dir, "autoscaling.json")
        with open(config_path, "w") as f:
            json.dump(self.config(), f)
        cmd = [
            "ray", "start", "--head", f"--temp-dir={self.temp_dir}", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
            f"--autoscaling-config={config_path}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false",
            f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}", f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        ]  # fmt: skip
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"`ray start` failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return self

    def pids(self) -> list[int]:
        return process_tree(processes_mentioning(self.temp_dir + "/"))

    def worker_nodes(self) -> int:
        """Worker nodes the autoscaler has started (a raylet each, below the head's monitor)."""
        return sum(1 for p in self.pids() if "raylet" in _cmdline(p).split(" ", 1)[0]) - 1

    def actors(self, title: str) -> int:
        return sum(1 for p in self.pids() if title in _cmdline(p))

    def stop(self) -> None:
        pids = self.pids()
        _signal_all(pids, signal.SIGTERM)
        wait_until(lambda: not any(_alive(p) for p in pids), timeout=5)  # nothing here needs a graceful end
        _signal_all(self.pids() + pids, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
