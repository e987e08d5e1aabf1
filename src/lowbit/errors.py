"""One exception type for every user-facing failure.

The CLI turns a `LowbitError` into one clear line on stderr and a non-zero exit; anything else is a bug
and keeps its traceback.
"""


class LowbitError(Exception):
    """Bad input or an impossible request, explained in one line."""


def config_error(what: str, e) -> LowbitError:
    """A pydantic ValidationError as one line: `invalid WHAT (field.path): message`."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return LowbitError(f"invalid {what}{f' ({where})' if where else ''}: {err['msg']}")
