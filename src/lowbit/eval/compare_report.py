"""The `lowbit compare` report: report.md, report.html (self-contained, the plot inlined) and pareto.png.

One table (rows sorted by bits per weight, the fp row included), two Pareto columns, the exact command,
the evaluation and calibration settings, a machine note and every recipe. The plot has two panels, KL
(log scale) and perplexity against bits per weight; front points are joined, every point is labelled,
and the fp perplexity is a horizontal line. Everything is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import os
import platform
import time
from pathlib import Path

import yaml

from lowbit.eval.pareto import pareto_front
from lowbit.eval.report import fmt
from lowbit.io.atomic import atomic_write_bytes, atomic_write_text

COLUMNS = [("recipe", "name"), ("setting", "setting"), ("bits/weight", "bits_per_weight"),
           ("codes", "bpw_codes"), ("meta", "bpw_meta"), ("outliers", "bpw_outliers"), ("low-rank", "bpw_lowrank"),
           ("ppl", "ppl"), ("KL", "kl"), ("top-1", "top1_agreement"), ("KL front", "front_kl"),
           ("ppl front", "front_ppl"), ("calibration", "calibration"), ("quantize s", "quantize_seconds"),
           ("peak MB", "peak_memory_mb"), ("eval s", "eval_seconds")]


def columns(table: list[dict]) -> list[tuple[str, str]]:
    """COLUMNS, with one accuracy column per lm-eval task any row carries (`task:NAME` keys), after top-1."""
    tasks = sorted({k for r in table for k in r if k.startswith("task:")})
    i = next(j for j, (_, k) in enumerate(COLUMNS) if k == "top1_agreement") + 1
    return [*COLUMNS[:i], *((f"{t[5:]} acc", t) for t in tasks), *COLUMNS[i:]]


def with_fronts(rows: list[dict], baseline: dict) -> list[dict]:
    """Rows sorted by bits per weight (fp row included) with `front_kl` / `front_ppl` flags; the fronts
    are taken over the quantized runs only (the fp row is the 0-KL end point, not a competitor)."""
    out = [dict(r) for r in rows]
    for metric in ("kl", "ppl"):
        front = set(pareto_front([(r["bits_per_weight"], r[metric]) for r in out]))
        for i, r in enumerate(out):
            r[f"front_{metric}"] = i in front
    fp = {**baseline, "front_kl": None, "front_ppl": None}
    return sorted([*out, fp], key=lambda r: (r["bits_per_weight"], r["name"]))


def machine_note() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, models evaluated on CPU; {platform.platform()}, Python {platform.python_version()}. "
            f"Wall-clock timings; other processes sharing the machine slow them.")


def _notes(info: dict, rows: list[dict]) -> list[tuple[str, str]]:
    ev, prov = info["eval"], info.get("provenance", {})
    reused = [r["name"] for r in rows if r.get("resumed")]
    commit = prov.get("commit")
    return [
        ("Model", f"{info['model']} (key {prov.get('model', {}).get('key', '?')})"),
        ("Protocol", f"{ev['protocol']}; tokenizer {ev['tokenizer']}; KL(fp ‖ quantized) in nats per position. "
                     "The same windows and the same calibration windows for every run."),
        ("Calibration", "per run, in the calibration column: dataset, windows × tokens, seed "
                        "('none (data-free)': the method read no data)."),
        ("Provenance", f"lowbit {prov.get('lowbit')} at commit {commit[:12] + (' (with local changes)' if prov.get('dirty') else '') if commit else 'unknown'}, "
                       f"torch {prov.get('torch')}, transformers {prov.get('transformers')}, {prov.get('device')}"),
        ("Bits per weight", "every stored bit of the quantized linears over their weight count: codes; meta = "
                            "scales, zeros, g_idx, exponents, codebooks; outliers = values and positions; "
                            "low-rank = factors and their scales. Embeddings, norms and lm_head stay in "
                            "floating point and are not counted. The fp row counts its storage dtype."),
        ("Fronts", "yes: on the Pareto front of (bits/weight, KL) or (bits/weight, ppl) among the quantized "
                   "runs: no other run has fewer or equal bits and a lower metric."),
        ("Reused runs", ", ".join(reused) + " (finished earlier with the same key; their timings are from then)"
         if reused else "none: every run was computed by this invocation"),
        ("Wall time", f"{info['wall_seconds']:.1f} s for this invocation, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"),
        ("Machine", machine_note()),
    ]


def markdown(table: list[dict], info: dict) -> str:
    cols = columns(table)
    head = [h for h, _ in cols]
    lines = [f"# lowbit compare: {Path(info['model']).name}", "", "```", info.get("command") or "(Python API)",
             "```", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in table:
        lines.append("| " + " | ".join(fmt(r.get(k)).replace("|", "\\|") for _, k in cols) + " |")
    lines += ["", "![KL and perplexity against bits per weight](pareto.png)", ""]
    lines += [f"- **{k}**: {v}" for k, v in _notes(info, table)]
    lines += ["", "## Recipes", ""]
    for name, recipe in info["recipes"].items():
        lines += [f"### {name}", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def html_page(table: list[dict], info: dict, png: bytes) -> str:
    e = html.escape
    css = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}"
           "td.n{text-align:right}tr.front{background:#e8f4e8}tr.fp{color:#555}pre{background:#f4f4f4;padding:8px;"
           "overflow-x:auto}img{max-width:100%}")
    rows, cols = [], columns(table)
    for r in table:
        cls = "fp" if r.get("baseline") else "front" if r.get("front_kl") else ""
        cells = "".join(f"<td class='n'>{e(fmt(r.get(k)))}</td>" if isinstance(r.get(k), (int, float))
                        and not isinstance(r.get(k), bool) else f"<td>{e(fmt(r.get(k)))}</td>" for _, k in cols)
        rows.append(f"<tr class='{cls}'>{cells}</tr>")
    notes = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in _notes(info, table))
    recipes = "".join(f"<h3>{e(n)}</h3><pre>{e(yaml.safe_dump(r, sort_keys=False))}</pre>"
                      for n, r in info["recipes"].items())
    title = f"lowbit compare: {Path(info['model']).name}"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{css}</style>"
            f"</head><body><h1>{e(title)}</h1><pre>{e(info.get('command') or '(Python API)')}</pre>"
            f"<table><tr>{''.join(f'<th>{e(h)}</th>' for h, _ in cols)}</tr>{''.join(rows)}</table>"
            f"<p>Green rows: on the KL Pareto front.</p>"
            f"<img alt='KL and perplexity against bits per weight' src='data:image/png;base64,"
            f"{base64.b64encode(png).decode()}'><ul>{notes}</ul><h2>Recipes</h2>{recipes}</body></html>\n")


def pareto_png(table: list[dict], info: dict) -> bytes:
    """Two panels (KL log-scale, ppl) against bits per weight; front joined, points labelled, fp ppl line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [r for r in table if not r.get("baseline")]
    fp = next(r for r in table if r.get("baseline"))
    fig = Figure(figsize=(13, 5.8))
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, 2)
    for ax, metric, label in ((panels[0], "kl", "KL(fp ‖ quantized), nats/token"),
                              (panels[1], "ppl", "WikiText-2 test perplexity")):
        pts = [(r["bits_per_weight"], r[metric]) for r in runs]
        front = pareto_front(pts)
        on = [pts[i] for i in sorted(front, key=lambda i: pts[i])]
        off = [p for i, p in enumerate(pts) if i not in front]
        if off:
            ax.scatter(*zip(*off), color="0.55", zorder=3, label="dominated")
        if on:
            ax.plot(*zip(*on), "-o", color="tab:blue", zorder=4, label="Pareto front")
        # Alternate label sides along the x order so neighbours at close bits do not overprint.
        order = sorted(range(len(runs)), key=lambda i: pts[i])
        for k, i in enumerate(order):
            dy = 7 if k % 2 == 0 else -13
            ax.annotate(runs[i]["name"], pts[i], xytext=(5, dy), textcoords="offset points", fontsize=8,
                        zorder=5)
        if metric == "kl" and all(v > 0 for _, v in pts):
            ax.set_yscale("log")
        if metric == "ppl":
            ax.axhline(fp["ppl"], ls="--", color="tab:red", lw=1, label=f"{fp['name']}: ppl {fp['ppl']:.2f}")
        ax.set_xlabel("bits per weight (all metadata)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.margins(y=0.12)  # room for the labels above the top point and below the bottom one
        # Below the axes: inside, the legend hides points and labels wherever they happen to lie.
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
        xs = [p[0] for p in pts]
        if xs:
            span = max(max(xs) - min(xs), 0.5)
            ax.set_xlim(min(xs) - 0.08 * span, max(xs) + 0.3 * span)  # room for the labels on the right
    ev = info["eval"]
    fig.suptitle(f"{Path(info['model']).name}: WikiText-2 test, seqlen {ev['seqlen']}, {ev['n_windows']} windows "
                 f"(perplexity and KL on the same windows)", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def write_report(out: Path, rows: list[dict], baseline: dict, info: dict) -> dict[str, Path]:
    table = with_fronts(rows, baseline)
    png = pareto_png(table, info)
    paths = {"png": out / "pareto.png", "md": out / "report.md", "html": out / "report.html"}
    atomic_write_bytes(paths["png"], png)
    atomic_write_text(paths["md"], markdown(table, info))
    atomic_write_text(paths["html"], html_page(table, info, png))
    return paths
