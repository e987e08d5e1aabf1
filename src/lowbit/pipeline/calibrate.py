"""The sequential calibration driver: quantize a model block by block, one block's activations in memory.

GPTQ's recipe (IST-DASLab/gptq `llama.py`):
1. Capture the inputs of block 0 (the "Catcher": a pre-hook stores args/kwargs and aborts the forward).
2. For block i and each true-sequential group of its linears: hook the group's inputs into running
   statistics (H = (2/N) Σ xxᵀ), run the block on every calibration batch, quantize the group and swap in
   QuantLinears, so the next group's statistics come from a block whose earlier layers are quantized.
3. Run the now quantized block once more; its outputs are the inputs of block i+1.

Methods that need no data (RTN) skip every forward pass unless the output error is asked for.

Precision: calibration always runs in float32. A bf16/fp16 block is cast to float32 while it is processed
and cast back afterwards (lossless round trip); the captured activations and the attention mask / rotary
embeddings passed to the blocks are kept in float32. Each QuantizedWeight records the original dtype.

Resume (`checkpoint_dir`): see `lowbit.pipeline.calibrate._Checkpoint`. A resumed run is bit-identical to an
uninterrupted one because the saved block inputs are exactly the float32 tensors the next block would get.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.fingerprint import json_sha, sha, tensor_bytes
from lowbit.progress import OptionalProgress, peak_memory_mb
from lowbit.formats.quantized_weight import QuantizedWeight
from lowbit.methods import MethodConfig, StatsAccumulator, needs_activation_stats, needs_calibration, quantize_weight
from lowbit.methods.stats import output_error
from lowbit.pipeline.block_runner import BlockRunner, run_block
from lowbit.models.adapters import Adapter, LayerPlan, get_adapter, layer_weight
from lowbit.models.dataflow import sequential_groups
from lowbit.models.experts import expert_layers, unfuse_experts
from lowbit.io.atomic import atomic_save_safetensors, atomic_write, atomic_write_text
from lowbit.io.lazy import TensorSource, load_block, release_block
from lowbit.devices import is_cpu, resolve_device
from lowbit.pipeline.offload import DiskBatches, batches_bytes
from lowbit.pipeline.parallel import Parallel
from lowbit.models.swap import make_quant_linear, swap_in
from lowbit.nn.quant_linear import QuantLinear, replace_module

# ---- results


@dataclass
class LayerRecord:
    name: str
    block: int
    shape: tuple[int, int]
    method: str
    bits: int
    bits_per_weight: float
    seconds: float  # the method's own time, without forward passes
    loss: float | None = None  # GPTQ's Σ (w − q)² / U_jj² / 2
    rel_error: float | None = None  # ‖X(W − Ŵ)ᵀ‖_F / ‖XWᵀ‖_F on this layer's calibration inputs
    nsamples: int = 0  # calibration tokens behind the statistics
    note: str | None = None  # why this layer deviates from its config (an expert's fallback)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class QuantizeResult:
    qweights: dict[str, QuantizedWeight]
    records: list[LayerRecord]
    seconds: float
    peak_memory_mb: float
    resumed_blocks: int = 0
    resumed_seconds: float = 0.0  # time the interrupted run(s) spent on the resumed blocks; not in `seconds`
    block_seconds: list[float] = field(default_factory=list)  # wall time of each block quantized in this run

    @property
    def bits_per_weight(self) -> float:
        """Every stored bit over every quantized weight (layers weighted by size)."""
        bits = sum(sum(q.storage().values()) for q in self.qweights.values())
        n = sum(q.shape[0] * q.shape[1] for q in self.qweights.values())
        return bits / n if n else 0.0


# ---- small helpers


class _Caught(Exception):
    """Raised by the Catcher pre-hook and by group hooks to stop a forward pass early."""


def _tree_map(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_tree_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _tree_map(v, fn) for k, v in obj.items()}
    return obj


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float() if t.is_floating_point() else t.detach()


def _same(a: Any, b: Any) -> bool:
    """Structural equality, so batches with identical masks / rotary tables share one copy."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, str, bool)) and a == b)


def _relative_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float | None:
    """‖X(W−Ŵ)ᵀ‖_F / ‖XWᵀ‖_F from H = (2/N) XᵀX alone: ‖XΔᵀ‖²_F = (N/2)·tr(Δ H Δᵀ), N/2 cancels."""
    num, den = output_error(W - Wq, H), output_error(W, H)
    return float((num / den).clamp_min(0).sqrt()) if den > 0 else None


class _Bars(OptionalProgress):
    """rich bars over blocks and over the layers of the current block; no-ops when disabled."""

    def __init__(self, enabled: bool, n_blocks: int):
        super().__init__()
        if enabled:
            from rich.progress import Progress

            self.p = Progress()
            self.blocks = self.p.add_task("blocks", total=n_blocks)
            self.layers = self.p.add_task("layers", total=0)

    def block(self, name: str, n_layers: int) -> None:
        if self.p:
            self.p.update(self.layers, description=f"layers of {name or 'model'}", total=n_layers, completed=0)

    def layer(self, name: str) -> None:
        if self.p:
            self.p.update(self.layers, advance=1, description=name)

    def block_done(self) -> None:
        if self.p:
            self.p.update(self.blocks, advance=1)

    def tuning(self, name: str, steps: int) -> None:
        if self.p:
            self.p.update(self.layers, description=f"fine-tuning {name}", total=steps, completed=0)

    def step(self, loss: float) -> None:  # one step of a block reconstruction (the layers bar counts steps)
        if self.p:
            self.p.update(self.layers, advance=1, description=f"reconstruction loss {loss:.4g}")


# ---- capture of the first block's inputs (the "Catcher")


def _capture(model: nn.Module, first_block: nn.Module, calib: torch.Tensor, batch_size: int, store=None):
    """Per calibration batch: the first block's hidden states (float32; into `store`, a `DiskBatches`,
    when given) and its other args/kwargs."""
    seen: dict[str, Any] = {}

    def hook(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, dict(kwargs)
        raise _Caught

    hidden, ctxs = ([] if store is None else store), []
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    # The blocks run in float32: so must what the model computes from the embeddings' dtype before them
    # (rotary cos/sin, Gemma's embedding scale, the mask). A bf16 model loaded layer by layer otherwise
    # rounds those to bf16, and its codes would differ from the same model loaded whole in float32.
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_handle = emb.register_forward_hook(lambda m, a, y: y.float()) if isinstance(emb, nn.Module) else None
    try:
        for i in range(0, calib.shape[0], batch_size):
            seen.clear()
            try:
                model(input_ids=calib[i : i + batch_size], use_cache=False)
            except _Caught:
                pass
            if not seen:
                raise LowbitError("the model's forward never reached its first decoder block")
            args, kwargs = seen["args"], seen["kwargs"]
            h = args[0] if args else kwargs.pop("hidden_states")
            ctx = (_tree_map(tuple(args[1:]), _f32), _tree_map(kwargs, _f32))
            if ctxs and _same(ctx, ctxs[-1]):
                ctx = ctxs[-1]  # one copy of the mask / rotary tables for all same-shaped batches
            hidden.append(_f32(h))
            ctxs.append(ctx)
    finally:
        handle.remove()
        if emb_handle is not None:
            emb_handle.remove()
    return hidden, ctxs


# ---- one block


# An expert that the calibration tokens rarely reach has a Hessian of rank ≤ its token count: a solver fitted
# to so few tokens overfits them. Below this many routed tokens an expert layer is quantized by RTN on the
# same grid (bits, group size, symmetry), and the layer record says so.
MIN_EXPERT_TOKENS = 64


def _quantize_layer(model: nn.Module, name: str, block_idx: int, config: MethodConfig, orig_dtype: torch.dtype,
                    acc: StatsAccumulator | None, measure: bool,
                    expert: bool = False) -> tuple[QuantizedWeight, LayerRecord]:
    module = model.get_submodule(name)
    W = layer_weight(module).float()
    stats = None if acc is None else acc.result()
    note = None
    n = 0 if stats is None else stats.nsamples
    if expert and needs_calibration(config) and n < MIN_EXPERT_TOKENS:
        from lowbit.models.adapters import merge_config

        note = f"expert reached by {n} calibration tokens (< {MIN_EXPERT_TOKENS}): RTN on the same grid"
        config = merge_config(config, {"method": "rtn"}, name)
    if stats is not None and stats.nsamples == 0:
        if needs_calibration(config):
            raise LowbitError(f"{name}: received no calibration inputs (is it used in the forward pass?)")
        stats = None
    t0 = time.perf_counter()
    try:
        qw, loss = quantize_weight(W, stats, config, return_loss=True)
    except LowbitError as e:
        raise LowbitError(f"{name}: {str(e).removeprefix('weight: ')}") from None
    seconds = time.perf_counter() - t0
    qw.dtype = orig_dtype
    rel = None
    if measure and stats is not None and stats.hessian is not None:
        rel = _relative_error(W, qw.dequantize(), stats.hessian)
    replace_module(model, name, make_quant_linear(module, qw, name))
    rec = LayerRecord(name, block_idx, tuple(qw.shape), config.method, qw.bits, qw.bits_per_weight(), seconds,
                      loss, rel, n, note)
    return qw, rec


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


# ---- the driver

# one block's calibration inputs above this go to disk unless offloading is set either way
ACTIVATION_CAP_BYTES = int(float(os.environ.get("LOWBIT_ACTIVATION_CAP_GB", "8")) * 2**30)


def quantize_model(
    model: nn.Module,
    config: MethodConfig | dict,
    calib: torch.Tensor | None,
    *,
    include: list[str] | None = None,
    ignore: list[str] | None = None,
    overrides: list[tuple[str, dict]] | None = None,
    batch_size: int = 8,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    on_layer: Callable[[LayerRecord], None] | None = None,
    measure_error: bool | None = None,
    cache_budget: int | None = None,
    offload_activations: bool | None = None,
    device: torch.device | str | None = None,
    source: "TensorSource | None" = None,
    parallel: "Parallel | None" = None,
) -> QuantizeResult:
    """Quantize `model` in place: its linears become QuantLinears, and the model is the result (read it
    back with `nn.quant_linear.quantized_weights`). The returned `qweights` are the very objects those
    QuantLinears hold, not copies; later stages change the model, never this dict.

    source: layer-by-layer mode (`lowbit.io.lazy`). `model` is a skeleton whose decoder blocks are on the
    meta device; each block is read from `source` when its turn comes, quantized, written to the block
    checkpoint (required: `checkpoint_dir`) and dropped again, so one block's weights are in memory at a
    time. The result then holds the records but no QuantizedWeights: they are in the checkpoint
    (`finished_block` reads them back) and the model's blocks are on the meta device again.
    parallel: data-parallel calibration (`lowbit.pipeline.parallel`): this process runs its range of the
    calibration batches, statistics are chained across the processes, rank 0 solves and broadcasts; every
    process ends with the same QuantizedWeights as a single process would make.

    calib: token windows [n, seqlen] (LongTensor) for HF models; for a generic nn.Module, any batch-first
    input tensor its forward accepts. measure_error: None = report the relative output error whenever
    statistics are collected anyway (data-driven methods); True = also run the data for RTN.
    cache_budget: bytes of frozen sub-module outputs a block may keep for reuse (`BlockRunner`; default
    max(2 GiB, twice the block's calibration activations); 0 recomputes everything, same result).
    offload_activations: keep the current block's calibration inputs on disk (`pipeline.offload`; in the
    checkpoint directory when there is one), one batch in memory at a time; None = when they would exceed
    ACTIVATION_CAP_BYTES. The results are the same.
    device: where blocks, their calibration inputs and the solver run (`lowbit.devices`; default the CPU).
    The model stays on the host; each block moves there while it is quantized, and its QuantizedWeights
    come back to the host when it is done.
    """
    t_start = time.perf_counter()
    device = None if device is None else resolve_device(device)
    if is_cpu(device):
        device = None
    if hasattr(model, "get_input_embeddings"):
        unfuse_experts(model)  # one linear per expert, each quantized on the tokens routed to it
    adapter = get_adapter(model)
    experts = expert_layers(model)
    plan = LayerPlan(config, include, ignore, list(overrides or []))
    blocks = adapter.blocks(model)
    groups = [[[n for n in g if plan.selected(n)] for g in adapter.groups(model, bn, b)] for bn, b in blocks]
    groups = [[g for g in gs if g] for gs in groups]
    configs = {n: plan.config_for(n) for gs in groups for g in gs for n in g}
    plan.warn_unused()
    if not configs:
        raise LowbitError("include/ignore patterns leave no layer to quantize")
    # Block reconstruction (LRQ) learns all of a block's layers at once against the float block's output.
    recon = [c for c in configs.values() if c.method == "lrq"]
    if recon:
        if len(recon) != len(configs):
            raise LowbitError("lrq reconstructs whole blocks: every quantized layer must use it (no mixing "
                              "with other methods in one run)")
        if parallel is not None:
            raise LowbitError("lrq runs in one process (data-parallel calibration does not apply)")
        batch_size = recon[0].batch_size  # the capture batch is the reconstruction step's batch
        offload_activations = False

    needs = any(needs_calibration(c) for c in configs.values())
    has_data = calib is not None and calib.numel() > 0
    if needs and not has_data:
        method = next(c.method for c in configs.values() if needs_calibration(c))
        raise LowbitError(f"{method} needs calibration data (token windows [n, seqlen]); none were given")
    if measure_error and not has_data:
        raise LowbitError("measuring the layer output error needs calibration data; none were given")
    use_data = needs or bool(measure_error)
    measure = use_data and measure_error is not False
    if use_data:
        _check_calib(model, adapter, calib)
    if batch_size < 1:
        raise LowbitError(f"batch_size must be positive, got {batch_size}")

    if source is not None:
        if checkpoint_dir is None:
            raise LowbitError("layer-by-layer quantization writes each block to a checkpoint directory; give one")
        if any(getattr(c, "act", None) is not None for c in configs.values()):
            raise LowbitError("activation quantization (W4A8) is not supported when loading layer by layer; "
                              "load the whole model (--load whole)")
    local = calib
    if parallel is not None and use_data:
        lo, hi = parallel.shard(calib.shape[0], batch_size)
        if hi <= lo:
            raise LowbitError(f"{calib.shape[0]} calibration windows in batches of {batch_size} are fewer batches "
                              f"than the {parallel.world.size} processes")
        local = calib[lo:hi]
    ckpt = None
    if checkpoint_dir is not None:
        fp = _fingerprint(model, plan, configs, calib if use_data else None, batch_size, measure, source,
                          parallel.world.size if parallel else 1)
        ckpt = _Checkpoint(Path(checkpoint_dir), fp, len(blocks), parallel)

    training = model.training
    model.eval()
    qweights: dict[str, QuantizedWeight] = {}
    records: list[LayerRecord] = []
    traced: dict = {}  # block structure → its true-sequential groups (block-relative), traced once
    block_seconds: list[float] = []
    store = None
    try:
        with torch.no_grad(), _Bars(progress, len(blocks)) as bars:
            start = 0
            if ckpt is not None:
                start = ckpt.load_finished(qweights, records, tensors=source is None)
                swap_in(model, qweights)
                for _ in range(start):
                    bars.block_done()
            hidden = ctxs = None
            if use_data and start < len(blocks):
                if offload_activations is None:  # automatic: when one block's inputs would pass the cap
                    width = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
                    offload_activations = local.numel() * width * 4 > ACTIVATION_CAP_BYTES
                store = (DiskBatches(Path(checkpoint_dir) / "activations" if checkpoint_dir is not None else None)
                         if offload_activations and adapter.blocks_path is not None else None)
                hidden, ctxs = _block_inputs(model, adapter, blocks[0][1], local, batch_size, store)
                if recon:  # the quantized-prefix stream X̃, then the float stream X (equal at block 0)
                    hidden, ctxs = hidden + [h.clone() for h in hidden], ctxs + ctxs
                if start > 0:
                    hidden = ckpt.load_inputs(start, len(hidden), hidden if store is not None else None)
                if device is not None:  # the inputs live on the device (offloaded ones go there batch by batch)
                    moved: dict[int, Any] = {}  # batches that shared one mask / rotary table still do
                    ctxs = [moved.setdefault(id(c), _tree_map(c, lambda t: t.to(device))) for c in ctxs]
                    if store is not None:
                        store.device = device
                    else:
                        hidden = [h.to(device) for h in hidden]
            for i in range(start, len(blocks)):
                name, block = blocks[i]
                bars.block(name, sum(map(len, groups[i])))
                last = i == len(blocks) - 1
                t_block = time.perf_counter()
                if source is not None:
                    template = load_block(block, name, source)
                if recon:
                    done = _reconstruct_block(model, block, i, [n for g in groups[i] for n in g], configs, hidden,
                                              ctxs, bars, on_layer, records, advance=not last, device=device)
                else:
                    done = _quantize_block(model, block, i, groups[i], configs, hidden, ctxs, use_data, measure,
                                           bars, on_layer, records, prefix=name, advance=use_data and not last,
                                           cache_budget=cache_budget, experts=experts,
                                           traced=traced if adapter.blocks_path is not None else None,
                                           parallel=parallel, device=device, lean=source is not None)
                if ckpt is not None:
                    ckpt.save_block(i, done, records, None if (last or not use_data) else hidden)
                if source is None:
                    qweights.update(done)
                else:  # written: the block (float or quantized) leaves memory
                    release_block(model, adapter.blocks_path, i, template)
                    blocks[i] = (name, template)
                    del done, block
                block_seconds.append(time.perf_counter() - t_block)
                bars.block_done()
            # Activation quantization (W4A8) is switched on only now: statistics are taken on unquantized
            # activations, as the LQER authors profile the unquantized model before quantizing.
            for name, cfg in configs.items() if source is None else ():
                if getattr(cfg, "act", None) is not None:
                    model.get_submodule(name).act = cfg.act
    finally:
        model.train(training)
        if store is not None:
            store.close()
    return QuantizeResult(qweights, records, time.perf_counter() - t_start, peak_memory_mb(),
                          resumed_blocks=ckpt.resumed if ckpt else 0,
                          resumed_seconds=ckpt.resumed_seconds if ckpt else 0.0, block_seconds=block_seconds)


def _check_calib(model: nn.Module, adapter: Adapter, calib: torch.Tensor) -> None:
    if adapter.blocks_path is None:
        return  # generic model: whatever its forward accepts
    if calib.ndim != 2 or calib.is_floating_point():
        raise LowbitError(f"calibration data must be integer token windows [n, seqlen], got "
                          f"{calib.dtype} of shape {tuple(calib.shape)}")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is not None and (calib.min() < 0 or calib.max() >= vocab):
        raise LowbitError(f"calibration token ids must lie in [0, {vocab}); got [{int(calib.min())}, "
                          f"{int(calib.max())}] — tokenizer and model do not match")


def _block_inputs(model, adapter, first_block, calib, batch_size, store=None):
    if adapter.blocks_path is None:  # the whole model is the block: its inputs are the data itself
        hidden = [_f32(calib[i : i + batch_size]) for i in range(0, calib.shape[0], batch_size)]
        return hidden, [((), {})] * len(hidden)
    return _capture(model, first_block, calib, batch_size, store)


def _quantize_block(model, block, idx, groups, configs, hidden, ctxs, use_data, measure, bars, on_layer,
                    records, prefix: str = "", advance: bool = False, cache_budget: int | None = None,
                    experts: frozenset = frozenset(), traced: dict | None = None, parallel=None, device=None,
                    lean: bool = False):
    """True-sequential quantization of one block, in float32 (cast back to its dtype afterwards).

    With `traced` (a decoder block) and data, the block's layers are split into true-sequential groups
    read off its dataflow on the first batch (`dataflow.sequential_groups`), once per block structure.

    With `advance`, `hidden` is replaced in place by the quantized block's outputs (the next block's
    inputs): one block's activations live at a time. The block's sub-modules run through a
    `BlockRunner`, which reuses the outputs of modules that can no longer change."""
    dtype = _float_dtype(block)
    dtypes = {n: layer_weight(model.get_submodule(n)).dtype for g in groups for n in g}
    if use_data and dtype not in (None, torch.float32):
        block.float()
    if device is not None:
        block.to(device)
    out = {}
    if cache_budget is None:  # on disk activations: the reused outputs are held in memory, so none by default
        # layer by layer, memory is what matters: no 2 GiB floor, twice the block's activations at most
        floor = 0 if lean else 2 << 30
        cache_budget = 0 if isinstance(hidden, DiskBatches) else max(floor, 2 * batches_bytes(hidden))
    budget = cache_budget
    names = [n for g in groups for n in g]
    # AQLM's block fine-tuning: the float block's outputs on the block's (quantized-prefix) inputs, before
    # any of its layers is quantized, are what the tuned block must reproduce
    tune = use_data and any(getattr(configs[n], "finetune_steps", 0) for n in names)
    targets = None
    if tune:
        if isinstance(hidden, DiskBatches) or parallel is not None:
            raise LowbitError("AQLM block fine-tuning keeps the block's inputs and targets in memory in one process: "
                              "drop --offload-activations / data-parallel calibration, or set finetune_steps 0")
        targets = [run_block(block, hidden[b], ctxs[b]).float() for b in range(len(hidden))]
    runner = (BlockRunner(model, block, prefix, hidden, ctxs, set(names), budget)
              if use_data else None)
    try:
        if traced is not None and use_data:
            groups = _true_sequential(block, prefix, [n for g in groups for n in g], hidden, ctxs, traced)
        for group in groups:
            data = any(needs_calibration(configs[n]) for n in group) or measure
            acts = any(needs_activation_stats(configs[n]) for n in group)
            if parallel is not None and use_data and data:  # this rank's inputs, chained to rank 0
                kept: dict[str, list[torch.Tensor]] = {}
                runner.collect(group, activations=acts, buffers=kept)
                dims = {n: layer_weight(model.get_submodule(n)).shape[1] for n in group}
                accs = parallel.chain(group, kept, dims, hessian=True, activations=acts)
                del kept
            else:
                accs = runner.collect(group, activations=acts) if use_data and data else {}
            for name in group:
                if parallel is None or parallel.main:
                    qw, rec = _quantize_layer(model, name, idx, configs[name], dtypes[name], accs.pop(name, None),
                                              measure, name in experts)
                if parallel is not None:  # rank 0's solution on every rank
                    qw, d = parallel.broadcast(qw if parallel.main else None, rec.as_dict() if parallel.main else None)
                    if not parallel.main:
                        replace_module(model, name, make_quant_linear(model.get_submodule(name), qw, name))
                        rec = LayerRecord(**{**d, "shape": tuple(d["shape"])})
                out[name] = qw
                records.append(rec)
                bars.layer(name)
                if on_layer is not None:
                    on_layer(rec)
            if runner is not None:
                runner.done(group)
        if tune:
            from lowbit.pipeline.reconstruct import tune_additive_block

            tuned_names = [n for n in names if getattr(configs[n], "finetune_steps", 0)]
            if tuned_names:  # the layers bar now counts the fine-tuning steps of this block
                bars.tuning(tuned_names[0].rsplit(".", 2)[0], configs[tuned_names[0]].finetune_steps)
            tuned, info = tune_additive_block(model, block, tuned_names, configs, hidden, ctxs, targets,
                                              block_idx=idx, bars=bars)
            out.update(tuned)
            note = (f"block fine-tuned: loss {info['loss_start']:.4g} -> {info['loss_end']:.4g} after "
                    f"{info['steps']} steps")
            for rec in records:
                if rec.block == idx:
                    rec.note = note if rec.note is None else f"{rec.note}; {note}"
            if advance:  # stored outputs of the runner predate the tuning: recompute
                with torch.no_grad():
                    for b in range(len(hidden)):
                        hidden[b] = _f32(run_block(block, hidden[b], ctxs[b]))
        elif advance and runner is not None:
            for b, h in enumerate(runner.outputs()):  # batch b's input is not read again after its output
                hidden[b] = _f32(h)
    finally:
        if device is not None:  # back to the host, the QuantLinears' weights too (QuantLinear._apply)
            block.to("cpu")
            out = {n: model.get_submodule(n).qweight for n in out}
        if use_data and dtype not in (None, torch.float32):
            block.to(dtype)
        for m in block.modules():  # drop float32 dequantization caches made during calibration
            if isinstance(m, QuantLinear):
                m._cache = None
    return out


def _reconstruct_block(model, block, idx, names, configs, hidden, ctxs, bars, on_layer, records, advance: bool,
                       device=None) -> dict[str, QuantizedWeight]:
    """One block of LRQ (`pipeline.reconstruct`) in float32 on `device`; one record per layer."""
    from lowbit.pipeline.reconstruct import reconstruct_block

    dtype = _float_dtype(block)
    block.float()
    if device is not None:
        block.to(device)
    bars.block(names[0].rsplit(".", 2)[0] if names else "", configs[names[0]].iters if names else 0)
    try:
        done, info = reconstruct_block(model, block, names, configs, hidden, ctxs, block_idx=idx, advance=advance,
                                       bars=bars)
    finally:
        if device is not None:
            block.to("cpu")
        if dtype not in (None, torch.float32):
            block.to(dtype)
    done = {n: model.get_submodule(n).qweight for n in done}
    tokens = sum(h.shape[0] * h.shape[1] for h in hidden[:len(hidden) // 2]) if hidden and hidden[0].ndim == 3 else 0
    note = (f"block loss {info['loss_start']:.4g} -> {info['loss_end']:.4g} after {info['steps']} steps "
            f"({info['trainable']} parameters)")
    for name, qw in done.items():
        rec = LayerRecord(name, idx, tuple(qw.shape), "lrq", qw.bits, qw.bits_per_weight(),
                          info["seconds"] / len(done), info["loss_end"], None, tokens, note)
        records.append(rec)
        if on_layer is not None:
            on_layer(rec)
    return done


def _true_sequential(block, prefix, names, hidden, ctxs, traced: dict) -> list[list[str]]:
    """The groups of `names`, traced on batch 0 the first time a block of this structure is seen."""
    from lowbit.pipeline.block_runner import run_block

    cut = len(prefix) + 1 if prefix else 0
    rel = tuple(n[cut:] for n in names)
    key = (type(block), rel)
    if key not in traced:
        groups = sequential_groups(block, prefix, list(names), lambda: run_block(block, hidden[0], ctxs[0]))
        traced[key] = [[n[cut:] for n in g] for g in groups]
    pre = f"{prefix}." if prefix else ""
    return [[pre + n for n in g] for g in traced[key]]


# ---- resume


def _fingerprint(model, plan: LayerPlan, configs, calib, batch_size: int, measure: bool,
                 source=None, processes: int = 1) -> dict[str, str]:
    """What a checkpoint depends on, hashed per part so a refusal can say which part changed. In
    layer-by-layer mode the weights hashed are the checkpoint's first and last tensors (the blocks are
    not in memory)."""
    settings = {"config": plan.base.model_dump(), "include": plan.include, "ignore": plan.ignore,
                "overrides": [[p, d] for p, d in plan.overrides], "batch_size": batch_size, "measure": measure,
                "lowbit": lowbit.__version__, **({"processes": processes} if processes > 1 else {})}
    cfg = getattr(model, "config", None)
    model_desc = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else str(model)
    first, last = next(iter(configs)), list(configs)[-1]
    if source is not None:
        keys = sorted(source.where)
        weights = [source.get(keys[0]), source.get(keys[-1])]
    else:
        weights = [layer_weight(model.get_submodule(first)), layer_weight(model.get_submodule(last))]
    return {
        "settings": json_sha(settings),
        "calibration": sha(b"none" if calib is None else tensor_bytes(calib)),
        "model": sha(type(model).__name__.encode(), model_desc.encode(), *map(tensor_bytes, weights)),
    }


def finished_block(checkpoint_dir: str | Path, i: int, meta: dict | None = None) -> dict[str, QuantizedWeight]:
    """The QuantizedWeights of finished block i in a checkpoint directory."""
    out = {}
    for name, (t, m) in finished_block_states(checkpoint_dir, i, meta).items():
        try:
            out[name] = QuantizedWeight.from_state(t, m)
        except LowbitError as e:
            raise LowbitError(f"damaged checkpoint in {checkpoint_dir} ({e}); delete it to start over") from None
    return out


def finished_block_states(checkpoint_dir: str | Path, i: int, meta: dict | None = None) -> dict[str, tuple[dict, dict]]:
    """Finished block i as stored: layer name → (`QuantizedWeight.to_state()` tensors, metadata). The
    layer-by-layer save writes these as they are (no unpacking and packing again)."""
    root = Path(checkpoint_dir)
    try:
        if meta is None:
            meta = json.loads((root / f"block-{i:05d}.json").read_text())
        tensors = load_file(root / f"block-{i:05d}.safetensors")
        out = {}
        for name, m in meta["layers"].items():
            out[name] = ({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + "/")}, m)
    except (OSError, KeyError, TypeError, ValueError, SafetensorError) as e:
        raise LowbitError(f"damaged checkpoint in {root} ({e}); delete it to start over") from None
    return out


def finished_block_counts(checkpoint_dir: str | Path, i: int) -> dict:
    """`bit_counts` of finished block i (kept in its JSON; recomputed for checkpoints that lack them)."""
    from lowbit.formats.quantized_weight import bit_counts

    root = Path(checkpoint_dir)
    try:
        meta = json.loads((root / f"block-{i:05d}.json").read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"damaged checkpoint in {root} ({e}); delete it to start over") from None
    return meta.get("counts") or bit_counts(finished_block(root, i, meta))


class _Checkpoint:
    """Per-block checkpoints in one directory (safetensors + JSON, each file written atomically):

    block-00003.safetensors / .json  the block's QuantizedWeights (`to_state()`) and layer records
    inputs-00004.safetensors         float32 inputs of block 4, one tensor per calibration batch
                                     (data-parallel: inputs-00004.rank-R.safetensors, each rank's own)
    progress.json                    {"fingerprint": ..., "n_blocks": N, "done": 4}, written last

    Data-parallel runs: rank 0 writes the block files and progress.json, after every rank has written its
    inputs; resuming needs the same number of processes and a directory all of them see.
    """

    def __init__(self, root: Path, fingerprint: dict[str, str], n_blocks: int, parallel=None):
        self.root, self.fp, self.n_blocks, self.resumed = root, fingerprint, n_blocks, 0
        self.parallel = parallel
        self.main = parallel is None or parallel.main
        # wall time of the earlier runs up to their last saved block, so a resumed run can report the
        # whole cost of its result (progress.json "seconds"; absent in checkpoints of older versions)
        self.resumed_seconds, self._t0 = 0.0, time.perf_counter()
        root.mkdir(parents=True, exist_ok=True)

    def _progress(self) -> dict | None:
        p = self.root / "progress.json"
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LowbitError(f"unreadable checkpoint {p}: {e}; delete {self.root} to start over") from None

    def load_finished(self, qweights: dict, records: list, tensors: bool = True) -> int:
        """Records (and with `tensors`, QuantizedWeights into `qweights`) of the finished blocks; their count."""
        prog = self._progress()
        if prog is None:
            return 0
        old = prog.get("fingerprint", {})
        changed = [k for k in self.fp if old.get(k) != self.fp[k]]
        if changed or prog.get("n_blocks") != self.n_blocks:
            raise LowbitError(f"checkpoint in {self.root} was made with a different {', '.join(changed) or 'model'}; "
                              f"use the same inputs to resume or delete the directory to start over")
        try:
            done = int(prog["done"])
            for i in range(done):
                meta = json.loads((self.root / f"block-{i:05d}.json").read_text())
                if tensors:
                    qweights.update(self.block_qweights(i, meta))
                records.extend(LayerRecord(**{**r, "shape": tuple(r["shape"])}) for r in meta["records"])
        except (OSError, KeyError, TypeError, ValueError, SafetensorError) as e:
            raise LowbitError(f"damaged checkpoint in {self.root} ({e}); delete it to start over") from None
        self.resumed = done
        self.resumed_seconds = float(prog.get("seconds", 0.0))
        return done

    def block_qweights(self, i: int, meta: dict | None = None) -> dict[str, QuantizedWeight]:
        return finished_block(self.root, i, meta)

    def _inputs(self, block: int) -> Path:
        rank = "" if self.parallel is None else f".rank-{self.parallel.world.rank}"
        return self.root / f"inputs-{block:05d}{rank}.safetensors"

    def load_inputs(self, block: int, n_batches: int, into: DiskBatches | None = None):
        """Block `block`'s saved inputs: a list, or copied batch by batch into `into` (offloaded)."""
        from safetensors import safe_open

        p = self._inputs(block)
        if not p.exists():
            raise LowbitError(f"checkpoint in {self.root} lacks the inputs of block {block}; delete it to start over")
        with safe_open(str(p), framework="pt") as f:
            if len(list(f.keys())) != n_batches:
                raise LowbitError(f"checkpoint inputs of block {block} have {len(list(f.keys()))} batches, "
                                  f"expected {n_batches}")
            if into is None:
                return [f.get_tensor(f"batch.{j}") for j in range(n_batches)]
            for j in range(n_batches):
                into[j] = f.get_tensor(f"batch.{j}")
            return into

    def save_block(self, i: int, done: dict[str, QuantizedWeight], records: list[LayerRecord],
                   next_inputs: list[torch.Tensor] | None) -> None:
        tensors, metas = {}, {}
        for name, qw in done.items():
            t, metas[name] = qw.to_state()
            tensors.update({f"{name}/{k}": v for k, v in t.items()})
        recs = [r.as_dict() for r in records if r.block == i]
        if self.main:
            from lowbit.formats.quantized_weight import bit_counts

            atomic_save_safetensors(tensors, self.root / f"block-{i:05d}.safetensors")
            info = {"layers": metas, "records": recs, "counts": bit_counts(done)}
            atomic_write_text(self.root / f"block-{i:05d}.json", json.dumps(info))
        if next_inputs is not None:  # batch by batch: offloaded inputs never all in memory
            from lowbit.io.streamed import write_safetensors

            parts = lambda: ({f"batch.{j}": next_inputs[j]} for j in range(len(next_inputs)))  # noqa: E731
            atomic_write(self._inputs(i + 1), lambda p: write_safetensors(p, parts))
        if self.parallel is not None:
            self.parallel.barrier()  # every rank's inputs are on disk before progress says so
        if self.main:
            prog = {"format": "lowbit-partial/1", "fingerprint": self.fp, "n_blocks": self.n_blocks, "done": i + 1,
                    "seconds": self.resumed_seconds + time.perf_counter() - self._t0}
            atomic_write_text(self.root / "progress.json", json.dumps(prog, indent=1))
        self._inputs(i).unlink(missing_ok=True)
