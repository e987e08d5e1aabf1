"""Perplexity (GPTQ protocol) and KL divergence against naive float64 references; result tables."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.errors import LowbitError
from lowbit.eval.kl import kl_divergence
from lowbit.eval.perplexity import perplexity
from lowbit.eval.report import layer_error_report, results_table, write_results

VOCAB = 80



class UniformLM(nn.Module):
    """Predicts the uniform distribution everywhere: perplexity must be exactly the vocabulary size."""

    def forward(self, input_ids, **kw):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(1))


def log_probs64(model, window: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=window[None]).logits[0].double(), dim=-1)


def perturbed(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return other


# ---------------------------------------------------------------------------------------- perplexity

def test_uniform_model_perplexity_is_vocab_size(windows):
    r = perplexity(UniformLM(), windows, batch_size=2)
    assert r.ppl == pytest.approx(VOCAB, rel=1e-4)
    assert (r.n_windows, r.seqlen, r.n_tokens) == (5, 16, 5 * 15)


def test_perplexity_matches_naive_float64(llama, windows):
    # Naive GPTQ-protocol loop: per window, mean NLL of the seqlen−1 next-token predictions.
    nlls = []
    for w in windows:
        lp = log_probs64(llama, w)
        nlls.append(-lp[:-1].gather(1, w[1:, None]).mean())
    expected = math.exp(float(torch.stack(nlls).mean()))
    r = perplexity(llama, windows, batch_size=3)  # 3 does not divide 5: a short last batch
    assert r.ppl == pytest.approx(expected, rel=1e-5)
    assert r.nll_mean == pytest.approx(math.log(expected), rel=1e-5)
    assert llama.training is False


def test_perplexity_rejects_bad_windows(llama):
    with pytest.raises(LowbitError):
        perplexity(llama, torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(LowbitError):
        perplexity(llama, torch.zeros(16, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ KL

def test_kl_with_itself_is_zero(llama, windows):
    r = kl_divergence(llama, llama, windows, batch_size=2)
    assert 0 <= r.kl_mean < 1e-6 and r.kl_max < 1e-6
    assert r.top1_agreement == 1.0 and r.n_tokens == windows.numel()


def test_kl_matches_naive_float64(llama, windows):
    other = perturbed(llama)
    per_token, agree = [], []
    for w in windows:
        lp, lq = log_probs64(llama, w), log_probs64(other, w)  # KL(base ‖ model), base = llama
        per_token.append((lp.exp() * (lp - lq)).sum(-1))
        agree.append(lp.argmax(-1) == lq.argmax(-1))
    kl = torch.cat(per_token)
    r = kl_divergence(other, llama, windows, batch_size=3)
    assert r.kl_mean > 1e-4
    assert r.kl_mean == pytest.approx(float(kl.mean()), rel=1e-4)
    assert r.kl_max == pytest.approx(float(kl.max()), rel=1e-4)
    assert 0 <= r.kl_median <= r.kl_p95 <= r.kl_max
    assert r.top1_agreement == pytest.approx(float(torch.cat(agree).double().mean()))
    assert float(kl.min()) >= 0  # the reference agrees KL is nonnegative at every position
    reverse = kl_divergence(llama, other, windows)
    assert reverse.kl_mean > 0 and reverse.kl_mean != pytest.approx(r.kl_mean, rel=1e-6)  # asymmetric


class SmallVocabLM(nn.Module):
    def forward(self, input_ids, **kw):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB - 1))


def test_kl_rejects_different_vocabularies(llama, windows):
    with pytest.raises(LowbitError, match="vocabularies"):
        kl_divergence(llama, SmallVocabLM(), windows)


# --------------------------------------------------------------------------------------------- report

def test_reports(tmp_path):
    records = [{"name": "model.layers.0.mlp.up_proj", "shape": [64, 32], "bits_per_weight": 4.25,
                "rel_output_error": 0.01234, "seconds": 0.5},
               SimpleNamespace(as_dict=lambda: {"name": "lm_head", "shape": (80, 32), "bpw": 3.0})]
    md = layer_error_report(records)
    lines = md.strip().splitlines()
    assert len(lines) == 4 and "64×32" in lines[2] and "4.2500" in lines[2] and "—" in lines[3]

    rows = [{"model": "tiny|rtn", "ppl": 12.3456, "kl": 1.5e-5}, {"model": "base", "ppl": 11.0}]
    md, table = results_table(rows, ["model", "ppl", "kl"])
    assert "tiny\\|rtn" in md and "1.500e-05" in md and table.row_count == 2
    jp, mp = write_results(rows, tmp_path / "res", "summary", note="WikiText-2, seqlen 16")
    assert json.loads(jp.read_text()) == {"rows": rows, "note": "WikiText-2, seqlen 16", "provenance": None}
    assert mp.read_text() == results_table(rows)[0] + "\nWikiText-2, seqlen 16\n"
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["summary.json", "summary.md"]
