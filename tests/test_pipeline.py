"""The block-by-block pipeline, architecture adapters, layer selection, resume and the method registry.

Tiny randomly initialised HF models built from configs (no downloads) and random token windows.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from lowbit.errors import LowbitError
from lowbit.methods import (
    GPTQConfig,
    RTNConfig,
    StatsAccumulator,
    needs_calibration,
    parse_method_config,
    quantize_weight,
)
from lowbit.models.adapters import get_adapter
from lowbit.models.swap import swap_in
from lowbit.nn.quant_linear import QuantLinear
from lowbit.pipeline import calibrate
from lowbit.pipeline.calibrate import quantize_model

V = 128
LLAMA_KW = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)


def build(arch: str, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(**{**LLAMA_KW, "num_hidden_layers": layers}))
    elif arch == "mistral":
        m = MistralForCausalLM(MistralConfig(**{**LLAMA_KW, "num_hidden_layers": layers}))
    elif arch == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**{**LLAMA_KW, "num_hidden_layers": layers}))
    elif arch == "opt":
        m = OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                                     vocab_size=V, max_position_embeddings=64, word_embed_proj_dim=64))
    else:
        m = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=V, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    return m.eval()


def windows(n: int = 16, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits.float()


def block_linears(model: nn.Module) -> set[str]:
    """Every linear inside a decoder block (`model.layers.3.…`, `transformer.h.3.…`)."""
    return {n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and re.search(r"(^|\.)(layers|h)\.\d+\.", n)}


def qw_equal(a, b) -> bool:
    ta, ma = a.to_state()
    tb, mb = b.to_state()
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)



GPTQ4 = GPTQConfig(bits=4, group_size=32)
RTN4 = RTNConfig(bits=4, group_size=32)


# ---- every architecture, both methods


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "opt", "gpt2"])
@pytest.mark.parametrize("config", [RTN4, GPTQ4], ids=["rtn", "gptq"])
def test_architectures_end_to_end(arch, config):
    model = build(arch)
    expected = block_linears(model)
    adapter = get_adapter(model)
    assert adapter.name == arch
    assert adapter.blocks_path == {"opt": "model.decoder.layers", "gpt2": "transformer.h"}.get(arch, "model.layers")
    calib, test = windows(), windows(4, seed=2)
    ref = logits(model, test)
    res = quantize_model(model, config, calib if needs_calibration(config) else None, progress=False)
    assert set(res.qweights) == expected
    for name, m in model.named_modules():
        assert not (isinstance(m, (nn.Linear, Conv1D)) and name in expected)
        if name in expected:
            assert isinstance(m, QuantLinear) and m.qweight.bits == 4
    assert not isinstance(model.get_output_embeddings(), QuantLinear)
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    out = logits(model, test)
    assert ((out - ref).norm() / ref.norm()) < 0.2
    with pytest.raises(LowbitError, match="already quantized"):
        get_adapter(model)
    assert len(res.records) == len(expected) and 4 < res.bits_per_weight < 6.5
    if needs_calibration(config):
        assert all(r.rel_error is not None and r.rel_error < 0.2 and r.nsamples == 16 * 32 for r in res.records)


def test_gptq_beats_rtn_on_correlated_inputs():
    """Low-rank embeddings make every layer's inputs strongly correlated, where GPTQ's OBS updates pay off."""
    def correlated():
        m = build("llama")
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            m.model.embed_tokens.weight.copy_(torch.randn(V, 6, generator=g) @ torch.randn(6, 64, generator=g)
                                              + 0.05 * torch.randn(V, 64, generator=g))
        return m

    calib = windows()
    r = quantize_model(correlated(), RTNConfig(bits=3, group_size=32), calib, progress=False, measure_error=True)
    g = quantize_model(correlated(), GPTQConfig(bits=3, group_size=32), calib, progress=False)
    err_r = sum(x.rel_error**2 for x in r.records)
    err_g = sum(x.rel_error**2 for x in g.records)
    assert err_g < 0.1 * err_r  # measured: ≈ 0.02
    assert all(a.rel_error < 0.5 * b.rel_error for a, b in zip(g.records, r.records))  # measured: ≤ 0.17


def test_true_sequential_hessian_comes_from_quantized_predecessors(monkeypatch):
    """o_proj's statistics must be taken with q/k/v already quantized (and block 1's with block 0 quantized)."""
    seen = {}
    orig = calibrate.quantize_weight

    def spy(W, stats, config, **kw):
        if stats is not None:
            seen[len(seen)] = stats.hessian.clone()
        return orig(W, stats, config, **kw)

    monkeypatch.setattr(calibrate, "quantize_weight", spy)
    model = build("llama")
    float_model = copy.deepcopy(model)
    calib = windows()
    res = quantize_model(model, GPTQConfig(bits=3, group_size=32), calib, progress=False, batch_size=5)
    names = [r.name for r in res.records]

    def hessian_of(m: nn.Module, name: str) -> torch.Tensor:
        acc = StatsAccumulator(64)
        h = m.get_submodule(name).register_forward_hook(lambda mod, inp, out: acc.add(inp[0]))
        for i in range(0, 16, 5):
            logits(m, calib[i : i + 5])
        h.remove()
        return acc.result().hessian

    for name in ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj"]:
        used = seen[names.index(name)]
        torch.testing.assert_close(used, hessian_of(model, name), rtol=1e-4, atol=1e-5)
        assert (used - hessian_of(float_model, name)).norm() > 1e-3 * used.norm()


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "qwen2"])
def test_reused_outputs_change_nothing_and_save_forward_passes(arch, monkeypatch):
    """The block runner's stored outputs of frozen modules and its early stops give bit-identical
    quantized weights to recomputing everything (budget 0), with fewer attention forward passes."""
    calls = {"attn": 0}
    attn = {"llama": "self_attn", "qwen2": "self_attn", "opt": "self_attn", "gpt2": "attn"}[arch]

    # count the attention computations themselves (the class forward, which a stored output skips)
    cls = type(next(m for n, m in build(arch).named_modules() if n.endswith("." + attn)))
    real = cls.forward

    def forward(self, *a, **k):
        calls["attn"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(cls, "forward", forward)
    results = []
    for budget in (0, None):
        calls["attn"] = 0
        model = build(arch)
        res = quantize_model(model, GPTQConfig(bits=3, group_size=32), windows(), progress=False, batch_size=4,
                             cache_budget=budget)
        results.append((res, calls["attn"], logits(model, windows(4, seed=2))))
    (plain, n_plain, l_plain), (reused, n_reused, l_reused) = results
    assert plain.qweights.keys() == reused.qweights.keys()
    assert all(qw_equal(plain.qweights[k], reused.qweights[k]) for k in plain.qweights)
    assert torch.equal(l_plain, l_reused)
    assert n_reused < n_plain, (n_reused, n_plain)


def test_each_linear_runs_about_once_per_batch(monkeypatch):
    """LLaMA, 2 blocks, 4 batches: the block runner computes each linear once per batch, plus what batch 0
    needs to learn that q/k/v and gate/up share their input and that self_attn / mlp pass o_proj's /
    down_proj's output through: 58 products. Re-running the block per group (q/k/v, o, gate/up, down, then
    the advance) costs 3 + 4 + 6 + 7 + 7 products per batch: 188 here."""
    import torch.nn.functional as F

    n = {"calls": 0}
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **k: (n.__setitem__("calls", n["calls"] + 1), real(*a, **k))[1])
    quantize_model(build("llama"), GPTQConfig(bits=3, group_size=32), windows(), progress=False, batch_size=4)
    # per block: q,k on batch 0 (group {q,k,v}); q,k,v × 4 (group o); o × 4 + gate on batch 0 (group
    # {gate,up}); gate, up × 4 (group down); down × 4 to advance (block 0 only); plus one pass of block 0
    # on batch 0 that reads the groups off the dataflow (7 linears; block 1 has the same structure)
    assert n["calls"] == (2 + 12 + 5 + 8) * 2 + 4 + 7


def test_hessian_upper_triangle_accumulation_matches_float64():
    from lowbit.methods import stats

    g = torch.Generator().manual_seed(0)
    d = 2 * stats.STRIP + 37  # three strips, the last one short
    xs = [torch.randn(n, d, generator=g) * torch.linspace(0.1, 3, d) for n in (100, 7, 300)]
    acc = StatsAccumulator(d)
    for x in xs:
        acc.add(x)
    X = torch.cat(xs).double()
    ref = 2 * X.T @ X / X.shape[0]
    H = acc.result().hessian
    assert torch.equal(H, H.T)  # exactly symmetric by construction
    assert ((H.double() - ref).norm() / ref.norm()) < 1e-6


# ---- layer selection


def test_include_ignore_and_overrides():
    model = build("llama")
    ignored, eight = "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"
    res = quantize_model(model, GPTQ4, windows(), ignore=[r"layers\.0\.mlp\.down_proj$"],
                         overrides=[(r"o_proj", {"bits": 3}), (r"layers\.1\.self_attn\.o_proj", {"bits": 8})],
                         progress=False)
    assert type(model.get_submodule(ignored)) is nn.Linear and ignored not in res.qweights
    assert res.qweights[eight].bits == 8 and int(res.qweights[eight].codes.max()) > 15
    assert res.qweights["model.layers.0.self_attn.o_proj"].bits == 3
    assert res.qweights["model.layers.0.self_attn.q_proj"].bits == 4

    model = build("llama")
    res = quantize_model(model, RTN4, None, include=[r"\.mlp\."], overrides=[(r"up_proj", {"method": "rtn",
                         "format": "mxint"})], progress=False)
    assert set(res.qweights) == {f"model.layers.{i}.mlp.{p}" for i in range(2)
                                 for p in ("gate_proj", "up_proj", "down_proj")}
    assert res.qweights["model.layers.0.mlp.up_proj"].grid.kind == "mxint"
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_selection_errors():
    with pytest.raises(LowbitError, match="override for model.layers.0.self_attn.q_proj"):
        quantize_model(build("llama"), RTN4, None, overrides=[("q_proj", {"bits": 9})], progress=False)
    with pytest.raises(LowbitError, match="no layer to quantize"), pytest.warns(UserWarning):
        quantize_model(build("llama"), RTN4, None, include=["nothing_matches_this"], progress=False)
    with pytest.raises(LowbitError, match="invalid layer pattern"):
        quantize_model(build("llama"), RTN4, None, ignore=["("], progress=False)
    with pytest.warns(UserWarning, match="matched no layer to quantize"):
        quantize_model(build("llama"), RTN4, None, ignore=["typo_proj"], progress=False)
    # switching one layer to a data-driven method makes the whole run need calibration data
    with pytest.raises(LowbitError, match="needs calibration data"):
        quantize_model(build("llama"), RTN4, None, overrides=[("q_proj", {"method": "gptq"})], progress=False)


# ---- resume


def test_resume_is_bit_identical(tmp_path):
    base = build("llama", layers=3)
    calib = windows()
    ref = quantize_model(copy.deepcopy(base), GPTQ4, calib, progress=False)

    def crash(rec):
        if rec.block == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_model(copy.deepcopy(base), GPTQ4, calib, checkpoint_dir=tmp_path, on_layer=crash, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if "inputs" in p.name) == ["inputs-00002.safetensors"]

    with pytest.raises(LowbitError, match="different calibration"):
        quantize_model(copy.deepcopy(base), GPTQ4, windows(seed=9), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(LowbitError, match="different settings"):
        quantize_model(copy.deepcopy(base), GPTQConfig(bits=3, group_size=32), calib, checkpoint_dir=tmp_path,
                       progress=False)

    spent = json.loads((tmp_path / "progress.json").read_text())["seconds"]
    assert spent > 0  # the interrupted run's wall time up to its last saved block
    model = copy.deepcopy(base)
    res = quantize_model(model, GPTQ4, calib, checkpoint_dir=tmp_path, progress=False)
    assert res.resumed_blocks == 2 and res.resumed_seconds == spent
    assert list(res.qweights) == list(ref.qweights)
    assert all(qw_equal(res.qweights[n], ref.qweights[n]) for n in ref.qweights)
    assert [r.name for r in res.records] == [r.name for r in ref.records]
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in ref.qweights)
    # a finished checkpoint resumes to the same result without quantizing anything
    again = quantize_model(copy.deepcopy(base), GPTQ4, calib, checkpoint_dir=tmp_path, progress=False)
    assert again.resumed_blocks == 3 and all(qw_equal(again.qweights[n], ref.qweights[n]) for n in ref.qweights)
    assert again.resumed_seconds > spent  # the whole cost of the result: both earlier runs
    (tmp_path / "progress.json").write_text("{not json")
    with pytest.raises(LowbitError, match="unreadable checkpoint"):
        quantize_model(copy.deepcopy(base), GPTQ4, calib, checkpoint_dir=tmp_path, progress=False)


def test_swap_in_reproduces_the_quantized_model():
    for arch in ("gpt2", "llama"):
        model = build(arch)
        fresh = copy.deepcopy(model)
        res = quantize_model(model, RTN4, None, progress=False)
        swap_in(fresh, res.qweights)
        x = windows(2, seed=5)
        assert torch.equal(logits(model, x), logits(fresh, x))
    with pytest.raises(LowbitError, match="shape"):
        swap_in(build("llama"), {"model.layers.0.mlp.down_proj": res.qweights["model.layers.0.mlp.up_proj"]})


# ---- generic models and bad inputs


def test_generic_fallback_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))
    assert get_adapter(net).name == "generic"
    x = torch.randn(64, 32) @ torch.randn(32, 32)
    ref = net(x).detach()
    res = quantize_model(net, GPTQConfig(bits=4, group_size=-1), x, progress=False)
    assert set(res.qweights) == {"0", "2", "4"} and all(isinstance(net[i], QuantLinear) for i in (0, 2, 4))
    assert ((net(x) - ref).norm() / ref.norm()) < 0.1
    assert all(r.rel_error is not None for r in res.records)
    net2 = nn.Sequential(nn.Linear(32, 16))
    quantize_model(net2, RTNConfig(bits=4, group_size=-1), None, progress=True)  # rich bars: must not fail
    assert isinstance(net2[0], QuantLinear)


def test_unlisted_hf_architecture_found_from_its_module_tree():
    """GPT-NeoX has no hand-written adapter: its blocks and its true-sequential groups are found anyway."""
    torch.manual_seed(0)
    m = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=V)).eval()
    adapter = get_adapter(m)
    assert adapter.name == "gpt_neox" and adapter.blocks_path == "gpt_neox.layers"
    calib, expected = windows(), block_linears(m)
    ref = logits(m, calib[:4])
    res = quantize_model(m, GPTQ4, calib, progress=False)
    assert set(res.qweights) == expected and len(expected) == 8
    assert not isinstance(m.get_output_embeddings(), QuantLinear)
    assert ((logits(m, calib[:4]) - ref).norm() / ref.norm()) < 0.2


def test_bad_inputs():
    with pytest.raises(LowbitError, match="unsupported architecture"):
        quantize_model(nn.Sequential(nn.Embedding(10, 4), nn.ReLU()), RTN4, None, progress=False)
    for calib in (None, torch.empty(0, 32, dtype=torch.long)):
        with pytest.raises(LowbitError, match="gptq needs calibration data"):
            quantize_model(build("llama"), GPTQ4, calib, progress=False)
    with pytest.raises(LowbitError, match=r"token ids must lie in \[0, 128\)"):
        quantize_model(build("llama"), GPTQ4, windows() + V, progress=False)
    model = build("opt")
    with torch.no_grad():
        model.model.decoder.layers[1].fc2.weight[0, 0] = float("nan")
    with pytest.raises(LowbitError, match=r"model\.decoder\.layers\.1\.fc2: .*NaN"):
        quantize_model(model, RTN4, None, progress=False)


def test_bf16_model_is_calibrated_in_float32():
    model = build("qwen2").to(torch.bfloat16)
    calib = windows()
    res = quantize_model(model, GPTQ4, calib, progress=False)
    assert all(qw.dtype == torch.bfloat16 for qw in res.qweights.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.isfinite(logits(model, calib[:2])).all()
    assert all(r.rel_error < 0.2 for r in res.records)


# ---- registry


def test_method_registry():
    assert parse_method_config({"method": "gptq", "bits": 3}) == GPTQConfig(bits=3)
    assert isinstance(parse_method_config({"method": "rtn", "format": "mxint"}), RTNConfig)
    for bad in ({"bits": 4}, {"method": "no-such-method"}, {"method": "rtn", "bits": 9}, {"method": "rtn", "nope": 1}):
        with pytest.raises(LowbitError, match="invalid quantization config"):
            parse_method_config(bad)
    assert needs_calibration(GPTQ4) and not needs_calibration(RTN4)
    W = torch.randn(16, 64)
    assert quantize_weight(W, None, RTN4).bits == 4
    with pytest.raises(LowbitError, match="calibration"):
        quantize_weight(W, None, GPTQ4)
