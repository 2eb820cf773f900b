"""Small objects written only if they are what the writer last saw: compare-and-swap on a local disk and on S3.

A read gives the object's bytes and a *tag* (its version); a write names the tag it
expects to replace, or ``None`` for "only if there is nothing yet", and fails when
another writer got there first. Of two writers that read the same version, exactly
one succeeds. Episode leases (``label/leases.py``) are built on this, so a renewal
never overwrites another job's takeover.

- **S3**: the tag is the object's ETag; writes are conditional PUTs (``If-Match``
  / ``If-None-Match: *``, which S3 answers 412 when the condition fails), through
  boto3, since pyarrow's filesystem has no conditional write.
- **Local disk**: the tag is the SHA-256 of the bytes; a write compares and renames
  under an exclusive ``flock`` on ``<folder>/.lock``, so processes on one machine
  (or sharing a disk whose locks work across machines) take turns. A create is a
  hard link, which fails if the name exists.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager
from typing import Iterator

import pyarrow.fs as pafs

from simpsons_ray.core import storage

LOCK_FILE = ".lock"


def read(uri: str) -> tuple[bytes, str] | None:
    """The object's bytes and tag, or None when there is no object."""
    fs, path = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _digest(data)
    import botocore.exceptions

    bucket, key = path.split("/", 1)
    try:
        got = storage.s3_client().get_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        if _status(exc) == 404:
            return None
        raise OSError(f"cannot read {uri}: {exc}") from exc
    return got["Body"].read(), got["ETag"]


def write(uri: str, data: bytes, expected: str | None) -> str | None:
    """Write ``data`` if the object's tag is still ``expected`` (None: if there is no object); its new tag, else None."""
    fs, path = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return _write_local(path, data, expected)
    import botocore.exceptions

    bucket, key = path.split("/", 1)
    condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
    try:
        return storage.s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
    except botocore.exceptions.ClientError as exc:
        # 412: the condition failed; 409: a concurrent conditional write won; 404: If-Match on an object since deleted.
        if _status(exc) in (404, 409, 412):
            return None
        raise OSError(f"cannot write {uri}: {exc}") from exc


def delete(uri: str, expected: str) -> bool:
    """Delete the object if its tag is still ``expected``; whether it was deleted.

    On S3 this reads then deletes (conditional deletes are not on every S3-compatible
    store): a write landing between the two is lost. Callers delete only objects that
    nobody else may write at that moment (a lease this job has just renewed).
    """
    fs, path = storage.resolve(uri)
    if not isinstance(fs, pafs.LocalFileSystem):
        current = read(uri)
        if current is None or current[1] != expected:
            return False
        storage.delete(uri)
        return True
    with _locked(os.path.dirname(path)):
        current = read(path)
        if current is None or current[1] != expected:
            return False
        os.unlink(path)
        return True


def _write_local(path: str, data: bytes, expected: str | None) -> str | None:
    tmp = storage.local_temp_copy(path, data)
    try:
        with _locked(os.path.dirname(path)):
            if expected is None:
                try:
                    os.link(tmp, path)  # fails if the name exists, even on a disk without working locks
                except FileExistsError:
                    return None
            else:
                current = read(path)
                if current is None or current[1] != expected:
                    return None
                os.replace(tmp, path)
        return _digest(data)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def _locked(folder: str) -> Iterator[None]:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, LOCK_FILE), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _status(exc) -> int | None:
    meta = exc.response.get("ResponseMetadata", {})
    code = exc.response.get("Error", {}).get("Code")
    if code in ("PreconditionFailed", "ConditionalRequestConflict"):
        return 412
    if code in ("NoSuchKey", "404"):
        return 404
    return meta.get("HTTPStatusCode")
