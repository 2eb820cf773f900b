"""A real Label Studio on loopback for the tests: the server a reviewer uses, with SQLite and no browser.

Why a venv of its own: ``label-studio==1.23.2`` pins numpy>=2.2.6, pyarrow>=24,<25, pandas, Django, boto3,
protobuf and grpcio versions of its own; installed beside the project it would move the project's numpy and
pyarrow. So it lives in ``$SIMPSONS_RAY_LABEL_STUDIO_VENV`` or ``~/.cache/simpsons-ray/label-studio-1.23.2``
and the tests talk to it over HTTP only (``requests``, which Ray already needs; no label_studio_sdk here).
The project's own dependencies do not name it.

Timings on the 2-core machine: the first install (``python -m venv`` + ``pip install label-studio==1.23.2``,
about 150 packages from the local mirror) took 93 s on a quiet machine, about 2 min on a busy one; later
sessions reuse the venv (a marker file is written after a successful install). The server answers ``/health``
43 s after start on a fresh data directory when the machine was quiet, 66 s to 170 s when it was shared and
busy (Django's migrations of the new SQLite file are most of it: 13 s on an already migrated one).

What 1.23.2 does, read in its source and checked against the running server:
- Auth: new organizations get personal access tokens (a JWT refresh token, exchanged at ``/api/token/refresh/``
  for a short ``Bearer`` access token) and legacy tokens are refused with 401 unless the organization enables
  them. ``--enable-legacy-api-token`` (and ``LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true``) enables them, and
  ``--user-token`` sets the admin's, so the client sends ``Authorization: Token <key>``.
- The second reviewer signs up through the sign-up form, as a person would (it joins the first organization),
  and reads its legacy token from ``/api/current-user/token``.
- ``/data/local-files/?d=images/a.jpg`` is served only for files under a Local Files storage connected to a
  project the user can see (else 404), whose folder is a subfolder of LOCAL_FILES_DOCUMENT_ROOT (the root
  itself is refused): ``serve_local_files``.
- Label Studio reads many settings from unprefixed environment names too (``HOST``, ``PORT``, ``USERNAME``,
  ``PASSWORD``, ``DEBUG``...), so the server gets a minimal environment. Sentry is switched off
  (``SENTRY_DSN=``): with the sentry-sdk 3 that pip now resolves, its init raises and the server never starts.
- The JSON export is the Export page's own call, ``GET /api/projects/{id}/export?exportType=JSON``: only tasks
  with at least one annotation (a skipped one counts), ``predictions`` as prediction ids only,
  ``completed_by`` as a user id.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import requests

from imagegen import free_port
from waiting import wait_until

VERSION = "1.23.2"
VENV_VARIABLE = "SIMPSONS_RAY_LABEL_STUDIO_VENV"
MARKER = "simpsons-ray-install-complete"
ADMIN = "admin@example.com"
ADMIN_PASSWORD = "admin-password-1"
ADMIN_TOKEN = "simpsons-ray-admin-token-0123456789"
REVIEWER = "reviewer2@example.com"
REVIEWER_PASSWORD = "reviewer-password-2"
INSTALL_TIMEOUT_S = 1800
START_TIMEOUT_S = 600  # about 40 s on a quiet 2-core machine, 3 min when it is shared and busy


def venv_dir() -> pathlib.Path:
    """Where the Label Studio venv lives: ``$SIMPSONS_RAY_LABEL_STUDIO_VENV`` or the user's cache."""
    configured = os.environ.get(VENV_VARIABLE)
    if configured:
        return pathlib.Path(configured).expanduser()
    return pathlib.Path.home() / ".cache" / "simpsons-ray" / f"label-studio-{VERSION}"


def ensure_venv(venv: pathlib.Path) -> float | None:
    """Create the venv and install Label Studio unless a finished install is there; seconds it took, or None.

    One session installs at a time (a lock file beside the venv); a half-made venv is cleared and made anew.
    """
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = venv / MARKER
        if marker.exists() and marker.read_text().strip() == f"label-studio=={VERSION}" and (venv / "bin" / "label-studio").exists():
            return None
        if venv.exists() and any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
            pytest.fail(f"{venv} is neither empty nor a venv, so it is left alone: point {VENV_VARIABLE} elsewhere.", pytrace=False)
        return _install(venv)


def _install(venv: pathlib.Path) -> float:
    log = venv.parent / f"{venv.name}-install.log"
    python = venv / "bin" / "python"
    by_hand = f"{sys.executable} -m venv {venv} && {python} -m pip install label-studio=={VERSION}"
    started = time.monotonic()
    with open(log, "w") as out:
        try:
            ok = all(
                subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S).returncode == 0
                for command in (
                    [sys.executable, "-m", "venv", "--clear", str(venv)],
                    [str(python), "-m", "pip", "install", f"label-studio=={VERSION}"],
                )
            )
        except subprocess.TimeoutExpired:
            ok = False
    if not ok:
        pytest.fail(f"Installing Label Studio {VERSION} into its own venv failed (pip's output is in {log}); run `{by_hand}` by hand.",
                    pytrace=False)
    (venv / MARKER).write_text(f"label-studio=={VERSION}\n")
    return time.monotonic() - started


def server_environment(venv: pathlib.Path, data_dir: pathlib.Path, document_root: pathlib.Path, home: pathlib.Path) -> dict[str, str]:
    """A minimal environment: Label Studio reads unprefixed names (HOST, PORT, USERNAME...) as settings too."""
    return {
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "DJANGO_DB": "sqlite",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
    }


class LabelStudioServer:
    """``label-studio start`` from the venv, in its own process group, logging to a file."""

    def __init__(self, venv: pathlib.Path, root: pathlib.Path):
        self.venv = venv
        self.data_dir = root / "data"
        self.document_root = root / "documents"
        self.home = root / "home"
        self.log_path = root / "label-studio.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def start(self) -> None:
        for folder in (self.data_dir, self.document_root, self.home):
            folder.mkdir(parents=True, exist_ok=True)
        command = [
            str(self.venv / "bin" / "label-studio"), "start", "--no-browser",
            "--internal-host", "127.0.0.1", "--port", str(self.port),
            "--username", ADMIN, "--password", ADMIN_PASSWORD,
            "--user-token", ADMIN_TOKEN, "--enable-legacy-api-token",
        ]  # fmt: skip
        started = time.monotonic()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(command, env=server_environment(self.venv, self.data_dir, self.document_root, self.home),
                                         cwd=self.home, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        if not wait_until(self._up_or_gone, timeout=START_TIMEOUT_S, every=0.5) or not self._healthy():
            code = self.proc.poll()
            self.stop()
            pytest.fail(f"Label Studio did not answer {self.url}/health within {START_TIMEOUT_S} s (exit code {code}); "
                        f"its log ({self.log_path}) ends:\n{self.log_tail()}", pytrace=False)
        self.startup_seconds = time.monotonic() - started

    def _healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=2).json().get("status") == "UP"
        except (requests.RequestException, ValueError):
            return False

    def _up_or_gone(self) -> bool:
        # It moves to the next port by itself when ours was taken meanwhile: that is a failed start, say so at once.
        moved = "is in use" in self.log_path.read_text(errors="replace")
        return self.proc is None or self.proc.poll() is not None or moved or self._healthy()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        self.proc = None


class LabelStudioError(AssertionError):
    """A call Label Studio answered with an error status; the message holds its answer."""


class LabelStudioClient:
    """What the tests do to Label Studio, over its HTTP API as the UI does it; users are named by email."""

    def __init__(self, url: str, tokens: dict[str, str], document_root: pathlib.Path):
        self.url = url
        self.tokens = tokens
        self.document_root = document_root
        self.install_seconds: float | None = None
        self.startup_seconds: float | None = None
        self.log_path: pathlib.Path | None = None

    def request(self, method: str, path: str, user: str | None = None, **kwargs) -> requests.Response:
        """One authenticated call as ``user`` (the admin by default); an error status raises LabelStudioError."""
        headers = {"Authorization": f"Token {self.tokens[user or ADMIN]}", **kwargs.pop("headers", {})}
        response = requests.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kwargs)
        if response.status_code >= 400:
            raise LabelStudioError(f"{method} {path} -> {response.status_code}: {response.text[:2000]}")
        return response

    def create_project(self, title: str, label_config_xml: str) -> int:
        """A new project (titles shorter than 3 characters are refused); its id."""
        return self.request("POST", "/api/projects", json={"title": title, "label_config": label_config_xml}).json()["id"]

    def serve_local_files(self, project_id: int, folder: str = "images") -> int:
        """Connect ``document_root/folder`` as the project's Local Files storage, so its files are served; the storage id."""
        path = self.document_root / folder
        path.mkdir(parents=True, exist_ok=True)
        body = {"project": project_id, "path": str(path), "title": folder, "use_blob_urls": True}
        return self.request("POST", "/api/storages/localfiles/", json=body).json()["id"]

    def import_tasks(self, project_id: int, tasks: list[dict]) -> list[int]:
        """Import tasks in Label Studio's JSON task format (``data``, optional ``predictions``); their ids, in order."""
        answer = self.request("POST", f"/api/projects/{project_id}/import", params={"return_task_ids": "true"}, json=tasks).json()
        return answer["task_ids"]

    def tasks(self, project_id: int) -> list[dict]:
        """Every task of the project as the tasks API lists them, page by page."""
        found: list[dict] = []
        page = 1
        while True:
            params = {"project": project_id, "page": page, "page_size": 100, "fields": "all"}
            answer = self.request("GET", "/api/tasks", params=params).json()
            found += answer["tasks"]
            if not answer["tasks"] or len(found) >= answer["total"]:
                return found
            page += 1

    def annotate(self, task_id: int, result: list[dict], user: str | None = None) -> int:
        """Submit an annotation as ``user`` would with the Submit button; its id."""
        return self.request("POST", f"/api/tasks/{task_id}/annotations/", user=user, json={"result": result}).json()["id"]

    def skip(self, task_id: int, user: str | None = None) -> int:
        """A cancelled annotation, as the Skip button makes it; its id."""
        body = {"result": [], "was_cancelled": True}
        return self.request("POST", f"/api/tasks/{task_id}/annotations/", user=user, json=body).json()["id"]

    def export(self, project_id: int, all_tasks: bool = False) -> list[dict]:
        """The JSON export exactly as Export -> JSON downloads it (``all_tasks``: also the tasks nobody annotated)."""
        params = {"exportType": "JSON", "download_all_tasks": "true" if all_tasks else "false"}
        return self.request("GET", f"/api/projects/{project_id}/export", params=params).json()


def sign_up(url: str, email: str, password: str) -> str:
    """A second reviewer signs up through the form, as a person would; the legacy API token Label Studio gives them."""
    browser = requests.Session()
    browser.get(f"{url}/user/signup/", timeout=30).raise_for_status()
    form = {"email": email, "password": password, "csrfmiddlewaretoken": browser.cookies.get("csrftoken", "")}
    signed = browser.post(f"{url}/user/signup/", data=form, allow_redirects=False, timeout=30)
    if signed.status_code != 302:
        raise LabelStudioError(f"signing up {email} -> {signed.status_code}: {signed.text[:2000]}")
    answer = browser.get(f"{url}/api/current-user/token", timeout=30)
    if answer.status_code != 200:
        raise LabelStudioError(f"token of {email} -> {answer.status_code}: {answer.text[:2000]}")
    return answer.json()["token"]


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A running Label Studio with two reviewers (ADMIN, REVIEWER); yields a LabelStudioClient. Installs it on first use."""
    venv = venv_dir()
    install_seconds = ensure_venv(venv)
    server = LabelStudioServer(venv, tmp_path_factory.mktemp("label_studio"))
    server.start()
    try:
        tokens = {ADMIN: ADMIN_TOKEN, REVIEWER: sign_up(server.url, REVIEWER, REVIEWER_PASSWORD)}
        client = LabelStudioClient(server.url, tokens, server.document_root)
        client.install_seconds, client.startup_seconds, client.log_path = install_seconds, server.startup_seconds, server.log_path
        yield client
    finally:
        server.stop()
