"""One pydantic config per method: the same object in Python, in YAML recipes and behind CLI flags."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from lowbit.formats.quant_primitives import SUPPORTED_BITS


def _check_bits(v: int) -> int:
    if v not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {v}: choose one of {SUPPORTED_BITS}")
    return v


def _check_group_size(v: int) -> int:
    if v < -1:
        raise ValueError(f"group size {v} is invalid: use -1 (per channel), 0 (per tensor) or > 0")
    return v


# Validated field types every weight-quantizing config (PTQ and QAT) shares.
Bits = Annotated[int, AfterValidator(_check_bits)]
GroupSize = Annotated[int, AfterValidator(_check_group_size)]  # −1 per channel, 0 per tensor, g > 0


ScaleKind = Literal["none", "act-mean", "act-rms", "exact"]


class LQERConfig(BaseModel):
    """Low-rank reconstruction of the quantization error (LQER / L²QER), applied on top of any base grid."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(32, ge=1)
    scale: ScaleKind = "act-mean"  # none = LQER; act-mean = L²QER; act-rms; exact = R_xx^½ (QERA)
    svd: Literal["auto", "full", "randomized"] = "auto"  # auto: randomized when rank ≪ min(in, out)
    oversample: int = Field(16, ge=0)  # extra random directions of the randomized range finder
    power_iters: int = Field(4, ge=0)  # subspace iterations: the error spectrum decays slowly
    seed: int = 0
    # How A and B are stored (and counted): floats, int8 with a symmetric fp16 scale per row of A (input
    # channel) and per row of B (rank component), or MXINT8 with 8-bit exponents per 16 along each row.
    factor_dtype: Literal["fp16", "bf16", "fp32", "int8", "mxint8"] = "fp16"
    refit: bool = True  # quantized factors: refit B against the stored A (least squares in the scaled norm)
    exact_damp: float = Field(1e-6, ge=0)  # eigenvalue floor of R, relative to its mean, for R^-½
    # Rank choice (at most one): `rank` fixed; `rank_energy` τ: per layer the least k with
    # Σ_{i≤k} σ_i² ≥ τ·‖S·E‖²_F (full SVD); `target_bits`: per layer the largest k whose bits per weight,
    # factors included, stay ≤ target (0 when the base grid alone exceeds it).
    rank_energy: float | None = Field(None, gt=0, le=1)
    target_bits: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_rank_rule(self):
        if self.rank_energy is not None and self.target_bits is not None:
            raise ValueError("give at most one of rank_energy and target_bits")
        return self


class ActQuantConfig(BaseModel):
    """Fake quantization of activations, per token, of every quantized linear's input (and of the low-rank
    intermediates x·A and (x·A)·B): `mxint` = MXINT blocks along the features (LQER's W4A8 / W4A6);
    `int` = one asymmetric min-max integer grid per token (LRQ's and SmoothQuant's per-token W4A8)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["mxint", "int"] = "mxint"
    bits: int = Field(8, ge=2, le=8)
    block_size: int = Field(16, ge=1)  # mxint only
    exp_bits: int = Field(8, ge=2, le=8)  # mxint only


class WeightQuantConfig(BaseModel):
    """Settings every weight quantizer shares.

    group_size: −1 per output channel, 0 per tensor, g > 0 groups of g input columns (the last group of a
    layer is partial when g does not divide its input dimension).
    """

    model_config = ConfigDict(extra="forbid")

    bits: Bits = 4
    group_size: GroupSize = 128
    symmetric: bool = False
    lqer: LQERConfig | None = None  # optional low-rank error correction on top of this grid
    act: ActQuantConfig | None = None  # optional activation fake quantization (None: weight-only)
    # Outlier reservation (`methods.outliers`): this fraction of each layer's entries is kept exactly in
    # fp16 (values and positions stored and counted) and left out of the grid fit. Methods implement it
    # by setting `reserves_outliers`; the others refuse f > 0. (CLAQ redefines the field: its own OR.)
    outliers: float = Field(0.0, ge=0, lt=0.5)
    # Which entries (`methods.outliers`): range = largest drop of the group's squared min-max range
    # (default); group-z = |w − mean| / std within each (row, group); magnitude = |w − group mean| / std
    # of the whole layer. bench/outliers.py compares them.
    outlier_rule: Literal["range", "group-z", "magnitude"] = "range"
    reserves_outliers: ClassVar[bool] = False

    @model_validator(mode="after")
    def _outliers_supported(self):
        if isinstance(self.outliers, float) and self.outliers > 0 and not self.reserves_outliers:
            raise ValueError(f"method {getattr(self, 'method', '?')} does not implement outlier reservation: "
                             "outliers must be 0")
        return self


class GptqSolverConfig(BaseModel):
    """The settings of GPTQ's column sweep, declared once for every method that runs it (GPTQ, CLAQ, AWQ
    with a GPTQ base, QuantEase's lazy blocks)."""

    damp_percent: float = Field(0.01, ge=0, lt=1)  # λ = damp_percent · mean(diag H)
    block_size: int = Field(128, ge=1)  # lazy batch update width B
    act_order: bool = True  # columns by descending diag(H)


class GptqGroupsConfig(GptqSolverConfig):
    """GPTQ's sweep on a grouped uniform grid."""

    # Group params from the original W (reference `--static-groups`): act-order then needs no g_idx, so
    # GPTQ stores exactly what RTN stores and the two compare at matched bits. Dynamic groups cost
    # 32 bits per input column for g_idx (0.125 bpw on a 256-wide layer).
    static_groups: bool = True


class RTNConfig(WeightQuantConfig):
    """Round-to-nearest onto a min-max grid: uniform integers, or MXINT blocks (LQER's format)."""

    method: Literal["rtn"] = "rtn"
    reserves_outliers: ClassVar[bool] = True
    format: Literal["int", "mxint"] = "int"
    # MXINT only: elements per shared exponent and the exponent's width (LQER: 16 and 8).
    block_size: int = 16
    exp_bits: int = 8

    @model_validator(mode="after")
    def _mx(self):
        if self.format == "mxint" and self.block_size < 1:
            raise ValueError("MXINT block size must be positive")
        if self.format == "mxint" and self.outliers > 0:
            raise ValueError("outlier reservation is for uniform integer grids, not MXINT: use format int")
        return self


class GPTQConfig(GptqGroupsConfig, WeightQuantConfig):
    """GPTQ (Frantar et al., 2023) as in the reference code IST-DASLab/gptq."""

    method: Literal["gptq"] = "gptq"
    reserves_outliers: ClassVar[bool] = True


class QuantEaseConfig(GptqSolverConfig, WeightQuantConfig):
    """QuantEase (Behdin et al., arXiv 2309.01885): cyclic coordinate descent on tr((W−Ŵ)Σ(W−Ŵ)ᵀ) over
    the min-max grid of the original W (`methods.quantease`)."""

    method: Literal["quantease"] = "quantease"
    reserves_outliers: ClassVar[bool] = True  # the outlier-aware variant: Ŵ = Q + S, S by hard thresholding
    iters: int = Field(30, ge=1)  # sweeps over the columns (the authors' 30)
    # the authors' relaxation: every third sweep (index ≡ 1 mod 3, ≤ 25, not the last) left unquantized
    relax: bool = True
    init: Literal["w", "gptq"] = "w"  # Ŵ₀ = W (the paper) or GPTQ's solution on the same grid
    damp_percent: float = Field(0.0, ge=0, lt=1)  # the authors use Σ undamped
    outlier_step: float = Field(1.0, gt=0)  # α of the IHT step α / (2 λ_max(Σ))

    @model_validator(mode="after")
    def _outlier_start(self):
        if self.outliers and self.init != "w":
            raise ValueError("the outlier-aware variant starts from W (init: w)")
        return self


class KMeansConfig(BaseModel):
    """1-D k-means of the codebook quantizers (`methods.kmeans.kmeans_1d`)."""

    model_config = ConfigDict(extra="forbid")

    init: Literal["dp", "uniform", "quantile", "kmeans++"] = "dp"
    max_iter: int = Field(300, ge=0)
    tol: float = Field(1e-4, ge=0)  # scikit-learn's criterion: Σ shift² ≤ tol · variance; 0: exact fixed point
    seed: int = 0  # k-means++ only


def _per_vector_only(v: int) -> int:
    if v != -1:
        raise ValueError("codebook quantizers have one codebook per vector, not groups: group_size must be -1")
    return v


class ClaqConfig(GptqSolverConfig, WeightQuantConfig):
    """CLAQ (Wang et al., arXiv 2405.17233): per-input-column k-means codebooks fitted inside the GPTQ
    sweep, outlier-guided adaptive precision (AP) and outlier reservation (OR).

    bits: the (low) code width. target_bits T (AP): a fraction (T − bits)/(high_bits − bits) of the
    columns, ranked by `ap_metric`, gets high_bits (T = 2.1 with bits 2: 5% at 4 bits).
    outliers: "none", "dynamic" (the authors' split: the top 10% columns by outlier count keep 1.4% per
    tail, the others 0.4%) or a fraction p per tail for every column, kept in fp16 (values and positions
    stored and counted). outlier_count c (an extension, instead of `outliers`): exactly the c largest and
    c smallest entries of every column.
    """

    method: Literal["claq"] = "claq"
    reserves_outliers: ClassVar[bool] = True  # its own OR: `outliers` below, per tail and column
    group_size: int = -1
    target_bits: float | None = None
    high_bits: int = 4
    ap_metric: Literal["outlier-order", "hessian"] = "outlier-order"
    outlier_threshold: float = Field(13.0, gt=0)  # t of the Outlier Order: |w| ≥ t · mean|W|
    outliers: Literal["none", "dynamic"] | float = "none"
    outlier_count: int = Field(0, ge=0)
    fit: Literal["column", "block"] = "column"  # column: faithful refit per column; block: one batch per block
    codebook_bits: Literal[16, 8, 7, 6, 5] = 16  # fp16 entries, or e-bit codes on a per-column affine grid
    # Extension beyond the paper: one fp16 scale per output row (its RMS or absmax), codebooks of W/s.
    row_scale: Literal["none", "rms", "absmax"] = "none"
    kmeans: KMeansConfig = Field(default_factory=KMeansConfig)

    _group = field_validator("group_size")(classmethod(lambda cls, v: _per_vector_only(v)))

    @field_validator("outliers")
    @classmethod
    def _outliers(cls, v):
        if isinstance(v, float) and not 0 < v < 0.5:
            raise ValueError(f"outlier fraction per tail {v} must be in (0, 0.5)")
        return v

    @model_validator(mode="after")
    def _one_outlier_rule(self):
        if self.outlier_count and self.outliers != "none":
            raise ValueError("give either outliers (a fraction per tail, or dynamic) or outlier_count, not both")
        return self

    @model_validator(mode="after")
    def _ap(self):
        if self.target_bits is None:
            return self
        if self.high_bits not in SUPPORTED_BITS or self.high_bits <= self.bits:
            raise ValueError(f"high_bits {self.high_bits} must be a supported width above bits {self.bits}")
        if not self.bits <= self.target_bits <= self.high_bits:
            raise ValueError(f"target_bits {self.target_bits} must lie between bits {self.bits} and "
                             f"high_bits {self.high_bits}")
        return self


class SqueezeLLMConfig(WeightQuantConfig):
    """SqueezeLLM-style non-uniform quantization (Kim et al., arXiv 2306.07629): one k-means codebook per
    output row, weighted by the diagonal of the layer Hessian (H_jj = 2·E[x_j²], the layer-wise proxy of
    the paper's Fisher weights), no error feedback."""

    method: Literal["squeezellm"] = "squeezellm"
    group_size: int = -1
    weighting: Literal["hessian-diag", "none"] = "hessian-diag"
    codebook_bits: Literal[16, 8] = 16
    kmeans: KMeansConfig = Field(default_factory=KMeansConfig)

    _group = field_validator("group_size")(classmethod(lambda cls, v: _per_vector_only(v)))


class HQQConfig(WeightQuantConfig):
    """HQQ (Badri & Shaji, 2023): no data; per group the min-max scale is kept and the zero point is
    optimised for the l_p norm of the weight error by half-quadratic splitting (`methods.hqq`).

    zero: "fp16" stores HQQ's unrounded zeros (16 bits each: b + 32/g bits per weight with the fp16
    scale); "int" rounds them to b-bit integers packed like RTN's (b + (16 + b)/g), which every exporter
    takes.
    """

    method: Literal["hqq"] = "hqq"
    group_size: GroupSize = 64
    p: float = Field(0.7, gt=0, le=1)  # the l_p norm of the error (HQQ: 0.7)
    beta0: float = Field(10.0, gt=0)  # β₀ of the half-quadratic penalty
    kappa: float = Field(1.01, ge=1)  # β ← κβ each iteration
    iters: int = Field(20, ge=1)
    zero: Literal["fp16", "int"] = "fp16"

    @field_validator("symmetric")
    @classmethod
    def _asymmetric(cls, v: bool) -> bool:
        if v:
            raise ValueError("HQQ optimises the zero point, which a symmetric grid fixes at 2^(b-1): "
                             "use an asymmetric grid (--asym), or method rtn for a symmetric one")
        return v


class AWQConfig(GptqGroupsConfig, WeightQuantConfig):
    """AWQ (Lin et al., arXiv 2306.00978) per layer (`methods.awq`): input-channel scale s = s_X^α with α
    searched on the layer output error, then RTN (with the authors' clip search) or GPTQ on W·diag(s).
    s is stored with the layer (fp16 per input channel, counted) unless the best α is 0."""

    method: Literal["awq"] = "awq"
    base: Literal["rtn", "gptq"] = "rtn"
    n_grid: int = Field(20, ge=1)  # α ∈ {0, 1/n_grid, …, (n_grid − 1)/n_grid}
    # Clip search (RTN base): None = on for rtn with groups or per-channel grids, off otherwise.
    clip: bool | None = None
    clip_grid: int = Field(20, ge=1)  # shrink ratios 1 − i/clip_grid …
    max_shrink: float = Field(0.5, ge=0, lt=1)  # … for i < max_shrink·clip_grid (1.0 … 0.55)
    # base gptq: the sweep's settings come from GptqGroupsConfig

    @model_validator(mode="after")
    def _clip(self):
        if self.clip and self.base != "rtn":
            raise ValueError("AWQ clip search is for the rtn base (GPTQ fits its own grid): set clip false")
        if self.clip and self.group_size == 0:
            raise ValueError("AWQ clip search needs per-channel or grouped grids (group_size -1 or > 0)")
        return self


class AQLMConfig(WeightQuantConfig):
    """AQLM (Egiazarian et al., ICML 2024): additive multi-codebook vector quantization, "MxB g" =
    `num_codebooks` codebooks of 2^`nbits_per_codebook` vectors of `in_group_size` input columns, one fp16
    scale per output row (`methods.aqlm`, `formats.additive`). Code bits per weight: M·B/g (2x8 g8: 2).
    `bits` and `group_size` of the shared settings do not apply."""

    method: Literal["aqlm"] = "aqlm"
    num_codebooks: int = Field(2, ge=1, le=8)
    nbits_per_codebook: int = Field(8, ge=1, le=16)
    in_group_size: int = Field(8, ge=1, le=64)
    beam_size: int = Field(8, ge=1)
    rounds: int = Field(4, ge=1)  # (codebooks, scales, codes) updates
    cg_iters: int = Field(25, ge=1)  # conjugate-gradient steps of the codebook least squares
    kmeans_iters: int = Field(20, ge=1)  # per residual k-means stage of the init
    damp_percent: float = Field(0.01, ge=0, lt=1)
    seed: int = 0
    # block fine-tuning (the authors' finetune_groupwise): Adam steps on each block's codebooks and row
    # scales (codes fixed) against the float block's outputs, one calibration batch per step; 0 = off
    finetune_steps: int = Field(0, ge=0)
    finetune_lr: float = Field(1e-4, gt=0)

    @field_validator("nbits_per_codebook")
    @classmethod
    def _storable(cls, v: int) -> int:
        if not (v <= 8 or v == 16):
            raise ValueError(f"codes of {v} bits: choose 1-8 (packed) or 16")
        return v


class LRQConfig(WeightQuantConfig):
    """LRQ (Lee et al., NAACL 2025): block-wise reconstruction with low-rank weight-scaling matrices,
    Ŵ = s₁·clamp(⌊W ⊘ (s₁·exp(L₂U₂ + r₂ + c₂))⌉, −z, 2^b−1−z) (`methods.lrq`, driven block by block by
    `pipeline.reconstruct`). The result is a plain asymmetric uniform grid (per channel by default, the
    paper's; g > 0 gives per-group s₁ and z)."""

    method: Literal["lrq"] = "lrq"
    group_size: GroupSize = -1
    # r of L₂ [out, r] and U₂ [r, in]; None: ⌈min(out, in)/4⌉ (the ratio of the authors' r = 1024 on
    # LLaMA-2-7B's 4096² layers); 0: FlexRound's full matrix S₂ instead of L₂U₂ + r₂ + c₂
    rank: int | None = Field(None, ge=0)
    iters: int = Field(5000, ge=0)  # Adam steps per block (the authors' 5000)
    lr: float | None = Field(None, gt=0)  # None: the authors' LLaMA-2-7B rates, W4 9e-4, W3 6e-4, W4A8 5e-4
    batch_size: int = Field(2, ge=1)  # calibration windows per step (the authors' 2)
    # the L_p grid search of the initial s₁ (100 clipping ratios, p = 2.4); None: the authors' choice, on
    # for W3 and W4A8, off (min-max) for W4
    clipping: bool | None = None
    lp: float = Field(2.4, gt=0)
    clip_grid: int = Field(100, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _asymmetric(self):
        if self.symmetric:
            raise ValueError("LRQ fits an asymmetric grid with an integer zero point per channel: symmetric false")
        if self.group_size == 0:
            raise ValueError("LRQ learns s₁ per output channel (group_size -1) or per group (g > 0), not per tensor")
        return self

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 5e-4 if self.act is not None else 9e-4 if self.bits >= 4 else 6e-4

    def clip(self) -> bool:
        return self.clipping if self.clipping is not None else (self.bits < 4 or self.act is not None)


MethodConfig = (RTNConfig | GPTQConfig | ClaqConfig | SqueezeLLMConfig | HQQConfig | AWQConfig | QuantEaseConfig
                | AQLMConfig | LRQConfig)

