"""Assertions several test files share (imported as `helpers`: pytest puts tests/ on sys.path)."""

import hashlib
from pathlib import Path


def tree_hash(d: Path) -> str:
    """One hash of every file's relative path and bytes under d: 'nothing changed' in one comparison."""
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(d).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def assert_clean_error(res, *needles):
    """A CLI result that failed the lowbit way: exit 2, last line `lowbit: error: ...`, naming each needle."""
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("lowbit: error:"), res.output
    for n in needles:
        assert n in res.output, res.output
