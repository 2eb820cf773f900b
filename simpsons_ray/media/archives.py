"""Tar and tar.gz archives of frames, read as a stream straight from storage: never whole in memory, never extracted."""

from __future__ import annotations

import gzip
import tarfile
import zlib
from typing import Iterator

from simpsons_ray.core import storage

# Errors that mean the archive's bytes are bad (not a tar, cut short, bad gzip);
# anything else (e.g. storage unreachable after retries) fails the task so that a
# rerun can redo the episode.


# Errors that mean the archive's bytes are bad (not a tar, cut short, bad gzip);
# anything else (e.g. storage unreachable after retries) fails the task so that a
# rerun can redo the episode.
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def iter_tar_members(archive_uri: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """The regular, non-hidden members of a tar / tar.gz archive, in order, streamed (never held whole).

    Read a member with ``tar.extractfile(member)`` before asking for the next one.
    Raises the archive errors of :data:`ARCHIVE_ERRORS` for bytes that are not a good archive.
    """
    with storage.open_input_raw(archive_uri) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue  # folders, links
            if any(part.startswith(".") for part in member.name.split("/") if part not in ("", ".")):
                continue  # hidden files, macOS "._" resource forks
            yield tar, member
