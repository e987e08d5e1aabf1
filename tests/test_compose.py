"""Composed recipes: UDFC pruning → per-layer quantizer → fine-tuning (lowbit.pipeline.stages).

References: bits recounted from the stored tensors over the original model's linear shapes; the codebook
gradient against an explicit scatter-sum of ∂L/∂Ŵ in float64; L4Q's export against (q − z)·s recomputed
by hand; step 0 of every fine-tuning against the base weights bit for bit."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.errors import LowbitError
from lowbit.formats.codebook import CodebookGrid
from lowbit.formats.quantized_weight import QuantizedWeight, UniformGrid
from lowbit.methods import parse_method_config, quantize_weight
from lowbit.methods.stats import StatsAccumulator
from lowbit.formats.quantized_weight import bit_counts
from lowbit.nn.quant_linear import quantized_weights
from lowbit.pipeline.stages import FinetuneStageConfig, check_finetune, finetune_stage, keep_teacher
from lowbit.qat.codebook_tuning import CodebookTuneLinear
from helpers import tree_hash

runner = CliRunner()
CALIB = {"n_samples": 8, "seqlen": 64, "seed": 0}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])




# ---------------------------------------------------------------------------------------------- prune


def test_prune_then_quantize_round_trip(tiny_model_dir, tmp_path):
    """prune 25% of the MLP channels, GPTQ 3-bit the pruned model, save, load, evaluate via the CLI."""
    from lowbit.io.native import load_model, load_quantized

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"quant": {"method": "gptq", "bits": 3, "group_size": 32},
                                      "calibration": CALIB, "prune": {"ratio": 0.25}}))
    before = tree_hash(tiny_model_dir)
    out = tmp_path / "q"
    res = run("quantize", tiny_model_dir, "-o", out, "--recipe", recipe, "--quiet")
    assert res.exit_code == 0, res.output
    assert tree_hash(tiny_model_dir) == before, "the input model directory was modified"

    base, _ = load_model(str(tiny_model_dir))
    n = base.config.intermediate_size
    model = load_quantized(out)[0]
    assert model.config.intermediate_size == n - round(0.25 * n)
    info = json.loads((out / "lowbit.json").read_text())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    # Independent recount: stored bits of every layer record over the ORIGINAL linears' elements.
    orig = {name: mod.weight.numel() for name, mod in base.named_modules()
            if isinstance(mod, torch.nn.Linear) and name != "lm_head"}
    assert set(orig) == set(qc["layers"])
    from lowbit.nn.quant_linear import QuantLinear

    qls = {nm: m for nm, m in model.named_modules() if isinstance(m, QuantLinear)}
    bits = sum(sum(m.qweight.storage().values()) for m in qls.values())
    assert info["summary"]["bits_per_weight"] == pytest.approx(bits / sum(orig.values()), rel=1e-12)
    kept = sum(math.prod(m.qweight.shape) for m in qls.values())
    assert info["summary"]["bits_per_stored_weight"] == pytest.approx(bits / kept, rel=1e-12)
    assert qc["bits_per_weight"] == pytest.approx(bits / sum(orig.values()), rel=1e-12)  # config.json agrees
    assert qc["bits_per_stored_weight"] == pytest.approx(bits / kept, rel=1e-12)
    assert info["summary"]["bits_per_weight"] < info["summary"]["bits_per_stored_weight"]
    assert info["prune"]["original_shapes"]["model.layers.0.mlp.down_proj"] == [base.config.hidden_size, n]

    ev = run("eval", out, "--base", tiny_model_dir, "--seqlen", "64", "--max-windows", "8", "--json")
    assert ev.exit_code == 0, ev.output
    r = json.loads(ev.stdout[ev.stdout.index("{"):])
    assert math.isfinite(r["ppl"]) and 0 < r["kl"] < 0.1, r


@pytest.mark.parametrize("method", ["activation", "pg"])
def test_structured_prune_stage_then_quantize_and_finetune(tiny_model_dir, tmp_path, method):
    """A recipe prunes KV groups and MLP channels (per-layer widths), quantizes the sliced model and tunes
    it; the output reloads with its widths, runs what was saved, and counts bits over the original shapes."""
    from lowbit.io.native import load_model, load_quantized
    from lowbit.nn.quant_linear import QuantLinear

    prune = {"method": method, "ratio": 0.25, "pg_steps": 2}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"quant": {"method": "rtn", "bits": 4, "group_size": 16}, "calibration": CALIB,
                                      "prune": prune, "finetune": {"method": "l4q", "steps": 2}}))
    out = tmp_path / "q"
    res = run("quantize", tiny_model_dir, "-o", out, "--recipe", recipe, "--quiet")
    assert res.exit_code == 0, res.output
    base, _ = load_model(str(tiny_model_dir))
    model, qweights, _ = load_quantized(out)
    info = json.loads((out / "lowbit.json").read_text())
    widths = info["prune"]["widths"]
    assert sum(widths["channels"]) == round(0.75 * base.config.intermediate_size * base.config.num_hidden_layers)
    for i, layer in enumerate(model.model.layers):  # the reloaded model has the pruned widths
        assert isinstance(layer.mlp.down_proj, QuantLinear)
        assert layer.mlp.down_proj.in_features == widths["channels"][i]
        kv = widths["kv_groups"][i] * (base.config.hidden_size // base.config.num_attention_heads)
        assert layer.self_attn.k_proj.out_features == kv
    orig = {n: m.weight.numel() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    bits = sum(sum(q.storage().values()) for q in qweights.values())
    assert info["summary"]["bits_per_weight"] == pytest.approx(bits / sum(orig.values()), rel=1e-12)
    assert info["summary"]["bits_per_weight"] < 4  # fewer stored weights over the original count
    ev = run("eval", out, "--base", tiny_model_dir, "--seqlen", "64", "--max-windows", "4", "--json")
    assert ev.exit_code == 0, ev.output
    r = json.loads(ev.stdout[ev.stdout.index("{"):])
    assert math.isfinite(r["ppl"]) and r["kl"] > 0


def test_bit_counts_over_original_elements():
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    q = quantize_weight(W, None, parse_method_config({"method": "rtn", "bits": 4, "group_size": 16}))
    stored = sum(q.storage().values())
    c = bit_counts({"a": q}, {"a": [16, 32]})  # half the rows were pruned away
    assert c["bits_per_weight"] == stored / (16 * 32) and c["bits_per_stored_weight"] == stored / (8 * 32)
    assert bit_counts({"a": q}, None)["bits_per_weight"] == q.bits_per_weight()


def test_prune_bits_in_a_recipe_is_refused(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"quant": {"method": "rtn", "bits": 4}, "prune": {"ratio": 0.25, "bits": 4}}))
    res = run("quantize", tiny_model_dir, "-o", tmp_path / "q", "--recipe", recipe, "--quiet")
    assert res.exit_code == 2 and "prune.bits" in res.output, res.output
    assert not (tmp_path / "q").exists()


def test_pruned_width_need_not_fit_the_group_size(tiny_model_dir):
    from lowbit.io.native import load_model
    from lowbit.methods import parse_method_config, quantize_weight
    from lowbit.pipeline.stages import prune_stage
    from lowbit.prune.config import PruneConfig

    model, _ = load_model(str(tiny_model_dir))  # intermediate 128: 25% keeps 96, which 64 does not divide
    rep = prune_stage(model, PruneConfig(ratio=0.25), None)
    W = model.model.layers[0].mlp.down_proj.weight.detach()
    assert W.shape == (64, 96) and len(rep["layers"]) == 2
    qw = quantize_weight(W, None, parse_method_config({"method": "rtn", "bits": 4, "group_size": 64}))
    assert qw.grid.scale.shape == (64, 2)  # a full group of 64 and a partial one of 32


# ---------------------------------------------------------------------------------------------- codebook


def _layer_stats(W, gen):
    X = torch.randn(256, W.shape[1], generator=gen) * torch.linspace(0.2, 3, W.shape[1])
    acc = StatsAccumulator(W.shape[1], hessian=True)
    acc.add(X)
    return acc.result(), X


@pytest.mark.parametrize("cfg", [
    {"method": "claq", "bits": 2, "group_size": -1, "target_bits": 2.5, "high_bits": 4, "outliers": 0.02,
     "lqer": {"rank": 4, "scale": "none", "factor_dtype": "int8"}},
    {"method": "claq", "bits": 3, "group_size": -1, "codebook_bits": 6, "row_scale": "rms", "outliers": "dynamic"},
    {"method": "squeezellm", "bits": 3, "group_size": -1, "codebook_bits": 8,
     "lqer": {"rank": 4, "scale": "none", "factor_dtype": "mxint8"}},
])
def test_codebook_layer_step0_and_gradient(cfg):
    """At init the layer computes exactly Ŵ (outliers, mixed widths, quantized factors included); the LUT
    gradient is the scatter-sum of ∂L/∂Ŵ over the weights pointing at each entry (float64 reference)."""
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(48, 64, generator=gen) * 0.05
    stats, X = _layer_stats(W, gen)
    qw = quantize_weight(W, stats, parse_method_config(cfg))
    layer = CodebookTuneLinear(qw, None)
    assert torch.equal(layer.weight().detach(), qw.dequantize(lowrank=False))
    assert torch.equal(layer.export().dequantize(), qw.dequantize())
    y = layer(X[:16])
    torch.testing.assert_close(y, X[:16] @ qw.dequantize().T, rtol=1e-5, atol=1e-5)
    # gradient of L = Σ y ⊙ R
    R = torch.randn_like(y, generator=gen)
    (y * R).sum().backward()
    gW = (R.double().T @ X[:16].double())  # ∂L/∂Ŵ
    if qw.outliers is not None:
        gW.view(-1)[qw.outliers.index.long()] = 0  # outliers replace the grid value
    g = qw.grid
    if getattr(g, "row_scale", None) is not None:  # ŵ = s_r · LUT[c, q]
        gW *= g.row_scale.double()[:, None]
    ref = torch.zeros(g.codebook.shape, dtype=torch.float64)
    vec = (torch.arange(W.shape[1])[None, :].expand_as(gW) if g.axis == "column"
           else torch.arange(W.shape[0])[:, None].expand_as(gW))
    ref.index_put_((vec.reshape(-1), qw.codes.long().reshape(-1)), gW.reshape(-1), accumulate=True)
    torch.testing.assert_close(layer.lut.grad.double(), ref, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def claq_model(tiny_model_dir):
    """(base model, teacher, quantized model, qweights, calibration windows) for CLAQ 3-bit."""
    from lowbit.io.native import load_model
    from lowbit.jobs import calibration_data
    from lowbit.pipeline.calibrate import quantize_model
    from lowbit.recipe import make_recipe

    model, tok = load_model(str(tiny_model_dir))
    recipe = make_recipe({"quant": {"method": "claq", "bits": 3, "group_size": -1, "codebook_bits": 8},
                          "calibration": CALIB, "finetune": {"method": "codebook"}})
    calib = calibration_data(recipe, tok, model)
    teacher = keep_teacher(model, recipe.finetune)
    res = quantize_model(model, recipe.quant, calib, progress=False)
    return model, teacher, res.qweights, calib


def _tune(claq_model, **kw):
    model, teacher, qweights, calib = claq_model
    m = copy.deepcopy(model)
    rep = finetune_stage(m, teacher, FinetuneStageConfig(method="codebook", **kw), calib)
    return m, quantized_weights(m), rep


def test_codebook_tuning_lowers_loss_keeps_codes_and_bits(claq_model):
    model, teacher, qweights, calib = claq_model
    m, new, rep = _tune(claq_model, steps=12, lr=3e-4)
    assert rep["loss_after"] < 0.95 * rep["loss_before"], rep
    changed = 0
    for name, q in qweights.items():
        t = new[name]
        assert torch.equal(t.codes, q.codes) and t.storage() == q.storage()
        assert t.bits_per_weight() == q.bits_per_weight()
        g0, g1 = q.grid, t.grid
        assert g1.entry_bits == 8 and torch.equal(g1.entry_scale, g0.entry_scale)
        # the LUT is exactly what the stored uint8 entries decode to: nothing stored apart from them
        t2 = QuantizedWeight.from_state(*t.to_state())
        assert torch.equal(t2.dequantize(), t.dequantize())
        changed += int(not torch.equal(g1.codebook, g0.codebook))
        assert model.get_submodule(name).qweight is q  # the input model is untouched
    assert changed == len(qweights)
    # the model now runs the exported weights: its loss is the reported one
    from lowbit.pipeline.stages import window_losses

    assert window_losses(m, calib, "kd", teacher) == rep["loss_after"]
    assert bit_counts(new, None) == bit_counts(qweights, None)


def test_codebook_tuning_deterministic_and_step0(claq_model):
    _, _, qweights, _ = claq_model
    _, a, _ = _tune(claq_model, steps=3, seed=5, lr=1e-3)
    _, b, _ = _tune(claq_model, steps=3, seed=5, lr=1e-3)
    _, c, _ = _tune(claq_model, steps=3, seed=6, lr=1e-3)
    assert all(torch.equal(a[n].grid.codebook, b[n].grid.codebook) for n in a)
    assert any(not torch.equal(a[n].grid.codebook, c[n].grid.codebook) for n in a)
    _, z, rep = _tune(claq_model, steps=0)
    assert all(torch.equal(z[n].grid.entries, qweights[n].grid.entries) for n in z)
    assert rep["loss_after"] == rep["loss_before"]


# ---------------------------------------------------------------------------------------------- l4q


@pytest.mark.parametrize("symmetric", [False, True])
def test_l4q_stage_from_gptq(tiny_model_dir, symmetric):
    from lowbit.io.native import load_model
    from lowbit.jobs import calibration_data
    from lowbit.pipeline.calibrate import quantize_model
    from lowbit.recipe import make_recipe

    model, tok = load_model(str(tiny_model_dir))
    recipe = make_recipe({"quant": {"method": "gptq", "bits": 3, "group_size": 32, "symmetric": symmetric},
                          "calibration": CALIB})
    calib = calibration_data(recipe, tok, model)
    teacher = keep_teacher(model, FinetuneStageConfig(method="l4q"))
    qweights = quantize_model(model, recipe.quant, calib, progress=False).qweights
    m0 = copy.deepcopy(model)
    finetune_stage(m0, teacher, FinetuneStageConfig(method="l4q", steps=0), calib)
    z = quantized_weights(m0)
    for n, q in qweights.items():  # step 0 exports the GPTQ model exactly
        assert torch.equal(z[n].codes, q.codes) and torch.equal(z[n].grid.scale, q.grid.scale)
        assert torch.equal(z[n].grid.zero, q.grid.zero)
    rep = finetune_stage(model, teacher, FinetuneStageConfig(method="l4q", steps=6, lr=1e-2), calib)
    new = quantized_weights(model)
    assert rep["loss_after"] < rep["loss_before"], rep
    moved = 0
    for n, q in new.items():
        g = q.grid
        assert isinstance(g, UniformGrid) and g.symmetric == symmetric and g.g_idx is None and q.lowrank is None
        assert (g.bits, g.group_size) == (3, 32) and int(q.codes.max()) < 8
        assert q.storage() == qweights[n].storage()
        S = g.scale.double().repeat_interleave(32, 1)
        Z = g.zero.double().repeat_interleave(32, 1)
        assert torch.equal(q.dequantize().double(), (q.codes.double() - Z) * S)
        if symmetric:
            assert bool((g.zero == 4).all())
        moved += int(not torch.equal(q.codes, qweights[n].codes) or not torch.equal(g.scale, qweights[n].grid.scale))
        x = torch.randn(3, q.shape[1], generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(model.get_submodule(n)(x), x @ q.dequantize().T)
    assert moved > 0
    assert bit_counts(new, None) == bit_counts(qweights, None)


# ---------------------------------------------------------------------------------------------- refusals


def _q(cfg, shape=(16, 64)):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=gen)
    stats, _ = _layer_stats(W, gen)
    return quantize_weight(W, stats, parse_method_config(cfg))


@pytest.mark.parametrize("method,cfg,needle", [
    ("l4q", {"method": "claq", "bits": 3, "group_size": -1}, "codebook grid cannot"),
    ("l4q", {"method": "gptq", "bits": 3, "group_size": 32, "lqer": {"rank": 2, "scale": "none"}}, "low-rank"),
    ("l4q", {"method": "gptq", "bits": 3, "group_size": 32, "static_groups": False}, "g_idx"),
    ("l4q", {"method": "rtn", "bits": 4, "format": "mxint"}, "mxint grid"),
    ("codebook", {"method": "gptq", "bits": 3, "group_size": 32}, "no quantized layer"),
])
def test_bad_combinations(method, cfg, needle):
    with pytest.raises(LowbitError, match=needle):
        check_finetune(FinetuneStageConfig(method=method), {"x": _q(cfg)})


def test_finetune_needs_windows_and_valid_settings():
    from lowbit.recipe import make_recipe

    with pytest.raises(LowbitError, match="finetune"):
        make_recipe({"finetune": {"method": "gptq"}})
    with pytest.raises(LowbitError, match="finetune.steps"):
        make_recipe({"finetune": {"method": "codebook", "steps": -1}})
    with pytest.raises(LowbitError, match="calibration windows"):
        finetune_stage(torch.nn.Linear(2, 2), None, FinetuneStageConfig(method="codebook"), None)
    assert isinstance(_q({"method": "claq", "bits": 3, "group_size": -1}).grid, CodebookGrid)


def test_job_prune_quantize_finetune(tiny_model_dir, tmp_path):
    """All three stages in one `quantize_job`: the saved model is the tuned one, counted over original elements,
    and the teacher is the unpruned fp32 model (the tuned KL is measured against it)."""
    from lowbit.io.native import load_quantized
    from lowbit.jobs import quantize_job
    from lowbit.recipe import make_recipe

    r = make_recipe({"quant": {"method": "claq", "bits": 3, "group_size": -1}, "calibration": CALIB,
                     "prune": {"ratio": 0.25}, "finetune": {"method": "codebook", "steps": 6, "lr": 3e-4}})
    s = quantize_job(str(tiny_model_dir), tmp_path / "q", r, progress=False)
    model, qweights, info = load_quantized(tmp_path / "q")
    prov = info["provenance"]
    assert prov["finetune"]["loss_after"] < prov["finetune"]["loss_before"]
    orig = sum(math.prod(v) for v in prov["prune"]["original_shapes"].values())
    mlp_kept = sum(math.prod(q.shape) for n, q in qweights.items() if ".mlp." in n)
    assert mlp_kept == round(0.75 * orig)
    assert s["bits_per_weight"] == bit_counts(qweights, prov["prune"]["original_shapes"])["bits_per_weight"]
    assert s["bits_per_weight"] < s["bits_per_stored_weight"]
    qc = info["quantization_config"]  # config.json says the same as the summary (exporters read it)
    assert qc["bits_per_weight"] == s["bits_per_weight"] and qc["bits_per_stored_weight"] == s["bits_per_stored_weight"]
    assert all(isinstance(q.grid, CodebookGrid) for q in qweights.values())


def test_finetune_stage_shows_its_steps_in_a_log(claq_model, monkeypatch, capsys):
    """A fine-tune of many minutes inside `lowbit quantize` (and a compare run) prints its steps and loss."""
    from lowbit import progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.01)
    model, teacher, qweights, calib = claq_model
    finetune_stage(copy.deepcopy(model), teacher, FinetuneStageConfig(method="codebook", steps=2), calib,
                   progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "finetune (codebook)" in line]
    assert lines and re.search(r"finetune \(codebook\) 2/2 \(loss \d", lines[-1]), lines


def test_quantized_spiel_as_a_recipe_stage(tiny_model_dir, tmp_path):
    """GPTQ, then SpIEL on the quantized weights in the same run: the loss falls, every layer keeps its grid
    and codes and gains exactly k fp16 entries (values and positions counted), and the saved model is the
    tuned one (its loss on the calibration windows is the reported one)."""
    from lowbit.io.native import load_quantized
    from lowbit.jobs import calibration_data, quantize_job
    from lowbit.pipeline.calibrate import quantize_model
    from lowbit.pipeline.stages import window_losses
    from lowbit.recipe import make_recipe

    quant = {"method": "gptq", "bits": 3, "group_size": 32}
    ft = {"method": "spiel", "steps": 6, "lr": 2e-3, "density": 0.02, "reselect_every": 2, "accumulate_steps": 1}
    r = make_recipe({"quant": quant, "calibration": CALIB, "finetune": ft})
    s = quantize_job(str(tiny_model_dir), tmp_path / "q", r, progress=False)
    model, qweights, info = load_quantized(tmp_path / "q")
    rep = info["provenance"]["finetune"]
    assert rep["loss_after"] < rep["loss_before"], rep
    from lowbit.io.native import load_model

    base, tok = load_model(str(tiny_model_dir))
    plain = quantize_model(copy.deepcopy(base), r.quant, calibration_data(r, tok, base), progress=False).qweights
    for name, q in qweights.items():
        p = plain[name]
        assert torch.equal(q.codes, p.codes) and torch.equal(q.grid.scale, p.grid.scale)
        assert q.outliers is not None and q.outliers.values.numel() == round(0.02 * q.shape[0] * q.shape[1])
        assert q.bits_per_weight() > p.bits_per_weight()  # the entries and their positions are counted
    assert s["bits_per_weight"] == pytest.approx(bit_counts(qweights)["bits_per_weight"], rel=1e-12)
    teacher = keep_teacher(base, FinetuneStageConfig(method="spiel"))
    calib = calibration_data(r, tok, base)
    assert window_losses(model, calib[:rep["loss_windows"]], "kd", teacher) == pytest.approx(rep["loss_after"], rel=1e-5)


def test_loqt_stage_from_the_gptq_grid(tiny_model_dir):
    """LoQT as a finetune stage: step 0 gives back the GPTQ codes exactly (its merges round onto the base's
    grid); after training the export is a plain grid of the same bits whose model is the one evaluated."""
    from lowbit.io.native import load_model
    from lowbit.jobs import calibration_data
    from lowbit.pipeline.calibrate import quantize_model
    from lowbit.pipeline.stages import window_losses
    from lowbit.recipe import make_recipe

    model, tok = load_model(str(tiny_model_dir))
    recipe = make_recipe({"quant": {"method": "gptq", "bits": 3, "group_size": 32}, "calibration": CALIB})
    calib = calibration_data(recipe, tok, model)
    teacher = keep_teacher(model, FinetuneStageConfig(method="loqt"))
    qweights = quantize_model(model, recipe.quant, calib, progress=False).qweights
    m0 = copy.deepcopy(model)
    finetune_stage(m0, teacher, FinetuneStageConfig(method="loqt", steps=0), calib)
    for n, q in quantized_weights(m0).items():
        assert torch.equal(q.codes, qweights[n].codes) and torch.equal(q.grid.scale, qweights[n].grid.scale)
    cfg = FinetuneStageConfig(method="loqt", steps=6, lr=5e-2, update_gap=2, rank=2, alpha=4.0)
    rep = finetune_stage(model, teacher, cfg, calib)
    new = quantized_weights(model)
    moved = 0
    for n, q in new.items():
        assert isinstance(q.grid, UniformGrid) and q.lowrank is None and q.outliers is None
        assert q.storage() == qweights[n].storage() and torch.equal(q.grid.scale, qweights[n].grid.scale)
        moved += int(not torch.equal(q.codes, qweights[n].codes))
    assert moved > 0  # merges moved codes across grid steps
    assert window_losses(model, calib[:rep["loss_windows"]], "kd", teacher) == rep["loss_after"]
    assert bit_counts(new) == bit_counts(qweights)
