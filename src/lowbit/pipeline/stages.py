"""The model-level stages a recipe composes around the per-layer quantizer:

    prune (UDFC, data-free)  →  calibrate + quantize every linear (any method)  →  fine-tune (optional)

* `prune:` (a `PruneConfig`) removes MLP channels in memory with UDFC's closed-form compensation; the
  quantizer then sees the smaller model. A pruned channel stores nothing, so bits are counted over the
  ORIGINAL element count of the quantized linears (`bits_per_weight`); `bits_per_stored_weight` divides
  by the elements actually kept.
* `finetune:` (a `FinetuneStageConfig`) trains what the base format can hold without changing a stored
  bit, on the calibration windows, against the unquantized (and unpruned) model:
  - `codebook`: the table values of codebook grids with the codes frozen (`qat.codebook_tuning`);
  - `l4q`: L4Q from the base's uniform grid (`qat.prepare.make_layer` with init_from="gptq": W₀ := Ŵ,
    the base's steps and offsets), exported again on a plain UniformGrid of the same bits / group size.
  Loss `kd` (default): per-token KL(P_teacher ‖ P_model), the metric lowbit reports against fp32; `ce`:
  next-token cross-entropy on the calibration text. Batches are a function of (seed, step).
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from pydantic import ConfigDict, Field
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats.codebook import CodebookGrid
from lowbit.formats.quantized_weight import REMOVED, QuantizedWeight, UniformGrid
from lowbit.nn.quant_linear import QuantLinear, quantized_weights, replace_module
from lowbit.progress import StepProgress
from lowbit.qat.config import LoQTScheduleConfig, SpIELScheduleConfig


class FinetuneStageConfig(SpIELScheduleConfig, LoQTScheduleConfig):
    """Fine-tuning after quantization. lr: codebook entries / LQER factors (codebook), LoRA A, B (l4q), the
    sparse Δ (spiel); lr_quant: L4Q's steps and offsets. rank, alpha: L4Q's adapter (scaled by alpha / rank).
    spiel (quantized SpIEL): a sparse Δ of `density` on the quantized weights, dropped and regrown every
    `reselect_every` steps (`qat.spiel`), exported as the grid plus the merged entries as fp16 outliers
    (values and positions counted in the bits). loqt: LoQT from the base grid (`qat.loqt`): B of `rank`
    beside deq(Q), scaled by `alpha` as is, merged and re-quantized onto the base grid at steps 0,
    `update_gap`, … (growth `gap_growth`); exported as the same plain grid."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["codebook", "l4q", "spiel", "loqt"]
    steps: int = Field(32, ge=0)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-4, gt=0)
    lr_quant: float = Field(1e-5, gt=0)
    loss: Literal["kd", "ce"] = "kd"
    seed: int = 0
    tune_lowrank: bool = True  # codebook: also the LQER factors when the layers have them
    report_windows: int = Field(32, ge=1)  # the loss before/after is reported on the first N calibration windows
    rank: int = Field(4, ge=1)
    alpha: float = Field(1.0, gt=0)
    # spiel: density, reselect_every, accumulate_steps, drop_fraction (SpIELScheduleConfig); loqt: gap_growth,
    # compensation_iters (LoQTScheduleConfig) and update_gap, shorter here: a stage runs tens of steps
    update_gap: int = Field(10, ge=1)


# ---------------------------------------------------------------------------------------------- prune

def prune_stage(model: nn.Module, cfg, calib: torch.Tensor | None) -> dict:
    """Prune `model` in place (UDFC, or structured: activation / pg / search). Returns the report plus
    {"original_shapes": {linear: [out, in]}}, the shapes every bit is counted over. Any kept width works
    with any group size: a layer's last group is partial when needed."""
    from lowbit.models.adapters import get_adapter, layer_shape
    from lowbit.prune.hf import mlp_blocks, prune_hf

    if cfg.method != "udfc":
        from lowbit.prune.structured_run import structured_prune

        adapter = get_adapter(model)
        shapes = {n: list(layer_shape(model.get_submodule(n)))
                  for bn, b in adapter.blocks(model) for g in adapter.groups(model, bn, b) for n in g}
        # the recipe's calibration windows serve both the moments and, cut to 128 tokens, the batches the
        # policy or the search scores masks on (`lowbit prune` scores them on separate C4 training text)
        train = None if calib is None else calib[:, :128]
        report = structured_prune(model, cfg.method, cfg.ratio, calib, train, pg_steps=cfg.pg_steps,
                                  search_generations=cfg.search_generations,
                                  search_population=cfg.search_population, seed=cfg.seed)
        if cfg.method == "depth":  # the kept layers keep their shapes; a deleted one stores nothing
            prefix = adapter.blocks_prefix(model)
            kept = {str(old): new for new, old in enumerate(report["kept_layers"])}
            report["original_shapes"] = {}
            for n, s in shapes.items():
                i, rest = n[len(prefix) + 1:].split(".", 1)
                report["original_shapes"][f"{prefix}.{kept[i]}.{rest}" if i in kept else REMOVED + n] = s
            return report
        report["original_shapes"] = {n: s for n, s in shapes.items()
                                     if list(layer_shape(model.get_submodule(n))) != s}
        return report
    if cfg.bits is not None:
        raise LowbitError("prune.bits quantizes with RTN inside the prune step; in a recipe the quant: section "
                          "quantizes the pruned model, so leave prune.bits unset")
    blocks = mlp_blocks(model)
    shapes = {f"{name}.mlp.{p}": list(layer_shape(getattr(mlp, p)))
              for name, mlp, _ in blocks for p in ("gate_proj", "up_proj", "down_proj")}
    # data-light moments come from the recipe's calibration windows (calib_samples / calib_seqlen are the
    # `lowbit prune` command's own settings and are not used here)
    _, report, _ = prune_hf(model, cfg, calib if cfg.data_light else None, inplace=True)
    report["original_shapes"] = shapes
    return report


# ---------------------------------------------------------------------------------------------- finetune

def check_finetune(cfg: FinetuneStageConfig, qweights: dict[str, QuantizedWeight],
                   model: nn.Module | None = None) -> list[str]:
    """The layers the stage trains; LowbitError for what cannot compose."""
    for name in qweights if model is not None else ():
        if getattr(model.get_submodule(name), "act", None) is not None:
            raise LowbitError(f"{name}: fine-tuning with activation quantization (act:) is not supported")
    if cfg.method == "codebook":
        names = [n for n, q in qweights.items() if isinstance(q.grid, CodebookGrid)]
        if not names:
            raise LowbitError("finetune method 'codebook' tunes codebook grids (claq, squeezellm); "
                              "no quantized layer has one")
        return names
    if cfg.method == "spiel":
        for name, q in qweights.items():
            if not isinstance(q.grid, (UniformGrid, CodebookGrid)):
                raise LowbitError(f"{name}: SpIEL adds fp16 entries to a uniform or codebook grid, not {q.grid.kind}")
            if q.outliers is not None or q.lowrank is not None or getattr(q, "in_scale", None) is not None:
                raise LowbitError(f"{name}: SpIEL's entries are the layer's outliers; quantize without outliers, "
                                  "low-rank factors or AWQ scales to fine-tune with it")
        return list(qweights)
    for name, q in qweights.items():
        g = q.grid
        if not isinstance(g, UniformGrid):
            raise LowbitError(f"{name}: finetune method '{cfg.method}' trains a uniform integer grid; a {g.kind} grid "
                              "cannot be expressed (use method 'codebook' for codebook grids)")
        if q.outliers is not None or q.lowrank is not None:
            raise LowbitError(f"{name}: {cfg.method} exports a plain uniform grid and would drop the layer's "
                              f"{'outliers' if q.outliers is not None else 'low-rank factors'}; "
                              "quantize without them or fine-tune without L4Q")
        if g.zero.is_floating_point() or getattr(q, "in_scale", None) is not None:
            raise LowbitError(f"{name}: {cfg.method} rounds onto integer zero points on the plain weight; the base's "
                              f"{'float zeros (hqq)' if g.zero.is_floating_point() else 'input scales (awq)'} "
                              "cannot be kept")
        if g.g_idx is not None:
            raise LowbitError(f"{name}: {cfg.method} cannot keep GPTQ's g_idx (act-order with dynamic groups); "
                              "use static_groups: true")
    return list(qweights)


def _l4q_layer(name: str, ql: QuantLinear, cfg: FinetuneStageConfig, index: int):
    """L4Q from the base grid: `make_layer` on a linear holding Ŵ, with init_from="gptq" (W₀ := Ŵ)."""
    from lowbit.qat.config import L4QConfig
    from lowbit.qat.prepare import make_layer

    q = ql.qweight
    g = q.grid
    lin = nn.Linear(q.shape[1], q.shape[0], bias=ql.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(q.dequantize())
        if ql.bias is not None:
            lin.bias.copy_(ql.bias)
    # A symmetric base keeps b = 0 frozen, so the export stays symmetric and its zeros stay free.
    qcfg = L4QConfig(bits=g.bits, group_size=g.group_size, rank=cfg.rank, alpha=cfg.alpha, init_from="gptq",
                     learn_offset=not g.symmetric)
    return make_layer(name, lin, qcfg, index, cfg.seed, q)


def _loqt_layer(ql: QuantLinear, cfg: FinetuneStageConfig):
    """LoQT holding the base's grid and codes: its merges round onto that grid, so step 0 (B = 0, the
    merge of deq Q) gives back the base's codes exactly and the export stores what the base stores."""
    from lowbit.qat.loqt import LoQTLinear

    q = ql.qweight
    g = q.grid
    layer = LoQTLinear(q.dequantize().float(), ql.bias, bits=g.bits, group_size=g.group_size, rank=cfg.rank,
                       scale=cfg.alpha, compensation_iters=cfg.compensation_iters, symmetric=g.symmetric)
    layer.hold(q)
    return layer


def _lr(step: int, steps: int) -> float:
    """Cosine decay from 1 to 0 over the run (no warm-up: training starts at the base's optimum)."""
    return 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))


def window_losses(model: nn.Module, windows: torch.Tensor, loss: str, teacher: nn.Module | None,
                  batch: int = 8) -> float:
    """Mean per-token loss over every window (the training objective, evaluated without gradients)."""
    from lowbit.qat.trainer import window_loss

    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            ids = windows[i:i + batch]
            total += float(window_loss(model, ids, torch.ones_like(ids, dtype=torch.bool), loss, teacher))
            n += ids.shape[0] * (ids.shape[1] - 1)
    return total / n


def finetune_stage(model: nn.Module, teacher: nn.Module | None, cfg: FinetuneStageConfig, windows: torch.Tensor,
                   progress: bool = False) -> dict:
    """Fine-tune the quantized `model` in place and return a report; its QuantLinears end running the
    tuned weights (`quantized_weights(model)`), the stored bits of every layer unchanged (spiel adds its
    entries as counted outliers). `progress`: a bar of the training steps with the running loss
    (timestamped lines in a log file)."""
    from lowbit.qat.codebook_tuning import CodebookTuneLinear
    from lowbit.qat.data import batch_indices
    from lowbit.qat.distributed import World
    from lowbit.qat.loop import run_steps
    from lowbit.qat.loqt import LoQTSchedule
    from lowbit.qat.spiel import SpIELLinear, SpIELSchedule
    from lowbit.qat.trainer import window_loss

    if windows is None or windows.numel() == 0:
        raise LowbitError("the finetune stage needs calibration windows")
    if cfg.loss == "kd" and teacher is None:
        raise LowbitError("finetune loss 'kd' needs the unquantized teacher model")
    qweights = quantized_weights(model)
    names = check_finetune(cfg, qweights, model)
    training = model.training
    model.eval()  # no dropout: the loss is a deterministic function of the parameters
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    layers: dict[str, nn.Module] = {}
    for i, name in enumerate(names):
        ql = model.get_submodule(name)
        if cfg.method == "codebook":
            layers[name] = CodebookTuneLinear(ql.qweight, ql.bias, cfg.tune_lowrank)
        elif cfg.method == "loqt":
            layers[name] = _loqt_layer(ql, cfg)
        elif cfg.method == "spiel":
            layers[name] = SpIELLinear(ql.qweight.dequantize().float(), ql.bias, density=cfg.density, base=ql.qweight,
                                       generator=torch.Generator().manual_seed(cfg.seed * 100_003 + i))
        else:
            layers[name] = _l4q_layer(name, ql, cfg, i)
        replace_module(model, name, layers[name])
    schedule = None
    if cfg.method == "loqt":
        schedule = LoQTSchedule(cfg, layers, World(), cfg.steps)
    if cfg.method == "spiel":
        schedule = SpIELSchedule(cfg, layers, World(), cfg.steps)
    main, quant = [], []
    for layer in layers.values():
        for pname, p in layer.named_parameters(recurse=False):
            if p.requires_grad:
                (quant if pname in ("s", "b") else main).append(p)
    groups = [{"params": main, "lr": cfg.lr}] + ([{"params": quant, "lr": cfg.lr_quant}] if quant else [])
    opt = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    ones = torch.ones_like(windows, dtype=torch.bool)
    shown = windows[:cfg.report_windows]
    before = window_losses(model, shown, cfg.loss, teacher)
    history = []

    def backward(step: int) -> float:
        idx = batch_indices(windows.shape[0], cfg.batch_size, step, cfg.seed)
        ids = windows[idx]
        loss = window_loss(model, ids, ones[idx], cfg.loss, teacher) / (ids.shape[0] * (ids.shape[1] - 1))
        loss.backward()
        return float(loss.detach())

    try:
        with StepProgress(f"finetune ({cfg.method})", cfg.steps, progress, loss=float("nan")) as bar:
            def record(step: int, loss: float, f: float) -> None:
                history.append(loss)
                bar.update(loss=loss)

            run_steps(opt, cfg.steps, backward=backward, lr_factor=lambda step: _lr(step, cfg.steps), after=record,
                      schedule=schedule)
        with torch.no_grad():
            for name, layer in layers.items():
                qw = layer.export() if cfg.method == "codebook" else layer.export(qweights[name].dtype)
                replace_module(model, name, QuantLinear(qw, layer.bias))
    except BaseException:
        for name in layers:  # leave the model as it came: the base QuantLinears
            replace_module(model, name, QuantLinear(qweights[name], layers[name].bias))
        raise
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(training)
    after = window_losses(model, shown, cfg.loss, teacher)
    report = {"config": cfg.model_dump(), "layers": len(layers), "loss_windows": shown.shape[0],
              "loss_before": before, "loss_after": after,
              "train_loss": history}
    return report


def keep_teacher(model: nn.Module, finetune: FinetuneStageConfig | None) -> nn.Module | None:
    """A frozen copy of the unpruned, unquantized model when the finetune stage distils from it."""
    if finetune is None or finetune.loss != "kd":
        return None
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
