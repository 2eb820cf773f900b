"""Episode ids: one alphabet, checked where an id is made (labeling) and wherever one is read back (query, report, exports).

An episode id names folders and files: ``episode=<id>/``, ``_progress/<id>.json``,
``_errors/<id>.parquet``, and the ``<id>.srt`` files ``query segments --output DIR/``
writes. pyarrow rebuilds it from the folder name with hive partitioning, which
decodes ``%``-escapes, so ``episode=..%2F..%2Fx`` reads back as ``../../x``. An id
is therefore kept to an alphabet that means the same thing as a path segment, a
URL-decoded path segment and an S3 key on every system:

- letters and digits (any script), then letters, digits, ``_``, space, ``.``, ``-``,
  ``+``, ``(``, ``)``, ``[`` and ``]``;
- at most 200 characters; not ending in a space or a ``.``.

So ``S01E01``, ``The Simpsons - S01E01 (1989)`` and ``épisode 1.720p`` are ids;
``100%``, ``a/b``, ``..``, ``x=y``, ``<b>`` and names with control characters are
not. Labeling refuses such an episode (it is listed and skipped, nothing is
written for it); reading an output, a folder whose id is not one is ignored with a
warning (nothing this project writes is there).
"""

from __future__ import annotations

import re

MAX_LENGTH = 200
_ID = re.compile(r"[^\W_][\w .+()\[\]-]*")


def check_episode_id(episode_id: str) -> str:
    """'' for a good id, else why it is not one (a sentence fragment naming the rule it breaks)."""
    if not isinstance(episode_id, str) or not episode_id:
        return "an episode id must not be empty"
    if len(episode_id) > MAX_LENGTH:
        return f"an episode id is at most {MAX_LENGTH} characters"
    if not _ID.fullmatch(episode_id):
        bad = sorted({c for c in episode_id if not re.fullmatch(r"[\w .+()\[\]-]", c)})
        if bad:
            return f"an episode id may not hold {' '.join(repr(c) for c in bad[:5])}"
        return "an episode id starts with a letter or a digit"
    if episode_id.endswith((" ", ".")):
        return "an episode id may not end with a space or a '.'"
    return ""


def is_episode_id(episode_id: str) -> bool:
    return check_episode_id(episode_id) == ""
