"""The one exception type that the CLI turns into a one-line error message, and the one way such a
message suggests the name the user meant."""

from __future__ import annotations

import difflib
from typing import Iterable


class SegMlopsError(Exception):
    """A user-facing error: the message names the file, key or value at fault and what to do."""


def did_you_mean(name: str, valid: Iterable[str], prefix: str = "") -> str:
    """The tail of an "unknown name" message: `; did you mean 'x'?` when a valid name is close
    (difflib's default similarity, 0.6), else `; valid: a, b, ...` so the user still sees a choice.

    Args:
        name: the unknown name, as the user wrote it (without `prefix`).
        valid: the names that would have been accepted.
        prefix: prepended to every name shown, e.g. "model." for keys of a config section.
    """
    valid = sorted(valid)
    match = difflib.get_close_matches(name, valid, n=1)
    if match:
        return f"; did you mean '{prefix}{match[0]}'?"
    return f"; valid: {', '.join(prefix + v for v in valid)}"
