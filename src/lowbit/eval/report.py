"""Tables of results: markdown for files and READMEs, rich for the terminal, JSON for machines.

One formatting rule for every cell (`fmt`), so the same number reads the same in every output.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit.io.atomic import atomic_write_text

# Per-layer record fields and the names they may go by (the pipeline's records are dicts or objects).
LAYER_FIELDS = (
    ("layer", ("name", "layer")),
    ("shape", ("shape",)),
    ("bits/weight", ("bits_per_weight", "bpw")),
    ("rel. output error", ("rel_output_error", "relative_output_error", "rel_error", "output_error", "error")),
    ("seconds", ("seconds", "time_s", "time")),
)


def fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, (list, tuple)):
        return "×".join(fmt(x) for x in v)
    return str(v)


def _as_dict(record: Any) -> dict:
    if isinstance(record, dict):
        return record
    if hasattr(record, "as_dict"):
        return record.as_dict()
    return vars(record)


def _markdown(headers: Sequence[str], cells: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731 — a '|' inside a cell would split it
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def layer_error_report(records: Sequence[Any]) -> str:
    """Markdown table: layer, shape, bits/weight, relative output error, seconds (one row per record)."""
    cells = []
    for r in map(_as_dict, records):
        cells.append([fmt(next((r[k] for k in keys if k in r), None)) for _, keys in LAYER_FIELDS])
    return _markdown([h for h, _ in LAYER_FIELDS], cells)


def _columns(rows: Sequence[dict], columns: Sequence[str] | None) -> list[str]:
    if columns:
        return list(columns)
    return list(dict.fromkeys(k for row in rows for k in row))  # every key, in first-seen order


def results_table(rows: Sequence[dict], columns: Sequence[str] | None = None, title: str | None = None):
    """(markdown string, rich.table.Table) of `rows`, one column per key in `columns` (default: all keys)."""
    from rich.table import Table

    cols = _columns(rows, columns)
    cells = [[fmt(row.get(c)) for c in cols] for row in rows]
    table = Table(title=title)
    for c in cols:
        numeric = all(isinstance(row.get(c), (int, float)) for row in rows if row.get(c) is not None)
        table.add_column(c, justify="right" if numeric else "left")
    for row in cells:
        table.add_row(*row)
    return _markdown(cols, cells), table


def write_results(rows: Sequence[dict], out_dir: str | Path, stem: str, columns: Sequence[str] | None = None,
                  note: str | None = None, provenance: dict | None = None) -> tuple[Path, Path]:
    """Write `{stem}.json` ({"rows", "note", "provenance"}) and `{stem}.md` (the table, then the note),
    each atomically. The note says how the numbers were measured, the provenance (`lowbit.eval.protocol.
    provenance`) where and on what; they travel with the numbers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    atomic_write_text(json_path, json.dumps({"rows": list(rows), "note": note, "provenance": provenance}, indent=2,
                                            default=str) + "\n")
    md = results_table(rows, columns)[0]
    atomic_write_text(md_path, md if note is None else f"{md}\n{note}\n")
    return json_path, md_path
