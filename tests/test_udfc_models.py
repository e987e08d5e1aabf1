"""UDFC on models: CNN chains (residuals skipped, exact merge of a duplicated channel, smaller layers),
the HF MLP path (pruned checkpoint loads with transformers, shapes and config right, quantized output in
the native format), the CLI's bad inputs, determinism."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.errors import LowbitError
from lowbit.prune.cnn import find_chains, prune_cnn
from lowbit.prune.config import PruneConfig
from helpers import assert_clean_error

runner = CliRunner()


class Block(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, h, 3, padding=1, bias=False), nn.BatchNorm2d(h)
        self.conv2, self.bn2 = nn.Conv2d(h, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.c2, self.bn2 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.block = Block(6, 10)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.act(self.bn2(self.c2(self.act(self.bn(self.stem(x))))))
        return self.fc(self.block(x).mean((2, 3)))


def _net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return net.eval()


def test_chains_skip_residual_channels_explicitly():
    chains, skipped = find_chains(_net())
    assert [(c.layer, c.bn, c.next) for c in chains] == [("stem", "bn", "c2"), ("block.conv1", "block.bn1", "block.conv2")]
    assert set(skipped) == {"c2", "block.conv2", "fc"}
    assert "residual" in skipped["block.conv2"]


def test_cnn_duplicate_channel_is_compensated_exactly():
    """Channel 5 of the stem duplicates channel 2 (w₅ = ½w₂ with BN stats scaled to match, so a₅ = a₂):
    pruning it with merge or UDFC leaves the network function unchanged; without compensation it changes."""
    net = _net(1)
    with torch.no_grad():
        net.stem.weight[5] = 0.5 * net.stem.weight[2]
        net.stem.bias[5] = 0.5 * net.stem.bias[2]
        net.bn.running_mean[5] = 0.5 * net.bn.running_mean[2]
        net.bn.running_var[5] = 0.25 * net.bn.running_var[2]
        net.bn.weight[5], net.bn.bias[5] = net.bn.weight[2], net.bn.bias[2]
        net.bn.eps = 1e-12
        for i in range(8):  # every other filter is larger than channel 5: the L2 criterion picks it
            if i != 5 and net.stem.weight[i].norm() < net.stem.weight[2].norm():
                net.stem.weight[i] *= 1.5 * net.stem.weight[2].norm() / net.stem.weight[i].norm()
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(0))

    def next_layer_output(m):  # c2's output; the block's own pruned channel changes the rest
        with torch.no_grad():
            return m.c2(m.act(m.bn(m.stem(x))))

    ref = next_layer_output(net)
    errs = {}
    for c in ("none", "merge", "udfc"):
        pruned, rep = prune_cnn(net, PruneConfig(ratio=0.125, compensation=c, criterion="l2", damp=1e-12))
        assert rep["layers"][0]["pruned"] == [5] and pruned.stem.out_channels == 7 and pruned.c2.in_channels == 7
        errs[c] = float((next_layer_output(pruned) - ref).norm() / ref.norm())
    assert errs["merge"] < 1e-5 and errs["udfc"] < 1e-5 and errs["none"] > 1e-2, errs


def test_cnn_pruned_smaller_quantized_input_untouched_deterministic():
    net = _net(2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = PruneConfig(ratio=0.5, bits=4, compensation="udfc", criterion="recon")
    p1, rep = prune_cnn(net, cfg)
    p2, _ = prune_cnn(net, cfg)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(p1.state_dict().values(), p2.state_dict().values()))
    assert p1.stem.out_channels == 4 and p1.bn.num_features == 4 and p1.c2.in_channels == 4
    assert p1.block.conv1.out_channels == 5 and p1.block.conv2.in_channels == 5
    assert rep["parameters"] < sum(p.numel() for p in net.parameters())
    assert p1(torch.randn(2, 3, 5, 5)).shape == (2, 4)
    for lay in rep["layers"]:  # the closed form never does worse than no compensation (same proxy)
        assert lay["proxy_rel_error"] <= lay["proxy_rel_error_none"] + 1e-12
    # every conv/linear holds 4-bit per-channel symmetric values: ≤ 2^4 distinct levels per row
    for m in p1.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert max(len(torch.unique(r)) for r in m.weight.reshape(m.weight.shape[0], -1)) <= 16
    g, _ = prune_cnn(net, cfg.model_copy(update={"scope": "global", "bits": None}))
    assert g.stem.out_channels + g.block.conv1.out_channels == 18 - 9


def test_cnn_bad_inputs():
    net = _net(3)
    unchecked = PruneConfig.model_construct(**{**PruneConfig().model_dump(), "ratio": 1.0})  # bypasses pydantic
    with pytest.raises(LowbitError, match="out of range"):
        prune_cnn(net, unchecked)
    bad = _net(3)
    with torch.no_grad():
        bad.stem.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(LowbitError, match="NaN"):
        prune_cnn(bad, PruneConfig())
    with pytest.raises(LowbitError, match="unsupported architecture"):
        prune_cnn(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), PruneConfig())


# ---------------------------------------------------------------------------------------------- HF


def run(*args):
    return runner.invoke(app, [str(a) for a in args])




def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_hf_prune_saves_loadable_checkpoint(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    res = run("prune", tiny_model_dir, "-o", out, "--ratio", "0.3", "--mc-samples", "2048")
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 128 - 38
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (90, 64) and layer.mlp.up_proj.weight.shape == (90, 64)
        assert layer.mlp.down_proj.weight.shape == (64, 90)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["intermediate_size"] == [128, 90] and len(rep["layers"]) == 2
    assert all(len(lay["pruned"]) == 38 for lay in rep["layers"])
    # the saved model computes what the in-memory pruned model computes
    from lowbit.io.native import load_model
    from lowbit.prune.hf import prune_hf

    base, _ = load_model(tiny_model_dir)
    mem, _, _ = prune_hf(base, PruneConfig(ratio=0.3, mc_samples=2048))
    ids = torch.arange(40).reshape(2, 20)
    assert torch.allclose(_logits(model, ids), _logits(mem, ids), atol=1e-5)


def test_hf_compensation_helps_and_is_deterministic(tiny_model_dir):
    """On held-out text (not used by the data-free run), UDFC's logits are closer to the unpruned model's
    than plain pruning's; data-light (calibration windows from other text) too. Same seed, same bits."""
    from lowbit import data
    from lowbit.io.native import load_model
    from lowbit.prune.hf import prune_hf

    base, tok = load_model(tiny_model_dir)
    text = data.corpus_text(data.TINYSHAKESPEARE)
    ids = data.eval_windows(tok, text[-20000:], 64, 8)
    calib = data.calibration_windows(tok, [text[:100000]], 16, 64, 0)
    ref = _logits(base, ids)
    err = {}
    for name, cfg in {"none": PruneConfig(ratio=0.3, compensation="none"),
                      "udfc": PruneConfig(ratio=0.3, mc_samples=4096),
                      "light": PruneConfig(ratio=0.3, data_light=True)}.items():
        m, rep, _ = prune_hf(base, cfg, calib if cfg.data_light else None)
        err[name] = float((_logits(m, ids) - ref).pow(2).mean())
    assert err["udfc"] < 0.7 * err["none"] and err["light"] < 0.7 * err["none"], err
    m1, _, _ = prune_hf(base, PruneConfig(ratio=0.2, mc_samples=1024, bits=6))
    m2, _, _ = prune_hf(base, PruneConfig(ratio=0.2, mc_samples=1024, bits=6))
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_hf_prune_with_bits_is_native_and_loads(tiny_model_dir, tmp_path):
    from lowbit.io.native import load_model
    from lowbit.nn.quant_linear import QuantLinear

    out = tmp_path / "pq"
    res = run("prune", tiny_model_dir, "-o", out, "--ratio", "0.25", "--bits", "4", "--mc-samples", "1024",
              "--criterion", "recon")
    assert res.exit_code == 0, res.output
    model, _ = load_model(out)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.down_proj, QuantLinear) and mlp.down_proj.in_features == 96
    info = json.loads((out / "lowbit.json").read_text())
    bpw = info["prune"]["bits_per_weight_mlp"]
    assert 4.0 < bpw < 4.5  # 4-bit codes + one fp16 scale per output channel
    assert model(input_ids=torch.arange(10)[None]).logits.isfinite().all()


def test_hf_bad_inputs(tiny_model_dir, tmp_path):
    assert_clean_error(run("prune", tiny_model_dir, "-o", tmp_path / "a", "--ratio", "1.0"), "ratio")
    assert_clean_error(run("prune", tiny_model_dir, "-o", tmp_path / "a", "--ratio", "-0.1"), "ratio")
    assert_clean_error(run("prune", tiny_model_dir, "-o", tmp_path / "a", "--bits", "1"), "bit width")
    assert_clean_error(run("prune", tiny_model_dir, "-o", tmp_path / "a", "--compensation", "magic"), "compensation")
    assert_clean_error(run("prune", tmp_path / "missing", "-o", tmp_path / "a"), "does not exist")
    # NaN weight: refused, nothing written
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    t = load_file(bad / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    assert_clean_error(run("prune", bad, "-o", tmp_path / "b"), "NaN")
    assert not (tmp_path / "b").exists()
    # an architecture without a LLaMA-style MLP
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(gpt)
    assert_clean_error(run("prune", gpt, "-o", tmp_path / "c"), "unsupported architecture")
    # existing output kept without --overwrite
    (tmp_path / "d").mkdir()
    assert_clean_error(run("prune", tiny_model_dir, "-o", tmp_path / "d"), "exists")
    from lowbit.io.native import load_model
    from lowbit.prune.hf import prune_hf

    with pytest.raises(LowbitError, match="intermediate size"):
        prune_hf(load_model(tiny_model_dir)[0], PruneConfig(scope="global"))
