"""Tar and tar.gz archives of frames, read as a stream straight from storage: never whole in memory, never extracted."""

from __future__ import annotations

import gzip
import tarfile
import zlib
from typing import Any, Iterator

from simpsons_ray.core import storage

# Errors that mean the archive's bytes are bad (not a tar, cut short, bad gzip);
# anything else (e.g. storage unreachable after retries) fails the task so that a
# rerun can redo the episode.
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


class ArchiveTooLarge(tarfile.TarError):
    """An archive whose (inflated) tar stream runs past the limit its reader set."""


class TruncatedArchive(tarfile.TarError):
    """An archive that ends without tar's end-of-archive blocks: cut short between two members, or in a header."""


# The end of a tar is two blocks of zeros, padded with zeros to a record (10 KiB by default);
# this much is read past the last member to find them, and no more.
END_READ_BYTES = 1024 * 1024


def iter_tar_members(archive_uri: str, max_bytes: int | None = None) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """The regular, non-hidden members of a tar / tar.gz archive, in order, streamed (never held whole).

    Read a member with ``tar.extractfile(member)`` before asking for the next one.
    Raises the archive errors of :data:`ARCHIVE_ERRORS` for bytes that are not a good archive.
    ``max_bytes`` bounds the tar stream as inflated (a .gz of zeros inflates a
    thousandfold): a member that would end past it raises ArchiveTooLarge before it is read.
    """
    last: str | None = None
    with storage.open_input_raw(archive_uri) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if max_bytes is not None and member.offset_data + member.size > max_bytes:
                raise ArchiveTooLarge(f"its tar stream runs past {max_bytes:,} bytes (inflated) at member {member.name}")
            if not member.isfile():
                continue  # folders, links
            if any(part.startswith(".") for part in member.name.split("/") if part not in ("", ".")):
                continue  # hidden files, macOS "._" resource forks
            last = member.name
            yield tar, member
        _check_end(tar, last)


def _check_end(tar: tarfile.TarFile, last: str | None) -> None:
    """Raise TruncatedArchive unless the stream ended with tar's end-of-archive blocks.

    tarfile ends a stream quietly at a header cut short, or at the end of the data,
    as it ends one at its end-of-archive blocks (two of zeros): an archive cut between
    two members would lose the rest without a word. The rest of the stream is read
    here (a .gz cut short raises as it inflates) and must be those zero blocks.
    """
    stream: Any = tar.fileobj  # in stream mode, tarfile's _Stream: the (inflated) tar, its position in .pos
    rest = stream.read(END_READ_BYTES)
    if stream.pos < tar.offset + 2 * tarfile.BLOCKSIZE or rest.strip(b"\0"):
        after = f"after member {last}" if last else "before its first member"
        raise TruncatedArchive(f"the archive is cut short {after}: it does not end with tar's end-of-archive blocks")
