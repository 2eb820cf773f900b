"""The one exception type for mistakes a user can make and fix."""

from __future__ import annotations


class UserError(Exception):
    """Bad input named in one sentence (what is wrong, and what to do).

    The CLI prints only this sentence and exits with status 2; anything else is a
    bug and keeps its traceback.
    """


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its first), or its type's name when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def find_user_error(exc: BaseException) -> UserError | None:
    """Dig a UserError out of the wrappers Ray puts around remote exceptions."""
    found = find_cause(exc, UserError)
    return found if isinstance(found, UserError) else None


def find_cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``exc`` and what it wraps (Ray's task, Data and Train errors included)."""
    seen = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, kind) and not _is_ray_wrapper(current):
            return current
        # RayTaskError keeps the original as .cause; Ray Train's errors keep a
        # dict of worker exceptions; plain chaining uses __cause__/__context__.
        for attr in ("cause", "__cause__", "__context__", "error"):
            stack.append(getattr(current, attr, None))
        for attr in ("worker_failures", "errors"):
            group = getattr(current, attr, None)
            if isinstance(group, dict):
                stack.extend(group.values())
            elif isinstance(group, (list, tuple)):
                stack.extend(group)
    return None


def _is_ray_wrapper(exc: BaseException) -> bool:
    """A RayTaskError also subclasses its cause's type; the cause itself is what to report."""
    return type(exc).__module__.startswith("ray.")


class StorageError(UserError):
    """Storage that stayed unreachable after the retries: the run stops rather than go on with part of its data."""


def storage_failure(uri: str, exc: BaseException) -> StorageError:
    """One sentence for a read that failed for storage reasons (not bad bytes), after the S3 client's retries."""
    cause = find_cause(exc, OSError) or exc  # under Ray's wrappers, the read's own error
    return StorageError(
        f"Could not read {uri} from storage, even after retries ({first_line(cause).rstrip('.')}): stopped rather than "
        "go on without it; rerun once the storage answers."
    )
