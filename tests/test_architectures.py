"""Every common decoder architecture, found from its module tree: tiny random models built from
transformers configs, quantize → save → load → eval, with the true-sequential groups read off the
dataflow and mixture-of-experts layers quantized one expert at a time."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.native import load_quantized, save_quantized
from lowbit.methods import GPTQConfig, RTNConfig, StatsAccumulator, quantize_weight
from lowbit.models.adapters import get_adapter
from lowbit.models.experts import ExpertList, unfuse, unfuse_experts
from lowbit.nn.quant_linear import QuantLinear
from lowbit.pipeline import calibrate
from lowbit.pipeline.calibrate import quantize_model

V = 128
DENSE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=V, max_position_embeddings=64)
MOE = dict(DENSE, num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=48, decoder_sparse_step=1, mlp_only_layers=[])

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", DENSE),
    "mistral": ("MistralConfig", "MistralForCausalLM", DENSE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DENSE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", DENSE),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", DENSE),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(DENSE, sliding_window=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(DENSE, pad_token_id=0)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                                num_attention_heads=4, vocab_size=V, max_position_embeddings=64,
                                                word_embed_proj_dim=64)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=V, n_positions=64)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", MOE),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", MOE),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", MOE),
}

# what the dataflow trace must find (block-relative; experts by role)
GROUPS = {
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "phi3": [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]],
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    "opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    "mixtral": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                [f"mlp.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj")],
                [f"mlp.experts.{e}.down_proj" for e in range(4)]],
}


def build(arch: str) -> nn.Module:
    cfg_cls, model_cls, kw = ARCHS[arch]
    torch.manual_seed(0)
    model = getattr(T, model_cls)(getattr(T, cfg_cls)(**kw)).eval()
    with torch.no_grad():  # some inits leave zero or tiny weights (Gemma norms, OPT biases): make them real
        for p in model.parameters():
            if p.ndim >= 2 and float(p.abs().max()) == 0:
                p.normal_(0, 0.02)
    return model


def windows(n: int = 16, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, V, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits.float()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantize_save_load_eval(arch, tmp_path):
    model = build(arch)
    test = windows(4, seed=2)
    ref = logits(model, test)
    adapter = get_adapter(model)
    res = quantize_model(model, GPTQConfig(bits=4, group_size=32), windows(), progress=False)
    assert adapter.name == model.config.model_type and adapter.blocks_path is not None
    assert not isinstance(model.get_output_embeddings(), QuantLinear)
    floats = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n]
    if adapter.n_experts:  # only routers stay in full precision (Qwen2-MoE's shared_expert_gate)
        assert all(m.out_features in (1, 4) for n, m in model.named_modules() if n in floats)
        assert all(isinstance(m, ExpertList) for n, m in model.named_modules() if n.endswith("mlp.experts"))
    else:
        assert floats == [] or arch == "opt" and all("project" in n for n in floats)
    after = logits(model, test)
    assert torch.isfinite(after).all()
    assert (after - ref).norm() / ref.norm() < 0.25, "4-bit GPTQ keeps the function"
    save_quantized(model, res.qweights, tmp_path / "q", recipe={"quant": {"method": "gptq"}})
    loaded, qweights, _ = load_quantized(tmp_path / "q")
    assert qweights.keys() == res.qweights.keys()
    torch.testing.assert_close(logits(loaded, test), after, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", list(GROUPS))
def test_true_sequential_groups_read_off_the_dataflow(arch, monkeypatch):
    seen = []
    real = calibrate.sequential_groups

    def spy(block, prefix, names, run):
        out = real(block, prefix, names, run)
        seen.append([[n[len(prefix) + 1:] for n in g] for g in out])
        return out

    monkeypatch.setattr(calibrate, "sequential_groups", spy)
    quantize_model(build(arch), GPTQConfig(bits=4, group_size=32), windows(), progress=False)
    # order inside a group is module order (OPT defines k, v, q): it changes nothing, the group is one input
    assert [[sorted(g) for g in gs] for gs in seen] == [[sorted(g) for g in GROUPS[arch]]], \
        "traced once: both blocks have one structure"


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_unfused_experts_compute_what_the_fused_module_computes(arch):
    model = build(arch)
    moe = model.model.layers[0].mlp
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, weights, index = moe.gate(x)
        fused = moe.experts(x, index, weights)
        unfused = unfuse(moe.experts)(x, index, weights)
    # the same products summed in the same order; a fused kernel may block the matmul differently
    torch.testing.assert_close(unfused, fused, rtol=1e-6, atol=1e-7)
    experts = unfuse(moe.experts)
    inter = {"mixtral": 96, "qwen2_moe": 32}[arch]  # Mixtral's experts use intermediate_size
    assert [tuple(e.gate_proj.weight.shape) for e in experts] == [(inter, 64)] * 4
    torch.testing.assert_close(torch.cat([experts[2].gate_proj.weight, experts[2].up_proj.weight]),
                               moe.experts.gate_up_proj[2], rtol=0, atol=0)


def test_each_expert_gets_the_hessian_of_its_routed_tokens(monkeypatch):
    """Every token reaches exactly top-k experts, so the token counts behind the experts' statistics sum
    to k × tokens; expert e's Hessian is that of the tokens the router sends to it (checked on block 0,
    whose MoE input is computed here independently from the quantized attention)."""
    model = build("mixtral")
    calib = windows()
    fp = copy.deepcopy(model)
    hess = {}
    real = calibrate.quantize_weight

    def spy(W, stats, config, **kw):
        hess[len(hess)] = None if stats is None else (stats.hessian.clone(), stats.nsamples)
        return real(W, stats, config, **kw)

    monkeypatch.setattr(calibrate, "quantize_weight", spy)
    res = quantize_model(model, GPTQConfig(bits=4, group_size=32), calib, progress=False, batch_size=8)
    names = [r.name for r in res.records]
    n_tokens = calib.numel()
    for b in range(2):
        counts = [r.nsamples for r in res.records if r.name.startswith(f"model.layers.{b}.mlp.experts")
                  and r.name.endswith("gate_proj")]
        assert len(counts) == 4 and sum(counts) == 2 * n_tokens
    # independent: block 0's MoE input with block 0's attention quantized (swap those layers into the fp copy)
    from lowbit.models.swap import swap_in

    swap_in(fp, {n: q for n, q in res.qweights.items() if n.startswith("model.layers.0.self_attn")})
    unfuse_experts(fp)
    moe = fp.model.layers[0].mlp
    inputs = []
    h = moe.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, 64)))
    for i in range(0, 16, 8):
        logits(fp, calib[i:i + 8])
    h.remove()
    x = torch.cat(inputs)
    _, _, index = moe.gate(x)
    for e in range(4):
        acc = StatsAccumulator(64)
        acc.add(x[(index == e).any(-1)])
        H, n = hess[names.index(f"model.layers.0.mlp.experts.{e}.gate_proj")]
        assert n == acc.result().nsamples
        torch.testing.assert_close(H, acc.result().hessian, rtol=1e-4, atol=1e-6)


def test_rarely_routed_expert_falls_back_to_rtn(monkeypatch):
    monkeypatch.setattr(calibrate, "MIN_EXPERT_TOKENS", 260)  # about half the experts see fewer
    model = build("mixtral")
    weights = {n: m.weight.detach().clone() for n, m in (unfuse_experts(model) and model.named_modules())
               if isinstance(m, nn.Linear)}
    res = quantize_model(model, GPTQConfig(bits=3, group_size=32), windows(), progress=False)
    experts = [r for r in res.records if ".experts." in r.name]
    low = [r for r in experts if r.nsamples < 260]
    assert low and len(low) < len(experts)
    for r in experts:
        if r.nsamples < 260:
            assert r.method == "rtn" and "RTN" in r.note
            expect = quantize_weight(weights[r.name].float(), None, RTNConfig(bits=3, group_size=32))
            assert torch.equal(res.qweights[r.name].dequantize(), expect.dequantize())
        else:
            assert r.method == "gptq" and r.note is None


def test_unsupported_fused_layout_and_missing_experts_are_refused():
    model = build("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts.has_bias = True
    with pytest.raises(LowbitError, match="has_bias=True"):
        unfuse(experts, "model.layers.0.mlp.experts")
    with pytest.raises(LowbitError, match="no fused experts module"):
        unfuse_experts(build("llama"), ["model.layers.0.mlp.experts"])
