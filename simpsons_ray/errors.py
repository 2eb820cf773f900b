"""The one exception type for mistakes a user can make and fix."""

from __future__ import annotations


class UserError(Exception):
    """Bad input named in one sentence (what is wrong, and what to do).

    The CLI prints only this sentence and exits with status 2; anything else is a
    bug and keeps its traceback.
    """


def find_user_error(exc: BaseException) -> UserError | None:
    """Dig a UserError out of the wrappers Ray puts around remote exceptions."""
    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
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
