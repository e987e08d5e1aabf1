"""Budgeted allocation: the knapsack against brute force, the measured sensitivity against a direct KL,
and the end-to-end plan (within budget, reproducible from its recipe, never worse than a uniform choice)."""

import copy
import itertools

import numpy as np
import pytest
import torch

from lowbit.allocate.config import BudgetConfig, describe
from lowbit.allocate.knapsack import solve_dp, solve_lagrangian
from lowbit.errors import LowbitError


def _brute(d, b, cap):
    best, arg = np.inf, None
    for combo in itertools.product(*[range(d.shape[1])] * d.shape[0]):
        bits = sum(b[i, o] for i, o in enumerate(combo))
        cost = sum(d[i, o] for i, o in enumerate(combo))
        if bits <= cap and cost < best:
            best, arg = cost, combo
    return best, arg


@pytest.mark.parametrize("seed", range(6))
def test_dp_matches_brute_force(seed):
    g = np.random.default_rng(seed)
    L, O = 4, 5
    b = g.integers(1, 20, size=(L, O)).astype(float)
    d = g.random((L, O)) * 10
    cap = float(b.min(1).sum() + g.integers(0, 30))
    best, _ = _brute(d, b, cap)
    plan = solve_dp(d, b, cap, unit=1.0)
    assert b[np.arange(L), plan].sum() <= cap
    assert d[np.arange(L), plan].sum() == pytest.approx(best, rel=1e-12)
    lag = solve_lagrangian(d, b, cap)  # feasible, never better than the exact optimum
    assert b[np.arange(L), lag].sum() <= cap
    assert d[np.arange(L), lag].sum() >= best - 1e-12


def test_dp_rounding_stays_feasible_and_handles_inf():
    g = np.random.default_rng(7)
    b = g.random((6, 4)) * 1000
    d = g.random((6, 4))
    d[2, 1] = np.inf  # an option that does not apply to layer 2
    cap = float(b.mean(1).sum())
    plan = solve_dp(d, b, cap, unit=cap / 97)  # coarse unit: bits rounded up, so still within budget
    assert b[np.arange(6), plan].sum() <= cap
    assert plan[2] != 1
    with pytest.raises(LowbitError, match="infeasible"):
        solve_dp(d, b, float(b.min(1).sum()) * 0.99)


def test_budget_config_options_and_validation():
    cfg = BudgetConfig(bits_per_weight=3.0, bits=[3, 2], group_sizes=[128, -1], ranks=[0, 8], outliers=[0.0])
    opts = cfg.options("gptq")
    assert len(opts) == 2 * 2 * 2
    assert {describe(o) for o in opts} >= {"w2 pc", "w3 g128 r8"}
    assert len(cfg.options("claq")) == 2 * 1 * 2  # codebooks: no group size to choose
    # whole method configs as further options: validated, the carried-over keys made explicit
    m = BudgetConfig(bits_per_weight=3.0, bits=[3], group_sizes=[128], ranks=[0],
                     methods=[{"method": "claq", "bits": 3, "codebook_bits": 8}])
    opts = m.options("gptq")
    assert len(opts) == 2 and opts[-1]["method"] == "claq" and opts[-1]["group_size"] == -1
    assert describe(opts[-1]) == "claq w3 pc cb8"
    for bad in ({"bits": 3}, {"method": "claq", "bits": 3, "group_size": 128}, {"method": "nope"}):
        with pytest.raises(ValueError):
            BudgetConfig(bits_per_weight=3.0, methods=[bad])
    with pytest.raises(ValueError):
        BudgetConfig(bits_per_weight=3.0, bits=[9])
    with pytest.raises(ValueError):
        BudgetConfig(bits_per_weight=3.0, ranks=[-1])


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from lowbit.io.native import load_model
    from lowbit.jobs import calibration_data
    from lowbit.recipe import make_recipe

    model, tok = load_model(tiny_model_dir)
    r = make_recipe({"quant": {"method": "gptq", "bits": 3, "group_size": 32},
                     "calibration": {"n_samples": 8, "seqlen": 64},
                     "budget": {"bits_per_weight": 3.0, "bits": [2, 3, 4], "group_sizes": [-1, 32],
                                "ranks": [0, 4], "n_samples": 4, "batch_size": 4}})
    return model, tok, r, calibration_data(r, tok, model)


def test_sensitivity_is_the_direct_kl_and_restores_the_model(tiny):
    from lowbit.allocate.job import target_layers
    from lowbit.allocate.sensitivity import measure_sensitivity
    from lowbit.pipeline.collect import collect_stats
    from lowbit.eval.kl import kl_divergence
    from lowbit.methods import parse_method_config, quantize_weight

    model, _, r, calib = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    all_names = target_layers(model, r)
    names = [all_names[0], all_names[-1]]  # the last one runs from its own block onwards
    options = r.budget.options("gptq")
    sens = measure_sensitivity(model, names, calib, r.quant, options, n_samples=4, batch_size=4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # independent check of one cell: quantize that layer alone in a copy and run the evaluator's KL
    stats = collect_stats(model, names, calib, 4)
    name = names[1]
    o = int(np.argmin(sens.bits[1]))  # the cheapest option: never dominated, a KL far above float32 noise
    cfg = parse_method_config({**r.quant.model_dump(), **options[o]})
    qw = quantize_weight(model.get_submodule(name).weight.detach().float(), stats[name], cfg)
    m2 = copy.deepcopy(model)
    m2.get_submodule(name).weight.data.copy_(qw.dequantize())
    ref = kl_divergence(m2, model, calib[:4], batch_size=4).kl_mean
    assert ref > 1e-5  # far above the float32 noise of KL (~1e-7 here)
    assert sens.kl[1, o] == pytest.approx(ref, rel=1e-4)
    assert sens.bits[1, o] == sum(qw.storage().values())
    # the cheapest option of a layer is never dominated, and dominated ones are not usable
    assert np.isfinite(sens.kl[0, int(np.argmin(sens.bits[0]))])
    assert (np.isfinite(sens.kl) == np.isfinite(sens.bits)).all()


def test_method_options_are_measured_and_planned(tiny, tiny_model_dir, tmp_path, monkeypatch):
    """A `methods` option (CLAQ on a GPTQ base) is measured like a grid option — its cell is the direct KL of
    the layer quantized by that method — and a plan that picks it is written and reproduced as an override."""
    from lowbit.allocate.job import target_layers
    from lowbit.allocate.sensitivity import measure_sensitivity
    from lowbit.eval.kl import kl_divergence
    from lowbit.io.native import load_quantized
    from lowbit.jobs import quantize_job
    from lowbit.methods import parse_method_config, quantize_weight
    from lowbit.pipeline.collect import collect_stats
    from lowbit.recipe import load_recipe

    model, _, r, calib = tiny
    claq = {"method": "claq", "bits": 2, "codebook_bits": 8}
    budget = r.budget.model_copy(update={"bits": [3], "group_sizes": [32], "ranks": [0]})
    budget = type(budget).model_validate({**budget.model_dump(), "methods": [claq]})
    options = budget.options("gptq")
    name = target_layers(model, r)[-1]
    sens = measure_sensitivity(model, [name], calib, r.quant, options, n_samples=4, batch_size=4)
    cfg = parse_method_config(claq)
    qw = quantize_weight(model.get_submodule(name).weight.detach().float(), collect_stats(model, [name], calib, 4)[name], cfg)
    m2 = copy.deepcopy(model)
    m2.get_submodule(name).weight.data.copy_(qw.dequantize())
    assert sens.kl[0, -1] == pytest.approx(kl_divergence(m2, model, calib[:4], batch_size=4).kl_mean, rel=1e-4)
    assert sens.bits[0, -1] == sum(qw.storage().values())
    # a budget between CLAQ 2-bit and GPTQ 3-bit g32 everywhere: some layers must take the CLAQ option
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    rb = r.model_copy(update={"budget": budget.model_copy(update={"bits_per_weight": 3.0})})
    out = tmp_path / "q"
    s = quantize_job(str(tiny_model_dir), out, rb, progress=False)
    assert s["bits_per_weight"] <= 3.0 + 1e-9
    plan = load_recipe(out / "plan.yaml")
    methods = {o.config.get("method", "gptq") for o in plan.overrides}
    assert methods == {"gptq", "claq"}
    again = tmp_path / "again"
    quantize_job(str(tiny_model_dir), again, plan, progress=False)
    a, b = load_quantized(out)[1], load_quantized(again)[1]
    for k in a:
        assert torch.equal(a[k].dequantize(), b[k].dequantize()), k
    assert {a[k].grid.kind for k in a} >= {"codebook"}


def test_budgeted_quantize_end_to_end(tiny, tiny_model_dir, tmp_path, monkeypatch):
    import json

    from lowbit.allocate.sensitivity import Sensitivity
    from lowbit.io.native import load_quantized
    from lowbit.jobs import quantize_job
    from lowbit.recipe import load_recipe

    _, _, r, _ = tiny
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q"
    s = quantize_job(str(tiny_model_dir), out, r, progress=False)
    cached = list((tmp_path / "cache" / "sensitivity").glob("sensitivity-*.json"))
    assert len(cached) == 1  # one measurement, reused by another budget:
    lower = r.model_copy(update={"budget": r.budget.model_copy(update={"bits_per_weight": 2.6})})
    s26 = quantize_job(str(tiny_model_dir), tmp_path / "q26", lower, progress=False)
    assert s26["bits_per_weight"] <= 2.6 + 1e-9 < s["bits_per_weight"]
    assert list((tmp_path / "cache" / "sensitivity").glob("sensitivity-*.json")) == cached
    assert s["bits_per_weight"] <= 3.0 + 1e-9
    saved = json.loads((out / "sensitivity.json").read_text())
    sens = Sensitivity.from_json(saved)  # the saved tables give back the plan's bits
    plan_bits = sum(sens.bits[i, o] for i, o in enumerate(saved["plan"])) / sum(sens.numel)
    assert plan_bits == pytest.approx(s["bits_per_weight"], rel=1e-12)
    plan_text = (out / "plan.yaml").read_text()
    assert plan_text.startswith("# lowbit budgeted plan")
    # the plan recipe reproduces the model bit for bit, with no search
    again = tmp_path / "again"
    s2 = quantize_job(str(tiny_model_dir), again, load_recipe(out / "plan.yaml"), progress=False)
    assert s2["bits_per_weight"] == s["bits_per_weight"]
    a, b = load_quantized(out)[1], load_quantized(again)[1]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].codes, b[k].codes) and torch.equal(a[k].dequantize(), b[k].dequantize()), k


def test_compare_cli_budgets(tiny_model_dir, tmp_path, monkeypatch):
    """`lowbit compare --budgets`: each budget becomes a run within its budget, with its plan kept."""
    import json

    import yaml
    from typer.testing import CliRunner

    from lowbit.cli import app

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    base = tmp_path / "grid.yaml"
    base.write_text(yaml.safe_dump({
        "quant": {"method": "rtn", "bits": 3, "group_size": 32},
        "calibration": {"n_samples": 4, "seqlen": 64},
        "budget": {"bits_per_weight": 3.0, "bits": [2, 4], "group_sizes": [-1, 32], "ranks": [0], "n_samples": 2}}))
    out = tmp_path / "report"
    res = CliRunner().invoke(app, ["compare", str(tiny_model_dir), "--budgets", "3.0", "2.5", "--budget-recipe",
                                   str(base), "-o", str(out), "--max-windows", "2",
                                   "--seqlen", "64", "--quiet"])
    assert res.exit_code == 0, res.output
    for b in (3.0, 2.5):
        row = json.loads((out / "runs" / f"budget-{b}.json").read_text())["result"]
        assert row["bits_per_weight"] <= b + 1e-9
        assert (out / "runs" / f"budget-{b}.plan.yaml").read_text().startswith("# lowbit budgeted plan")
    assert len(list((tmp_path / "cache" / "sensitivity").glob("*.json"))) == 1  # one measurement, two budgets
