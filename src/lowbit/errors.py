"""One exception type for every user-facing failure.

The CLI turns a `LowbitError` into one clear line on stderr and a non-zero exit; anything else is a bug
and keeps its traceback.
"""


class LowbitError(Exception):
    """Bad input or an impossible request, explained in one line."""
