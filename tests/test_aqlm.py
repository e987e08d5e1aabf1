"""AQLM (`methods.aqlm`, `formats.additive`): each step against an independent reference — the beam search
against brute force over every code combination, the codebook update against a dense float64 least-squares
solve — plus the monotone objective, exact storage round trips and honest bits."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats.additive import AdditiveGrid, additive_vectors
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.methods import LayerStats, parse_method_config, quantize_weight
from lowbit.methods import aqlm as A


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
    return 2 * X.T @ X / (4 * n)


def _cfg(**kw):
    return parse_method_config({"method": "aqlm", "num_codebooks": 2, "nbits_per_codebook": 4, "in_group_size": 4,
                                "rounds": 3, **kw})


def test_beam_search_with_a_full_beam_is_brute_force():
    """One vector position (cols = g): a beam as wide as all K^M combinations must find the combination
    minimising the layer objective exactly."""
    g, M, K, rows = 3, 2, 4, 6
    gen = torch.Generator().manual_seed(0)
    H = _spd(g, 1)
    C = torch.randn(M, K, g, generator=gen)
    V = torch.randn(rows, g, generator=gen)
    codes = torch.randint(0, K, (rows, 1, M), generator=gen)
    U = additive_vectors(C, codes)
    U, codes = A._beam_search(V, U.clone(), codes.clone(), C, H, beam_size=K**M, row_chunk=4)
    for r in range(rows):
        def err(b, r=r):
            e = V[r] - sum(C[m, b[m]] for m in range(M))
            return float(e @ H @ e)

        best = min(itertools.product(range(K), repeat=M), key=err)
        got = tuple(int(c) for c in codes[r, 0])
        assert abs(err(got) - err(best)) <= 1e-5 * max(1.0, err(best)), (r, got, best)
        assert torch.allclose(U[r, 0], sum(C[m, codes[r, 0, m]] for m in range(M)), atol=1e-5)


def test_codebook_update_is_the_least_squares_solution():
    """CG on the normal equations reaches the dense float64 least-squares optimum of the codewords."""
    rows, cols, M, K, g = 12, 8, 2, 3, 2
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(rows, cols, generator=gen)
    H = _spd(cols, 3)
    s = torch.rand(rows, generator=gen) + 0.5
    codes = torch.randint(0, K, (rows, cols // g, M), generator=gen)
    C = A._update_codebooks(W @ H, s, codes, torch.zeros(M, K, g), H, iters=200)
    # Ŵ = diag(s)·D·c with D the 0/1 design matrix of the codes, c the codewords flattened [M·K·g]
    D = torch.zeros(rows * cols, M * K * g, dtype=torch.float64)
    for r, j, m in itertools.product(range(rows), range(cols // g), range(M)):
        for e in range(g):
            D[r * cols + j * g + e, (m * K + codes[r, j, m]) * g + e] = s[r]
    L = torch.linalg.cholesky(torch.kron(torch.eye(rows, dtype=torch.float64), H.double()))
    # ‖(W − Ŵ)‖²_H per row = ‖Lᵀ vec(W − Ŵ)‖²
    sol = torch.linalg.lstsq(L.T @ D, L.T @ W.double().reshape(-1, 1)).solution.reshape(M, K, g)
    f = lambda Cb: A.objective(W, s[:, None] * additive_vectors(Cb, codes).reshape(rows, cols), H)  # noqa: E731
    assert f(C) <= f(sol.float()) * (1 + 1e-5)


def test_objective_never_rises_and_beats_scalar_codebooks_at_matched_bits():
    """From the residual k-means init, every round lowers tr((W − Ŵ)H(W − Ŵ)ᵀ) (float64, the damped H it
    minimises); and on a Gaussian layer with H = I the MSE is below per-column k-means (CLAQ, H = I) at no
    more bits per weight."""
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(128, 256, generator=gen) * 0.02
    H = _spd(256, 5)
    qw = quantize_weight(W, LayerStats(hessian=H), _cfg(num_codebooks=2, nbits_per_codebook=6, in_group_size=4))
    h = qw.history
    assert all(b <= a * (1 + 1e-6) for a, b in zip(h, h[1:])) and h[-1] < 0.9 * h[0], h
    W = torch.randn(256, 1024, generator=gen)  # wide enough that the 2x8 codebooks cost ~0.25 bpw
    eye = LayerStats(hessian=torch.eye(1024))
    vq = quantize_weight(W, eye, _cfg(num_codebooks=2, nbits_per_codebook=8, in_group_size=8))  # 2 code bits
    sq = quantize_weight(W, eye, parse_method_config({"method": "claq", "bits": 2, "fit": "block"}))
    assert vq.bits_per_weight() <= sq.bits_per_weight() + 0.05
    mse = lambda q: float((q.dequantize() - W).square().mean())  # noqa: E731
    assert mse(vq) < 0.9 * mse(sq), (mse(vq), mse(sq))


def test_storage_round_trip_and_honest_bits():
    W = torch.randn(40, 64, generator=torch.Generator().manual_seed(6))
    for B in (4, 16):
        if B == 4:
            qw = quantize_weight(W, LayerStats(hessian=torch.eye(64)), _cfg(rounds=1, kmeans_iters=2))
        else:  # 16-bit codes: a hand-made grid (a 65536-word codebook fit is a bench, not a test)
            grid = AdditiveGrid(2, 16, 4, torch.randn(2, 2**16, 4).half(), torch.rand(40).half() + 0.5)
            qw = QuantizedWeight((40, 64), torch.float32, grid, torch.randint(0, 2**16, (40, 16, 2), dtype=torch.int32))
        t, meta = qw.to_state()
        back = QuantizedWeight.from_state(t, json.loads(json.dumps(meta)))
        assert torch.equal(back.dequantize(), qw.dequantize()) and torch.equal(back.codes.long(), qw.codes.long())
        stored = sum(v.numel() * v.element_size() * 8 for v in t.values())
        assert sum(qw.storage().values()) == stored  # every stored bit counted, nothing else
        M, g = 2, 4
        expect = 40 * (64 // g) * M * B + M * 2**B * g * 16 + 40 * 16
        assert qw.bits_per_weight() == pytest.approx(expect / (40 * 64))


def test_bad_input():
    with pytest.raises(LowbitError, match="multiple of the vector length"):
        quantize_weight(torch.randn(8, 30), LayerStats(hessian=torch.eye(30)), _cfg())
    with pytest.raises(LowbitError, match="needs calibration"):
        quantize_weight(torch.randn(8, 32), None, _cfg())
    with pytest.raises(Exception, match="choose 1-8"):
        _cfg(nbits_per_codebook=12)
    bad = torch.randn(8, 32)
    bad[0, 0] = float("nan")
    with pytest.raises(LowbitError):
        quantize_weight(bad, LayerStats(hessian=torch.eye(32)), _cfg())
    qw = quantize_weight(torch.randn(8, 32), LayerStats(hessian=torch.eye(32)), _cfg(rounds=1, kmeans_iters=1))
    t, meta = qw.to_state()
    t["grid.codebooks"] = t["grid.codebooks"][:, :3]
    with pytest.raises(LowbitError, match="corrupt"):
        QuantizedWeight.from_state(t, meta)


def test_cli_quantizes_saves_and_evaluates_the_toy_model(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app
    from lowbit.io.native import load_quantized

    r = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "q"), "--method", "aqlm",
                                 "--aqlm-codebooks", "2x4", "--aqlm-group", "4", "--calib-samples", "4",
                                 "--calib-seqlen", "64", "--quiet"])
    assert r.exit_code == 0, r.output
    model, qweights, _ = load_quantized(tmp_path / "q")
    assert qweights and all(q.grid.kind == "additive" and q.grid.num_codebooks == 2 for q in qweights.values())
    bpw = sum(sum(q.storage().values()) for q in qweights.values()) / sum(q.shape[0] * q.shape[1] for q in qweights.values())
    assert 2.0 < bpw < 3.5  # 2 code bits + codebooks and scales of these small layers
    ids = torch.randint(0, 512, (1, 16))
    assert torch.isfinite(model(ids).logits).all()


def test_block_finetuning_keeps_codes_lowers_every_block_loss_and_stores_the_trained_layer():
    import copy

    from lowbit.pipeline.calibrate import quantize_model
    from lowbit.pipeline.reconstruct import AdditiveLinear
    from test_pipeline import build, windows

    base = build("llama", layers=2)
    calib = windows(n=8)
    cfg = {"method": "aqlm", "num_codebooks": 1, "nbits_per_codebook": 4, "in_group_size": 8, "rounds": 1,
           "beam_size": 2, "kmeans_iters": 4, "cg_iters": 5}
    plain = quantize_model(copy.deepcopy(base), parse_method_config(cfg), calib, progress=False, batch_size=2)
    tuned = quantize_model(copy.deepcopy(base), parse_method_config({**cfg, "finetune_steps": 30, "finetune_lr": 1e-2}),
                           calib, progress=False, batch_size=2)
    for n, qw in plain.qweights.items():
        if ".layers.0." in n:  # block 0 sees the same inputs in both runs: tuning moved codebooks, never codes
            assert torch.equal(tuned.qweights[n].codes, qw.codes)
            assert not torch.equal(tuned.qweights[n].grid.codebooks, qw.grid.codebooks)
    for rec in tuned.records:
        start, end = (float(x) for x in rec.note.split("loss ")[1].split(" after")[0].split(" -> "))
        assert end < start, rec.note
    # the stored layer is the trained one (codebooks and scales rounded to fp16 in the forward too)
    qw = next(iter(tuned.qweights.values()))
    a = AdditiveLinear(qw, None)
    with torch.no_grad():
        a.codebooks.add_(torch.randn(a.codebooks.shape, generator=torch.Generator().manual_seed(0)) * 1e-3)
    assert torch.equal(a.weight().detach(), a.materialize().dequantize())
