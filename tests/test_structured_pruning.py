"""Structured masks on a GQA LLaMA: masking equals slicing the structures out, the least-squares refit
against a float64 lstsq on the same activations, scores' shapes, the policy-gradient driver's budget
and determinism; whole layers: masking a layer equals deleting it, Block Influence, the depth driver, the
saved model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.prune import structured as st
from lowbit.prune.pg import pg_masks


@pytest.fixture(scope="module")
def gqa_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _slice(lin: nn.Module, rows=None, cols=None) -> nn.Linear:
    W = lin.weight.detach()
    W = W[rows] if rows is not None else W
    W = W[:, cols] if cols is not None else W
    new = nn.Linear(W.shape[1], W.shape[0], bias=False)
    new.weight.data = W.clone()
    return new


def test_masking_equals_slicing(gqa_model):
    S = st.find_structures(gqa_model)
    assert (S.n_groups, S.n_all_channels, S.head_dim) == (4, 192, 16)
    g = torch.tensor([1.0, 0.0, 1.0, 1.0])  # layer 0 loses KV group 1 (its kv head 1 and query heads 2, 3)
    c = torch.ones(192)
    c[[3, 50, 70, 96]] = 0  # three channels of layer 0, channel 0 of layer 1
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    with st.masked(gqa_model, S, g, c):
        y = gqa_model(input_ids=ids).logits
    ref = copy.deepcopy(gqa_model)
    attn, mlp = ref.model.layers[0].self_attn, ref.model.layers[0].mlp
    q_keep = torch.arange(0, 32)  # query heads 0, 1 (16 rows each)
    attn.q_proj = _slice(attn.q_proj, rows=q_keep)
    attn.k_proj = _slice(attn.k_proj, rows=torch.arange(0, 16))
    attn.v_proj = _slice(attn.v_proj, rows=torch.arange(0, 16))
    attn.o_proj = _slice(attn.o_proj, cols=q_keep)
    keep0 = torch.tensor([i for i in range(96) if i not in (3, 50, 70)])
    mlp.gate_proj, mlp.up_proj = _slice(mlp.gate_proj, rows=keep0), _slice(mlp.up_proj, rows=keep0)
    mlp.down_proj = _slice(mlp.down_proj, cols=keep0)
    mlp1 = ref.model.layers[1].mlp
    keep1 = torch.arange(1, 96)
    mlp1.gate_proj, mlp1.up_proj = _slice(mlp1.gate_proj, rows=keep1), _slice(mlp1.up_proj, rows=keep1)
    mlp1.down_proj = _slice(mlp1.down_proj, cols=keep1)
    y_ref = ref(input_ids=ids).logits
    assert float((y - y_ref).norm() / y_ref.norm()) < 1e-5
    removed = S.parameters_removed(g.bool(), c.bool())
    assert removed == sum(p.numel() for p in gqa_model.parameters()) - sum(p.numel() for p in ref.parameters())


def test_least_squares_refit_matches_lstsq(gqa_model):
    model = copy.deepcopy(gqa_model)
    S = st.find_structures(model)
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    moments = st.input_moments(model, S, ids)
    X = []
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: X.append(a[0].reshape(-1, 96)))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    X = torch.cat(X).double()
    W = model.model.layers[1].mlp.down_proj.weight.detach().double().clone()
    g = torch.ones(4, dtype=torch.bool)
    c = torch.ones(192, dtype=torch.bool)
    c[96 + torch.arange(0, 96, 3)] = False  # a third of layer 1's channels
    rep = st.compensate(S, g, c, moments, damp=0.0)
    K = torch.nonzero(c[96:]).flatten()
    ref = torch.linalg.lstsq(X[:, K], X @ W.T).solution.T  # min ‖X Wᵀ − X_K W_Kᵀ‖
    new = model.model.layers[1].mlp.down_proj.weight.detach().double()
    assert float((new[:, K] - ref).norm() / ref.norm()) < 1e-4 and not new[:, ~c[96:]].any()
    lay = [r for r in rep["layers"] if r["layer"] == 1 and r["module"] == "down_proj"][0]
    assert lay["rel_error_compensated"] < lay["rel_error_masked"]
    full = [r for r in rep["layers"] if r["module"] == "o_proj"]  # nothing pruned: the refit keeps W
    assert all(r["rel_error_compensated"] < 1e-8 for r in full)


def test_scores_and_per_layer_masks(gqa_model):
    S = st.find_structures(gqa_model)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    mom = st.input_moments(gqa_model, S, ids)
    for kind in ("magnitude", "activation"):
        gs, cs = st.scores(S, kind, mom)
        assert gs.shape == (4,) and cs.shape == (192,) and bool((gs > 0).all() and (cs > 0).all())
    m = st.per_layer_mask(cs, 96, 0.75)
    assert m.view(2, 96).sum(1).tolist() == [72, 72]
    top = torch.argsort(-cs[:96])[:72]
    assert set(torch.nonzero(m[:96]).flatten().tolist()) == set(top.tolist())


def test_pg_driver_budget_and_determinism(gqa_model):
    S = st.find_structures(gqa_model)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(4))
    mom = st.input_moments(gqa_model, S, ids)
    a = pg_masks(gqa_model, S, ids, 0.5, mom, steps=6, batch_size=4, lr=0.05)
    b = pg_masks(gqa_model, S, ids, 0.5, mom, steps=6, batch_size=4, lr=0.05)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert int(a[0].sum()) == 2 and int(a[1].sum()) == 96 and len(a[2]["history"]) == 6


def test_search_driver_respects_the_parameter_budget(gqa_model):
    from lowbit.prune.search import search_masks

    S = st.find_structures(gqa_model)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(5))
    mom = st.input_moments(gqa_model, S, ids)
    g, c, rec = search_masks(gqa_model, S, ids, 0.75, mom, generations=3, population=6, mutations=4, crossovers=2)
    full = torch.ones(S.n_groups, dtype=torch.bool), torch.ones(S.n_all_channels, dtype=torch.bool)
    structural = S.parameters_removed(~full[0], ~full[1])  # every group and channel
    assert S.parameters_removed(g, c) >= 0.25 * structural - 1e-6  # within the budget of a uniform 75 %
    assert rec["best_fitness"] <= rec["start_fitness"] + 1e-9  # the start is in the population
    again = search_masks(gqa_model, S, ids, 0.75, mom, generations=3, population=6, mutations=4, crossovers=2)
    assert torch.equal(g, again[0]) and torch.equal(c, again[1])


@pytest.mark.parametrize("method", ["activation", "pg", "search"])
def test_prune_cli_writes_a_sliced_model_that_loads(tiny_model_dir, tmp_path, method):
    import json

    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.io.native import load_model

    out = tmp_path / method
    r = CliRunner().invoke(app, ["prune", str(tiny_model_dir), "-o", str(out), "--method", method, "--ratio", "0.25",
                                 "--calib-samples", "4", "--calib-seqlen", "32", "--pg-steps", "2",
                                 "--search-generations", "1", "--search-population", "3"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "prune_report.json").read_text())
    model, tok = load_model(str(out))
    assert sum(p.numel() for p in model.parameters()) == rep["parameters"][1] < rep["parameters"][0]
    assert sum(rep["widths"]["kv_groups"]) == 3 and min(rep["widths"]["kv_groups"]) >= 1  # 3 of 4 groups
    if method != "search":  # the search trades groups for channels within the parameter budget
        assert sum(rep["widths"]["channels"]) == 192
    base, _ = load_model(str(tiny_model_dir))
    S = st.find_structures(base)
    sliced = st.find_structures(model)
    assert [b[1].k_proj.out_features // S.head_dim for b in sliced.blocks] == rep["widths"]["kv_groups"]
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(input_ids=ids).logits).all()
    r = CliRunner().invoke(app, ["prune", str(tiny_model_dir), "-o", str(tmp_path / "x"), "--method", method,
                                 "--bits", "4"])
    assert r.exit_code != 0 and "--bits goes with --method udfc" in r.output


def test_sliced_model_equals_masked_and_refitted(gqa_model, tmp_path):
    from lowbit.io.native import load_model
    from lowbit.prune.slicing import slice_model

    model = copy.deepcopy(gqa_model)
    S = st.find_structures(model)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(6))
    mom = st.input_moments(model, S, ids)
    g = torch.tensor([True, False, True, True])
    c = torch.ones(192, dtype=torch.bool)
    c[torch.arange(0, 192, 5)] = False
    st.compensate(S, g, c, mom)
    with st.masked(model, S, g.float(), c.float()):
        y_mask = model(input_ids=ids).logits
    slice_model(model, S, g, c)
    y_slice = model(input_ids=ids).logits
    assert float((y_mask - y_slice).norm() / y_mask.norm()) < 1e-5
    model.save_pretrained(tmp_path / "m")
    back, _ = load_model(str(tmp_path / "m"))
    assert torch.allclose(back(input_ids=ids).logits, y_slice, rtol=1e-5, atol=1e-6)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["lowbit_structure"]["channels"][0] = 10_000  # a corrupt width is refused with the file named
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    from lowbit.errors import LowbitError

    with pytest.raises(LowbitError, match="outside"):
        load_model(str(tmp_path / "m"))


def test_prune_then_quantize_loads_with_its_widths(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.io.native import load_model, load_quantized

    r = CliRunner().invoke(app, ["prune", str(tiny_model_dir), "-o", str(tmp_path / "p"), "--method", "activation",
                                 "--ratio", "0.25", "--calib-samples", "4", "--calib-seqlen", "32"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["quantize", str(tmp_path / "p"), "-o", str(tmp_path / "q"), "--method", "rtn",
                                 "--bits", "8", "--group-size", "32", "--quiet"])
    assert r.exit_code == 0, r.output
    pruned, _ = load_model(str(tmp_path / "p"))
    model, qweights, _ = load_quantized(tmp_path / "q")
    sizes = {n: tuple(q.shape) for n, q in qweights.items()}
    assert sizes["model.layers.0.mlp.down_proj"] == tuple(pruned.model.layers[0].mlp.down_proj.weight.shape)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    a, b = pruned(input_ids=ids).logits, model(input_ids=ids).logits
    assert float((a - b).norm() / a.norm()) < 0.02  # 8-bit RTN of the pruned model


# ---- whole layers (depth)


@pytest.fixture(scope="module")
def deep_model():
    """4 layers whose blocks matter (scaled-up output projections), layer 2 made nearly the identity."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            f = 8e-3 if i == 2 else 8.0
            layer.self_attn.o_proj.weight.mul_(f)
            layer.mlp.down_proj.weight.mul_(f)
    return m


def test_masking_a_whole_layer_equals_deleting_it(deep_model):
    from lowbit.prune.depth import drop_layers, expand

    S = st.find_structures(deep_model)
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([True, False, True, True])
    with st.masked(deep_model, S, *expand(S, keep)):
        masked_logits = deep_model(input_ids=ids).logits
    d = copy.deepcopy(deep_model)
    assert drop_layers(d, keep) == [0, 2, 3] and d.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in d.model.layers] == [0, 1, 2]
    torch.testing.assert_close(d(input_ids=ids).logits, masked_logits, rtol=0, atol=0)
    # cached generation on the shorter stack = greedy decoding by full forward passes
    out = d.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    seq = ids[:1, :8]
    for _ in range(6):
        seq = torch.cat([seq, d(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_block_influence_and_the_depth_driver(deep_model):
    from lowbit.prune.depth import block_influence, pg_layer_mask

    S = st.find_structures(deep_model)
    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    bi = block_influence(deep_model, S, ids)
    # an identity block turns no hidden state: influence ≈ 0, far below every other layer's
    assert int(bi.argmin()) == 2 and float(bi[2]) < 1e-3 < float(bi[[0, 1, 3]].min())
    a, rec = pg_layer_mask(deep_model, S, ids, 0.75, steps=8, batch_size=4, seed=3)
    b, _ = pg_layer_mask(deep_model, S, ids, 0.75, steps=8, batch_size=4, seed=3)
    assert torch.equal(a, b) and int(a.sum()) == 3 and not bool(a[2])  # the budget, and the idle layer dropped
    assert rec["dropped"] == [2] and rec["forward_passes"] == 16
    with pytest.raises(LowbitError, match="prune at least one layer"):
        pg_layer_mask(deep_model, S, ids, 0.99, steps=1)


def test_depth_pruning_from_the_command_line_saves_a_loadable_model(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.io.native import load_model

    out = tmp_path / "d"
    res = CliRunner().invoke(app, ["prune", str(tiny_model_dir), "-o", str(out), "--method", "depth", "--ratio", "0.5",
                                   "--pg-steps", "2", "--calib-samples", "8", "--calib-seqlen", "64"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "prune_report.json").read_text())
    model, _ = load_model(str(out))
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1 and len(rep["kept_layers"]) == 1
    base, _ = load_model(str(tiny_model_dir))
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    S = st.find_structures(base)
    from lowbit.prune.depth import expand

    keep = torch.zeros(2, dtype=torch.bool)
    keep[rep["kept_layers"]] = True
    with st.masked(base, S, *expand(S, keep)):  # the saved model computes the masked original
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_depth_pruning_in_a_recipe_counts_the_deleted_layers(tiny_model_dir, tmp_path):
    """prune one of two layers, quantize the rest: bits per weight over the ORIGINAL two layers' elements
    (the deleted one stores nothing), per stored weight over the kept one; the output reloads and runs."""
    import math

    import yaml
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.io.native import load_model, load_quantized

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"quant": {"method": "rtn", "bits": 4, "group_size": 16},
                                      "calibration": {"n_samples": 8, "seqlen": 64},
                                      "prune": {"method": "depth", "ratio": 0.5, "pg_steps": 2}}))
    out = tmp_path / "q"
    res = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "-o", str(out), "--recipe", str(recipe), "--quiet"])
    assert res.exit_code == 0, res.output
    model, qweights, _ = load_quantized(out)
    assert model.config.num_hidden_layers == 1 and all(n.startswith("model.layers.0.") for n in qweights)
    base, _ = load_model(str(tiny_model_dir))
    orig = sum(m.weight.numel() for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    bits = sum(sum(q.storage().values()) for q in qweights.values())
    saved = json.loads((out / "lowbit.json").read_text())
    s = saved["summary"]
    assert s["bits_per_weight"] == pytest.approx(bits / orig, rel=1e-12)
    assert s["bits_per_stored_weight"] == pytest.approx(bits / sum(math.prod(q.shape) for q in qweights.values()))
    assert s["bits_per_weight"] == pytest.approx(s["bits_per_stored_weight"] / 2, rel=1e-9)  # two equal layers
    removed = [n for n in saved["prune"]["original_shapes"] if n.startswith("removed/")]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(removed) == 7 and qc["bits_per_weight"] == s["bits_per_weight"]
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(input_ids=ids).logits).all()
