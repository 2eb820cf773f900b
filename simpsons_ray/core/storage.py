"""Storage is a URI: local paths and ``s3://`` go through this one module.

Everything else in the package calls these helpers and never looks at a URI's
scheme itself. S3 is reached through pyarrow's S3 filesystem, which honours the
standard AWS environment (``AWS_ENDPOINT_URL``, keys, ``AWS_DEFAULT_REGION``) and
instance profiles, so no credentials ever travel in arguments.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pyarrow.fs as pafs

from simpsons_ray.core.errors import UserError, first_line

# Transient S3 failures (a reclaimed node's endpoint, a throttled prefix, a server
# that is briefly away) are retried with backoff; 12 standard-strategy attempts
# span roughly 20 s, long enough to ride out a restart of the endpoint.
S3_MAX_ATTEMPTS = 12


@functools.lru_cache(maxsize=None)
def _s3() -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        "connect_timeout": 5,
        "request_timeout": 60,
    }
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    # pyarrow reads AWS_ENDPOINT_URL only in S3FileSystem.from_uri, not in the
    # constructor (apache/arrow#49643), so pass it on explicitly.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    return pafs.S3FileSystem(**kwargs)


def is_remote(uri: str) -> bool:
    """True when the URI names object storage rather than a local path."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Split a URI into a pyarrow filesystem and the path inside it."""
    uri = str(uri)
    if uri.startswith("s3://"):
        return _s3(), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise UserError(f"Unsupported storage scheme {scheme!r} in {uri!r}: use a local path or an s3:// URI.")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The inverse of :func:`resolve`."""
    if isinstance(fs, pafs.S3FileSystem):
        return "s3://" + path
    return path


def absolute(uri: str) -> str:
    """The same location as a full URI: a relative local path becomes absolute."""
    return to_uri(*resolve(uri))


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a URI with forward slashes (or os.sep locally)."""
    if is_remote(uri):
        return posixpath.join(str(uri).rstrip("/"), *parts)
    return os.path.join(str(uri), *parts)


def basename(uri: str) -> str:
    """Last path segment of a URI."""
    return posixpath.basename(str(uri).rstrip("/").replace(os.sep, "/"))


def info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    return fs.get_file_info(path)


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return info(uri).type == pafs.FileType.Directory


def is_file(uri: str) -> bool:
    return info(uri).type == pafs.FileType.File


@dataclass(frozen=True)
class Entry:
    """One file found under a listing root."""

    uri: str
    relpath: str  # path below the listed root, always with forward slashes
    size: int
    mtime_ns: int = 0  # modification time (S3: LastModified); 0 when the store gives none


def list_files(uri: str, recursive: bool = True) -> list[Entry]:
    """Files below ``uri``, sorted by relative path; hidden files are skipped."""
    fs, root = resolve(uri)
    selector = pafs.FileSelector(root, recursive=recursive, allow_not_found=True)
    entries = []
    for item in fs.get_file_info(selector):
        if item.type != pafs.FileType.File:
            continue
        rel = os.path.relpath(item.path, root).replace(os.sep, "/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        entries.append(Entry(to_uri(fs, item.path), rel, item.size or 0, item.mtime_ns or 0))
    entries.sort(key=lambda e: e.relpath)
    return entries


def list_dir(uri: str) -> list[tuple[str, bool]]:
    """Immediate children of ``uri`` as (name, is_directory), sorted by name."""
    fs, root = resolve(uri)
    children = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    out = [(posixpath.basename(c.path.replace(os.sep, "/")), c.type == pafs.FileType.Directory) for c in children]
    return sorted(out)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def open_input(uri: str):
    """A sequential read stream; archives are read through this, never whole."""
    fs, path = resolve(uri)
    return fs.open_input_stream(path)


def open_input_file(uri: str):
    """A seekable file: reads at any offset, ranged GETs on S3 (videos are read through this, never whole)."""
    fs, path = resolve(uri)
    return fs.open_input_file(path)


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically: readers see the old or the new, never half.

    A single S3 PUT is already atomic; locally we write a sibling temp file and
    rename it over the target.
    """
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.replace(local_temp_copy(path, data), path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def local_temp_copy(path: str, data: bytes) -> str:
    """``data`` on disk beside ``path`` as ``<path>.tmp-<hex>``, synced; the caller renames or links it into place."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def in_threads(fn: Callable[[Any], Any], items: list, threads: int = 16) -> list:
    """``[fn(i) for i in items]`` with up to ``threads`` calls side by side: small reads, writes and listings."""
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode()


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json_bytes(obj))


def abort_uploads(uri: str, keep: Callable[[str], bool] | None = None) -> int:
    """Abort the unfinished S3 multipart uploads of a file, or of the files under a folder (billed until aborted); how many.

    ``keep(path below uri)`` spares an upload. Local storage has none: 0.

    A writer killed mid-file leaves one behind: pyarrow starts a multipart upload
    once a file outgrows one part, and only its close completes it.
    """
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return 0
    bucket, _, key = path.partition("/")
    client = s3_client()
    aborted = 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=key):
        for upload in page.get("Uploads", []):
            if key and upload["Key"] != key and not upload["Key"].startswith(key + "/"):
                continue  # only a name that merely starts the same
            if keep is not None and keep(upload["Key"][len(key):].lstrip("/")):
                continue
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted += 1
    return aborted


@functools.lru_cache(maxsize=None)
def s3_client():
    """boto3's S3 client, for the calls pyarrow lacks (conditional writes, aborting uploads); it reads the same AWS environment (AWS_ENDPOINT_URL included)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"}))


def delete(uri: str) -> None:
    """Remove a file or a whole directory tree, if present."""
    fs, path = resolve(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def check_writable(uri: str, what: str = "output") -> None:
    """Fail fast, before any work, when ``uri`` can't take a file."""
    probe = join(uri, f"_write_probe_{uuid.uuid4().hex}")
    try:
        makedirs(uri)
        write_bytes(probe, b"")
        delete(probe)
    except (OSError, PermissionError) as exc:
        raise UserError(f"Cannot write the {what} to {uri}: {first_line(exc).rstrip('.')}.") from None


def iter_chunks(uri: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    with open_input(uri) as f:
        while True:
            chunk = f.read(chunk_size)
            if not chunk:
                return
            yield chunk


def move(src_uri: str, dst_uri: str) -> None:
    """Move a file within one store: a rename locally, a server-side copy then delete on S3.

    The destination appears whole or not at all (a local rename; a single S3 copy).
    """
    fs, src = resolve(src_uri)
    _, dst = resolve(dst_uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        return
    fs.move(src, dst)


def open_input_raw(uri: str):
    """A sequential read stream of the bytes as stored: a ``.gz`` stays gzip.

    (:func:`open_input` lets pyarrow detect compression from the extension and
    inflate on the way, which hides from a tar reader where a gzip stream is cut.)
    """
    fs, path = resolve(uri)
    return fs.open_input_stream(path, compression=None)
