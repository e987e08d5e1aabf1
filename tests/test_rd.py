"""Known answers of the rate–distortion reference (`lowbit.eval.rate_distortion`, used by bench/rd.py)."""

import math

import pytest
import torch

from lowbit.eval import rate_distortion as rd
from lowbit.formats.codebook import encode_codebook
from lowbit.methods import LayerStats, parse_method_config, quantize_weight
from lowbit.methods.kmeans import kmeans_1d, nearest


def test_bound_gap_sqnr_hand_case():
    # σ² = 4 at R = 2 bits: D* = 4 / 16 = 0.25; a quantizer at D = 0.5 is 3.0103 dB above it, SQNR 10·log10 8.
    assert rd.gaussian_rd_bound(4.0, 2.0) == 0.25
    assert rd.gap_db(0.5, 4.0, 2.0) == pytest.approx(10 * math.log10(2), abs=1e-12)
    assert rd.sqnr_db(0.5, 4.0) == pytest.approx(9.030899869919435, abs=1e-12)
    # gap = 6.02·R − SQNR: the two views agree
    assert rd.gap_db(0.013, 2.5, 3.3) == pytest.approx(rd.DB_PER_BIT * 3.3 - rd.sqnr_db(0.013, 2.5), abs=1e-12)
    assert rd.PANTER_DITE_GAP_DB == pytest.approx(4.3468, abs=1e-4)  # 10·log10(2.7207)
    assert rd.ENTROPY_CODED_GAP_DB == pytest.approx(1.5329, abs=1e-4)  # 10·log10(1.4233)
    with pytest.raises(ValueError):
        rd.gaussian_rd_bound(1.0, -1.0)


def test_rd_point_and_aggregate_hand_case():
    W = torch.tensor([[1.0, -1.0], [1.0, -1.0]])  # mean 0, σ² = 1
    p = rd.rd_point(W, W + 0.5, rate=1.0)  # every error 0.5: MSE 0.25 = σ²·2^(−2): gap exactly 0 dB at R = 1
    assert (p["mse"], p["variance"], p["d_star"], p["n"]) == (0.25, 1.0, 0.25, 4)
    assert p["gap_db"] == pytest.approx(0.0, abs=1e-12) and p["sqnr_db"] == pytest.approx(6.0206, abs=1e-4)
    # two layers: n 4 and 12, σ² 1 and 3, R 1 and 2, SSE 1 and 3 → D = 4/16, σ² = 40/16, D* = (1 + 12·3/16)/16
    q = dict(n=12, sse=3.0, variance=3.0, rate=2.0, d_star=3.0 / 16)
    agg = rd.aggregate([p, q])
    assert agg["mse"] == 0.25 and agg["variance"] == 2.5 and agg["rate"] == 1.75
    assert agg["d_star"] == pytest.approx((4 * 0.25 + 12 * 3 / 16) / 16)
    assert agg["gap_db"] == pytest.approx(10 * math.log10(0.25 / agg["d_star"]))


def test_lloyd_max_table_reproduced_from_the_density():
    # Lloyd's iteration on the N(0,1) density (no sampling) reproduces Max's table to its printed digits.
    for b, mse in rd.LLOYD_MAX_MSE.items():
        levels, m = rd.lloyd_max_gaussian(b)
        assert m == pytest.approx(mse, rel=6e-4)
        assert torch.allclose(torch.from_numpy(levels), -torch.from_numpy(levels[::-1].copy()), atol=1e-9)
    assert rd.lloyd_max_gaussian(1)[0][1] == pytest.approx(math.sqrt(2 / math.pi), rel=1e-9)  # E|x|


def test_kmeans_reaches_lloyd_max_on_a_large_gaussian_sample():
    # 10^6 samples: the sample MSE of a fixed quantizer is within ~0.3% of its expectation (seen: ±0.9% at
    # 2·10^5 across seeds), so 1% tests the k-means, not the sample.
    x = torch.randn(1, 1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    for b, ref in rd.LLOYD_MAX_MSE.items():
        r = kmeans_1d(x, 2**b, max_iter=2000, tol=0)
        mse = float((x.double() - r.centroids.double().gather(1, r.codes)).square().mean())
        assert mse == pytest.approx(ref, rel=0.01), (b, mse)
        # paired: on this very sample, k-means is no worse than the Lloyd–Max levels of the density
        lm = torch.from_numpy(rd.lloyd_max_gaussian(b)[0]).float()[None]
        mse_lm = float((x.double() - lm.double().gather(1, nearest(x, lm))).square().mean())
        assert mse <= mse_lm * (1 + 1e-6), (b, mse, mse_lm)


def test_minmax_uniform_rtn_is_worse_than_lloyd_max():
    # A fixed 2^b-level quantizer cannot beat Lloyd–Max on its source; per-channel min-max RTN (one range per
    # 4096 Gaussians: essentially fixed) wastes levels on the tails. Its gap also exceeds Lloyd–Max's.
    W = torch.randn(32, 4096, generator=torch.Generator().manual_seed(1))
    for b in (2, 3, 4):
        p, qw = rd.quantize_point(W, {"method": "rtn", "bits": b, "group_size": -1})
        assert p["mse_rel"] > 1.2 * rd.LLOYD_MAX_MSE[b], (b, p["mse_rel"])
        assert p["gap_db"] > 10 * math.log10(rd.LLOYD_MAX_MSE[b] * 4**b)


@pytest.mark.parametrize("label", list(rd.families(rd.hqq_registered())))
def test_more_bits_never_raise_the_mse_and_no_family_beats_the_bound(label):
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    f = rd.families(rd.hqq_registered())[label]
    pts = [rd.quantize_point(W, f(b))[0] for b in (2, 3, 4)]
    mses, rates = [p["mse"] for p in pts], [p["rate"] for p in pts]
    assert mses[0] > mses[1] > mses[2], mses
    assert rates[0] < rates[1] < rates[2], rates
    # Shannon's bound holds for an i.i.d. Gaussian source: every measured gap is positive (by ≥ 1 dB here).
    assert all(p["gap_db"] > 1.0 for p in pts), [p["gap_db"] for p in pts]


def test_gptq_with_identity_hessian_is_rtn():
    W = torch.randn(48, 256, generator=torch.Generator().manual_seed(3))
    H = LayerStats(hessian=torch.eye(256))
    for b in (2, 3, 4):
        g = quantize_weight(W, H, parse_method_config({"method": "gptq", "bits": b, "group_size": 128}))
        r = quantize_weight(W, None, parse_method_config({"method": "rtn", "bits": b, "group_size": 128}))
        assert torch.equal(g.dequantize(), r.dequantize())


@pytest.mark.parametrize("fit", ["block", "column"])
def test_claq_with_identity_hessian_is_per_column_kmeans(fit):
    # The bench's "k-means/column" rows: CLAQ with H = I has no error feedback, so Ŵ is one independent
    # k-means codebook (fp16 LUT) per input column.
    W = torch.randn(128, 64, generator=torch.Generator().manual_seed(4))
    b = 3
    cfg = {"method": "claq", "bits": b, "codebook_bits": 16, "fit": fit}
    _, qw = rd.quantize_point(W, cfg)
    lut = encode_codebook(kmeans_1d(W.T.contiguous(), 2**b).centroids, 16)[0].float()  # [in, K]
    ref = lut.gather(1, nearest(W.T.contiguous(), lut)).T
    assert torch.equal(qw.dequantize(), ref)
