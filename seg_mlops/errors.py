"""The one exception type that the CLI turns into a one-line error message."""


class SegMlopsError(Exception):
    """A user-facing error: the message names the file, key or value at fault and what to do."""
