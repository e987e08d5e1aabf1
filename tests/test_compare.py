"""`lowbit compare` on the tiny model: the report's numbers are those of a direct `eval_job` of the same
quantized model, the Pareto front matches brute force, finished runs are reused and changed ones rerun,
a killed comparison loses only the run in progress, and bad input is one clear line with nothing lost."""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import lowbit.pipeline.calibrate as calibrate
from lowbit.cli import app
from lowbit.compare import budget_recipes, describe, pareto_front, recipe_files, run_compare, unique_names
from lowbit.errors import LowbitError
from lowbit.eval.report import fmt
from lowbit.io.native import load_model
from lowbit.eval.kl import kl_divergence
from lowbit.eval.perplexity import perplexity
from lowbit.eval.protocol import get_protocol
import lowbit.eval.evaluate as evaluate
from lowbit.eval.evaluate import protocol_windows
from lowbit.jobs import eval_job
from lowbit.recipe import make_recipe
from helpers import tree_hash, assert_clean_error

runner = CliRunner()
EVAL = ["--seqlen", "64", "--max-windows", "8"]
SETTINGS = get_protocol("quick", seqlen=64, windows=8, calib_samples=8, calib_seqlen=64)
RECIPES = {"rtn4": "quant: {method: rtn, bits: 4, group_size: 32}\n",
           "rtn3": "quant: {method: rtn, bits: 3, group_size: 32}\n",
           "gptq3": "quant: {method: gptq, bits: 3, group_size: 32}\ncalibration: {n_samples: 128, seqlen: 256}\n"}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_recipes(d: Path, recipes: dict[str, str]) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in recipes.items():
        (d / f"{name}.yaml").write_text(text)
    return [d / f"{name}.yaml" for name in recipes]






def md_rows(md: str) -> dict[str, list[str]]:
    """The report table: recipe name → its cells."""
    lines = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| recipe")]
    return {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split(" | ")] for line in lines)}


@pytest.fixture(scope="module")
def compared(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    paths = write_recipes(tmp / "recipes", RECIPES)
    out = tmp / "report"
    # One --recipes followed by several files; the protocol's calibration (here the flags') replaces
    # gptq3's own 128 × 256 windows: every run calibrates on the same data.
    res = run("compare", tiny_model_dir, "--recipes", *paths, "-o", out, *EVAL, "--calib-samples", "8",
              "--calib-seqlen", "64", "--keep-models", "--quiet")
    assert res.exit_code == 0, res.output
    rows = {n: json.loads((out / "runs" / f"{n}.json").read_text())["result"] for n in RECIPES}
    return out, rows


def test_report_files(compared):
    out, rows = compared
    md = (out / "report.md").read_text()
    assert "lowbit compare " in md and "--recipes" in md and "--calib-samples 8" in md
    table = md_rows(md)
    assert set(table) == {*RECIPES, "fp32 (unquantized)"}
    bpw = [float(cells[2]) for cells in table.values()]
    assert bpw == sorted(bpw), "table not sorted by bits per weight"
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    inlined = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1)
    assert base64.b64decode(inlined) == png, "the HTML must carry the same plot, self-contained"
    for name in RECIPES:
        assert f"<td>{name}</td>" in page
    # Which calibration each run used: the flags' 8 × 64 windows for GPTQ, none for RTN.
    assert table["gptq3"][COL["calibration"]] == "c4 8×64 seed 0"
    assert table["rtn4"][COL["calibration"]] == "none (data-free)"


COL = {k: i for i, k in enumerate(["recipe", "setting", "bpw", "codes", "meta", "outliers", "lowrank", "ppl", "kl",
                                    "top1", "front_kl", "front_ppl", "calibration", "qs", "peak", "es"])}


def test_numbers_equal_direct_eval(compared, tiny_model_dir):
    out, rows = compared
    table = md_rows((out / "report.md").read_text())
    # Independent of the compare path and of its cached fp16 base outputs: the fp row through eval_job's
    # own tokenization, each saved model through perplexity() and the two-model kl_divergence().
    fp = eval_job(str(tiny_model_dir), protocol=SETTINGS, progress=False)
    assert table["fp32 (unquantized)"][COL["ppl"]] == fmt(fp["ppl"])
    base, tok = load_model(tiny_model_dir)
    windows = protocol_windows(tok, SETTINGS)
    for name, row in rows.items():
        model, _ = load_model(out / "runs" / name)
        assert row["ppl"] == pytest.approx(perplexity(model, windows).ppl, rel=1e-6), name
        kl = kl_divergence(model, base, windows)
        assert row["top1_agreement"] == kl.top1_agreement, name
        # The cached base log-probs are fp16, renormalised: measured within 5e-7 nats (evaluate.py).
        assert row["kl"] == pytest.approx(kl.kl_mean, abs=1e-6), name
        qc = json.loads((out / "runs" / name / "config.json").read_text())["quantization_config"]
        assert row["bits_per_weight"] == pytest.approx(qc["bits_per_weight"], rel=1e-12)
        parts = [row[f"bpw_{k}"] for k in ("codes", "meta", "outliers", "lowrank")]
        assert sum(parts) == pytest.approx(row["bits_per_weight"], rel=1e-12)
        # Known answer: b-bit codes, fp16 scale + b-bit zero per 32 columns, nothing else.
        bits = {"rtn4": 4, "rtn3": 3, "gptq3": 3}[name]
        assert parts == pytest.approx([bits, (16 + bits) / 32, 0, 0], abs=1e-12)
        cells = table[name]
        for col, key in (("bpw", "bits_per_weight"), ("ppl", "ppl"), ("kl", "kl"), ("top1", "top1_agreement")):
            assert cells[COL[col]] == fmt(row[key]), (name, col)
    # Fronts: gptq3 beats rtn3 at equal bits; rtn4 has the least KL.
    assert rows["gptq3"]["kl"] < rows["rtn3"]["kl"] and rows["rtn4"]["kl"] < rows["gptq3"]["kl"]
    assert [table[n][COL["front_kl"]] for n in ("gptq3", "rtn3", "rtn4")] == ["yes", "no", "yes"]


def brute_front(points):
    def dominated(p):
        return any(q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1]) for q in points
                   if q == q and q[1] == q[1])  # a NaN point dominates nothing
    return [i for i, p in enumerate(points) if p[1] == p[1] and not dominated(p)]


def test_pareto_front_brute_force():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(0, 12)
        # Few distinct values: many ties in bits, in metric and whole duplicate points.
        pts = [(rng.choice([2.0, 2.5, 3.0, 3.25, 4.0]), rng.choice([0.1, 0.2, 0.3, 0.5, float("inf")]))
               for _ in range(n)]
        if pts and rng.random() < 0.2:
            pts[rng.randrange(n)] = (pts[0][0], float("nan"))
        assert pareto_front(pts) == brute_front(pts), pts
    assert pareto_front([(3.0, float("inf"))]) == [0]
    assert pareto_front([(4.0, 1.0), (3.0, 2.0), (3.0, 2.0), (5.0, 1.0)]) == [0, 1, 2]


def test_resume_reuses_finished_runs_and_reruns_changed(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "report"
    paths = write_recipes(tmp_path / "r", {k: RECIPES[k] for k in ("rtn4", "rtn3")})
    calls = []
    real = calibrate.quantize_model

    def counting(model, config, *a, **k):
        calls.append(config.bits)
        if crash_on == len(calls):
            raise KeyboardInterrupt  # the user's Ctrl-C in the middle of the second recipe
        return real(model, config, *a, **k)

    monkeypatch.setattr(calibrate, "quantize_model", counting)
    # The same test windows every time (what the keys check); tokenized once to keep the test short.
    windows = {}
    real_windows = evaluate.protocol_windows
    monkeypatch.setattr(evaluate, "protocol_windows", lambda *a: windows.setdefault(a[1], real_windows(*a)))

    def compare(settings=SETTINGS):
        calls.clear()
        return run_compare(str(tiny_model_dir), recipe_files(paths), out, settings, progress=False)

    crash_on = 2
    with pytest.raises(KeyboardInterrupt):
        compare()
    assert calls == [4, 3] and (out / "runs" / "rtn4.json").is_file()
    assert not (out / "runs" / "rtn3.json").exists() and not (out / "report.md").exists()
    crash_on = None
    first = compare()
    assert calls == [3], "the finished run must be reused, only the killed one rerun"
    stamp = (out / "runs" / "rtn4.json").stat().st_mtime_ns

    # rtn3 changed and killed again, leaving a block checkpoint of that version behind (garbage here:
    # resuming it would fail); changed once more, the stale checkpoint is dropped, not resumed.
    paths[1].write_text("quant: {method: rtn, bits: 2, group_size: 32}\n")
    crash_on = 1
    with pytest.raises(KeyboardInterrupt):
        compare()
    partial = out / "runs" / ".rtn3.partial"
    partial.mkdir(exist_ok=True)
    (partial / "progress.json").write_text("{not json")
    paths[1].write_text("quant: {method: rtn, bits: 2, group_size: 32, symmetric: true}\n")
    crash_on = None
    changed = compare()
    assert calls == [2] and not partial.exists()
    assert changed["rows"][0] == {**first["rows"][0], "resumed": True}  # rtn4: the saved run, not rerun
    assert (out / "runs" / "rtn4.json").stat().st_mtime_ns == stamp
    assert changed["rows"][1]["bits_per_weight"] == pytest.approx(2 + 16 / 32)  # symmetric: no zeros stored
    assert "| rtn3 | rtn w2 g32 |" in (out / "report.md").read_text()
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["rtn3.json", "rtn4.json"]  # models not kept

    # A call with one of the recipes reports every finished run of the directory made under the same
    # evaluation; a run of other evaluation settings (the key no longer matches) is left out, not deleted.
    only = run_compare(str(tiny_model_dir), recipe_files(paths[:1]), out, SETTINGS, progress=False)
    assert [r["name"] for r in only["rows"]] == ["rtn4", "rtn3"] and all(r["resumed"] for r in only["rows"])
    report = (out / "report.md").read_text()
    assert "| rtn3 | rtn w2 g32 |" in report and "### rtn3" in report
    saved = json.loads((out / "runs" / "rtn3.json").read_text())
    (out / "runs" / "rtn3.json").write_text(json.dumps({**saved, "key": "another evaluation"}))
    only = run_compare(str(tiny_model_dir), recipe_files(paths[:1]), out, SETTINGS, progress=False)
    assert [r["name"] for r in only["rows"]] == ["rtn4"] and (out / "runs" / "rtn3.json").is_file()


def test_budget_recipes():
    base = make_recipe({"quant": {"method": "gptq", "bits": 3, "group_size": 32},
                        "budget": {"bits_per_weight": 4.0, "bits": [3, 4], "group_sizes": [32], "ranks": [0]}})
    named = budget_recipes([3.0, 2.5], base)
    assert [n for n, _ in named] == ["budget-3.0", "budget-2.5"]
    assert [r.budget.bits_per_weight for _, r in named] == [3.0, 2.5]
    assert all(r.budget.bits == [3, 4] and r.quant == base.quant for _, r in named)
    assert describe(named[0][1]) == "gptq budget 3.0 bpw (w3/4 g32 r0)"
    assert budget_recipes([3])[0][1].budget.bits_per_weight == 3.0  # default base recipe


def test_unique_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    paths = write_recipes(a, {"r": RECIPES["rtn4"]}) + write_recipes(b, {"r": RECIPES["rtn3"], "R-2": RECIPES["rtn3"]})
    assert [n for n, _ in recipe_files(paths)] == ["r", "r-2", "R-2-2"]
    r = make_recipe({})
    assert [n for n, _ in unique_names([("budget 3.0", r), ("../x", r)])] == ["budget_3.0", "_x"]


# ---- bad input: one line, exit 2, nothing lost


def test_missing_recipe_file(tiny_model_dir, tmp_path):
    good = write_recipes(tmp_path, {"rtn4": RECIPES["rtn4"]})[0]
    res = run("compare", tiny_model_dir, "--recipes", good, "--recipes", tmp_path / "nope.yaml", "-o", tmp_path / "o")
    assert_clean_error(res, "nope.yaml")
    assert not (tmp_path / "o").exists()


def test_invalid_yaml_and_invalid_recipe(tiny_model_dir, tmp_path):
    (tmp_path / "bad.yaml").write_text("quant: {method: rtn, bits: [4\n")
    res = run("compare", tiny_model_dir, "--recipes", tmp_path / "bad.yaml", "-o", tmp_path / "o")
    # load_recipe's message carries PyYAML's multi-line excerpt, so only its first line is checked.
    assert res.exit_code == 2 and res.output.startswith("lowbit: error:") and "not valid YAML" in res.output
    (tmp_path / "b9.yaml").write_text("quant: {method: rtn, bits: 9}\n")
    assert_clean_error(run("compare", tiny_model_dir, "--recipes", tmp_path / "b9.yaml", "-o", tmp_path / "o"),
                       "bit width 9")
    assert not (tmp_path / "o").exists()


def test_no_recipes(tiny_model_dir, tmp_path):
    assert_clean_error(run("compare", tiny_model_dir, "-o", tmp_path / "o"), "no recipes")
    with pytest.raises(LowbitError, match="no recipes"):
        run_compare(str(tiny_model_dir), [], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_report_dir_of_another_model(compared, tiny_model_dir, tmp_path):
    out, _ = compared
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    sd = load_file(other / "model.safetensors")
    name = next(k for k in sd if k.endswith("q_proj.weight"))
    sd[name] = sd[name] * 1.01
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    recipe = write_recipes(tmp_path / "r", {"rtn4": RECIPES["rtn4"]})[0]
    before = tree_hash(out)
    assert_clean_error(run("compare", other, "--recipes", recipe, "-o", out, *EVAL, "--quiet"), "another model")
    assert tree_hash(out) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert_clean_error(run("compare", tiny_model_dir, "--recipes", recipe, "-o", foreign), "not made by lowbit compare")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_describe_tells_apart_the_settings_of_one_method():
    from lowbit.recipe import make_recipe

    d = lambda q, **kw: describe(make_recipe({"quant": q, **kw}))  # noqa: E731
    assert d({"method": "claq", "bits": 3, "target_bits": 3.1}) != d({"method": "claq", "bits": 3})
    assert "OR 1/tail" in d({"method": "claq", "bits": 3, "outlier_count": 1})
    assert "+0.5% outliers" in d({"method": "gptq", "bits": 3, "outliers": 0.005})
    lq = {"method": "rtn", "bits": 3, "lqer": {"rank": 8, "scale": "none"}}
    l2 = {"method": "rtn", "bits": 3, "lqer": {"rank": 8, "scale": "act-mean"}}
    assert "+lqer r8" in d(lq) and "+l2qer r8" in d(l2)
    assert d({"method": "rtn", "bits": 4, "format": "mxint", "block_size": 16}) == "rtn w4 mxint b16"
    assert d({"method": "awq", "bits": 3, "base": "gptq"}).endswith("on gptq")
    assert d({"method": "gptq", "bits": 3}, finetune={"method": "l4q", "steps": 8}).endswith("+l4q 8 steps")
