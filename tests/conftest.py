"""Shared fixtures: one local Ray per session, an S3-compatible server on loopback, images.

Nothing here mocks a library call: the S3 server is moto's real HTTP server, reached
through the standard AWS environment exactly as a user's endpoint would be.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import pytest

from imagegen import free_port  # noqa: E402  (tests/ is on sys.path under pytest)
from labelstudio_server import label_studio  # noqa: E402, F401  (the session fixture: a real Label Studio)
from waiting import wait_until  # noqa: E402

# Set before anything starts Ray, so that Ray's workers inherit the same
# environment as this process (AWS endpoint included).
_S3_PORT = free_port()
os.environ.update(
    {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_S3_PORT}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
)


class S3Server:
    """moto's S3 server over HTTP on loopback; ``stop()``/``start()`` simulate an outage."""

    def __init__(self, port: int):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not wait_until(self.answers, timeout=30, every=0.1):
            raise RuntimeError("moto S3 server did not start")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self):
        import boto3

        return boto3.client("s3")

    def new_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """A running S3-compatible server; note that moto keeps state in memory only."""
    server = S3Server(_S3_PORT)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket name on the session's S3 server."""
    return s3_server.new_bucket()


@pytest.fixture(params=["local", "s3"])
def labels_output(request, tmp_path) -> str:
    """A labels output not written yet: a local folder, then an S3 prefix (a test that takes it runs on both)."""
    if request.param == "local":
        return str(tmp_path / "labels")
    return f"s3://{request.getfixturevalue('s3_bucket')}/labels"


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole test session (2 CPUs, like CI)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shapes_model(tmp_path_factory) -> str:
    """A model artifact that tells the 4 generated shapes apart (imagegen.train_shapes_model)."""
    from imagegen import train_shapes_model

    return train_shapes_model(str(tmp_path_factory.mktemp("shapes_model")))
