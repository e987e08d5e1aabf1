"""The model card (README.md) every export writes: what the files are, who loads them, how many bits each
weight really costs, and the evaluation figures the lowbit output carries."""

from __future__ import annotations

import json
from collections import Counter

from lowbit.exporters.common import Source


def _grid_line(qw) -> str:
    g = qw.grid
    m = g.meta()
    parts = [f"{m.get('bits')}-bit {m.get('kind')}"]
    if "group_size" in m:
        gs = m["group_size"]
        parts.append("per channel" if gs == -1 else "per tensor" if gs == 0 else f"group {gs}")
        parts.append("symmetric" if m.get("symmetric") else "asymmetric")
    for k, v in m.items():
        if k not in ("kind", "bits", "group_size", "symmetric"):
            parts.append(f"{k} {v}")
    if getattr(g, "g_idx", None) is not None:
        parts.append("act-order g_idx")
    if qw.outliers is not None:
        parts.append(f"{qw.outliers.values.numel()} outliers")
    if getattr(qw, "in_scale", None) is not None:
        parts.append("AWQ input scale")
    if qw.lowrank is not None:
        parts.append(f"low-rank k={qw.lowrank.A.shape[1]}")
    return ", ".join(parts)


def model_card(src: Source, fmt: str, *, loads_with: str, how: str, notes: list[str],
               file_bits: float | None = None) -> str:
    qc = src.quantization_config
    cfg = qc.get("config") or {}
    n = qc.get("total_quantized_params") or 0
    grids = Counter(_grid_line(q) for q in src.qweights.values())
    lines = [
        f"# {src.path.name} — {fmt} export",
        "",
        f"Exported by lowbit from `{src.path}` (quantized with **{src.method}**). Loads with: {loads_with}.",
        "",
        "## How to load",
        "",
        "```python",
        how.strip(),
        "```",
        "",
        "## Quantization",
        "",
        f"- Method: {src.method}; settings: `{json.dumps(cfg, default=str)}`",
        f"- Source model: `{src.provenance.get('source_model', '?')}`",
        f"- Quantized linear layers: {len(src.qweights)} ({n:,} weights); grids: "
        + "; ".join(f"{c}× {g}" for g, c in grids.most_common()),
        f"- **Bits per weight (all metadata, lowbit accounting)**: {qc.get('bits_per_weight', float('nan')):.4f}"
        " — packed codes, fp16 scales, packed zeros, g_idx, outliers with positions, low-rank factors, "
        "divided by the number of quantized weights",
    ]
    if file_bits is not None:
        lines.append(f"- Bits per weight as stored in this export's files: {file_bits:.4f}")
    summary = src.provenance.get("summary") or {}
    if summary:
        lines.append(f"- Quantization run: {json.dumps(summary, default=str)}")
    lines += ["", "## Evaluation", ""]
    if src.evaluation:
        e = src.evaluation
        if "ppl" in e:
            lines.append(f"- WikiText-2 test perplexity {e['ppl']:.3f} (seqlen {e.get('seqlen')}, "
                         f"{e.get('n_windows')} windows)")
        if "kl" in e:
            lines.append(f"- KL(base‖quantized) {e['kl']:.5f} nats/token on {e.get('kl_windows')} windows, "
                         f"top-1 agreement {e.get('top1_agreement', float('nan')):.3f}")
        rest = {k: v for k, v in e.items() if k not in ("ppl", "kl")}
        if rest:
            lines.append(f"- Details: `{json.dumps(rest, default=str)}`")
    else:
        lines.append("No evaluation figures were recorded with this output (run `lowbit eval --json` and pass "
                     "the file to `lowbit export --eval-json`).")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {x}" for x in notes]
    return "\n".join(lines) + "\n"
