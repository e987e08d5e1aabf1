"""Layer-name patterns (recipe `include` / `ignore` / `overrides`, `--layers`), matched in linear time.

Recipes are shared files, and Python's backtracking `re` takes exponential time on patterns such as
`(.*.*)*x`: one line of a recipe could hang a run. Patterns are therefore compiled with RE2 (the
`google-re2` package), whose automaton matches in time linear in the name whatever the pattern. The syntax
is Python's (`re.search` semantics: matched anywhere in the name) minus backreferences and lookarounds,
which RE2 refuses with a clear error.
"""

from __future__ import annotations

import re2

from lowbit.errors import LowbitError

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the error is ours to report, in one line, not RE2's stderr log
MAX_PATTERN_CHARS = 1000


def compile_pattern(pattern: str, what: str = "layer pattern"):
    """A compiled RE2 pattern whose `.search(name)` runs in linear time; LowbitError on bad syntax."""
    if not isinstance(pattern, str) or not pattern:
        raise LowbitError(f"{what} must be a non-empty string, got {pattern!r}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise LowbitError(f"{what} {pattern[:40]!r}... is {len(pattern)} characters long (at most {MAX_PATTERN_CHARS})")
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as e:
        msg = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise LowbitError(f"invalid {what} {pattern!r}: {msg} (RE2 syntax: Python's regexes without "
                          "backreferences or lookarounds)") from None


def check_pattern(pattern: str) -> str:
    """Pydantic validator form: the pattern itself, or ValueError with the reason."""
    try:
        compile_pattern(pattern)
    except LowbitError as e:
        raise ValueError(str(e)) from None
    return pattern
