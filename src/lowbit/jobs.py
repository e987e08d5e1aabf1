"""The jobs behind the CLI: quantize a model directory, evaluate one. Thin glue over the layers below.

A quantization run keeps its per-block checkpoints in `.<OUT>.partial/` next to the output; started again
with the same command after a kill, it continues from the last finished block (the pipeline checks that
model, recipe and calibration data are the same) and ends with output identical to an uninterrupted run.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.eval.protocol import Protocol
from lowbit.io.atomic import atomic_write_text
from lowbit.recipe import Recipe


def calibration_data(recipe: Recipe, tokenizer, model, data: str | None = None) -> torch.Tensor:
    from lowbit.calibration import calibration_windows

    c = recipe.calibration
    seqlen = c.seqlen or min(2048, getattr(model.config, "max_position_embeddings", 2048) or 2048)
    return calibration_windows(c, tokenizer, seqlen, data)


def checkpoint_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def needs_data(recipe: Recipe) -> bool:
    """Whether any stage of the recipe reads calibration windows."""
    from lowbit.methods import needs_calibration

    return (needs_calibration(recipe.quant) or recipe.budget is not None or recipe.finetune is not None
            or (recipe.prune is not None and recipe.prune.needs_data))


def run_recipe(model, recipe: Recipe, calib: torch.Tensor | None, *, progress: bool = True,
               checkpoint_dir: Path | None = None, parallel=None, offload_activations: bool | None = None,
               device=None):
    """Every stage of `recipe` on the in-memory `model`, which is changed in place (its linears become
    QuantLinears; pruned channels are gone). Returns (result, recipe that ran, extras): the pipeline's
    `QuantizeResult` with the final QuantizedWeights, the recipe as run (a budget's plan recipe), and
    {"summary", "prune", "finetune", "plan_files"}."""
    import dataclasses

    from lowbit.formats.quantized_weight import bit_counts
    from lowbit.nn.quant_linear import quantized_weights
    from lowbit.pipeline import stages
    from lowbit.pipeline.calibrate import quantize_model

    if getattr(model, "_lowbit_quantized", False):
        raise LowbitError("the model is already quantized by lowbit; quantize the original model")
    t0 = time.perf_counter()
    # composed stages (lowbit.pipeline.stages): prune in memory, then quantize, then fine-tune
    teacher = stages.keep_teacher(model, recipe.finetune)
    pruned = stages.prune_stage(model, recipe.prune, calib) if recipe.prune is not None else None
    recipe, plan_files = _budget_plan(model, recipe, calib, progress)
    result = quantize_model(
        model, recipe.quant, calib, include=recipe.include or None, ignore=recipe.ignore or None,
        overrides=[(o.pattern, o.config) for o in recipe.overrides] or None,
        checkpoint_dir=checkpoint_dir, progress=progress, parallel=parallel,
        offload_activations=offload_activations, device=device,
    )
    tuned = None
    if recipe.finetune is not None:  # the model changes in place; the result then reads its weights from it
        tuned = stages.finetune_stage(model, teacher, recipe.finetune, calib, progress=progress)
        result = dataclasses.replace(result, qweights=quantized_weights(model))
    summary = {
        "method": recipe.quant.method,
        # over the ORIGINAL element count (a pruned channel stores nothing); bits_per_stored_weight: kept ones
        **{k: v for k, v in bit_counts(result.qweights, pruned and pruned["original_shapes"]).items()
           if k.startswith("bits_per")},
        # a resumed run reports its whole cost: this process plus the interrupted one(s) up to the last
        # saved block (the blocks redone after it are counted twice, so this errs high, never low)
        "quantize_seconds": time.perf_counter() - t0 + result.resumed_seconds,
        "resumed_blocks": result.resumed_blocks,
        "peak_memory_mb": result.peak_memory_mb,
        "n_layers": len(result.qweights),
        "block_seconds": [round(t, 3) for t in result.block_seconds],
        "calibration_windows": None if calib is None else list(calib.shape),
        "device": str(device or "cpu"),
    }
    return result, recipe, {"summary": summary, "prune": pruned, "finetune": tuned, "plan_files": plan_files}


def save_result(model, result, recipe: Recipe, extras: dict, out: Path, *, tokenizer=None, source: str = "",
                overwrite: bool = False) -> None:
    """Write what `run_recipe` made as a native lowbit directory (atomically), with its plan files."""
    from lowbit.io.native import save_quantized

    pruned, tuned = extras.get("prune"), extras.get("finetune")
    save_quantized(
        model, result.qweights, out, tokenizer=tokenizer, recipe=recipe.model_dump(mode="json"),
        extra={"source_model": source, "summary": extras["summary"],
               "layers": [r.as_dict() for r in result.records],
               **({"prune": pruned} if pruned else {}), **({"finetune": tuned} if tuned else {})},
        overwrite=overwrite, original_shapes=pruned and pruned["original_shapes"],
    )
    for name, text in extras.get("plan_files", {}).items():
        atomic_write_text(Path(out) / name, text)


LOAD_MODES = ("auto", "layers", "whole")


def layerwise_blocker(model_path: str, recipe: Recipe) -> str | None:
    """Why `model_path` under `recipe` cannot be quantized layer by layer (None: it can)."""
    p = Path(model_path).expanduser()
    if not p.is_dir():
        return "the model is not a local directory"
    if not ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()):
        return "the model directory has no safetensors weights"
    from lowbit.io.native import is_quantized_dir

    if is_quantized_dir(p):
        return "the model is already quantized by lowbit"
    from lowbit.prune.slicing import is_sliced_dir

    if is_sliced_dir(p):
        return "its layers have their own widths (structured pruning), which the whole-model loader sets up"
    stages = [s for s, on in (("prune", recipe.prune), ("budget", recipe.budget), ("finetune", recipe.finetune)) if on]
    if stages:
        return f"the recipe's {stages[0]} stage works on the whole model"
    acts = [recipe.quant.act] + [o.config.get("act") for o in recipe.overrides]
    if any(a is not None for a in acts):
        return "activation quantization (W4A8) is set up on the whole model"
    return None


def quantize_job(model_path: str, out: str | Path, recipe: Recipe, *, data: str | None = None,
                 overwrite: bool = False, progress: bool = True, trust_remote_code: bool = False,
                 load: str = "auto", offload_activations: bool | None = None, device: str | None = None) -> dict:
    """Load, calibrate, quantize block by block, save atomically. Returns a summary dict.

    load: "layers" reads one decoder block at a time from the safetensors (`lowbit.io.lazy`; the
    checkpoint's dtype kept, one block in memory); "whole" loads the whole model in float32 first (needed
    by prune / budget / fine-tune stages and W4A8); "auto" takes "layers" whenever it applies. Both give
    the same quantized layers. offload_activations: one block's calibration inputs on disk (None: when
    they would exceed the pipeline's ACTIVATION_CAP_BYTES). device: `lowbit.devices.resolve_device`; each
    block and the solver run there (under torchrun with CUDA: this process's GPU, cuda:LOCAL_RANK)."""
    from lowbit.io.native import load_model

    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"output directory {out} exists; pass --overwrite to replace it")
    if load not in LOAD_MODES:
        raise LowbitError(f"--load must be one of {', '.join(LOAD_MODES)}, got {load!r}")
    blocker = layerwise_blocker(model_path, recipe) if load != "whole" else "--load whole"
    if load == "layers" and blocker:
        raise LowbitError(f"cannot load {model_path} layer by layer: {blocker}")
    from lowbit.pipeline.parallel import current

    from lowbit.devices import resolve_device

    dev = resolve_device(device)
    parallel = current()  # under torchrun: this process's share of the calibration
    if parallel is not None and dev.type == "cuda" and dev.index is None:
        import os

        dev = resolve_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    if parallel is not None:
        progress = progress and parallel.main
        stages = [s for s, on in (("prune", recipe.prune), ("budget", recipe.budget), ("finetune", recipe.finetune)) if on]
        if stages:
            raise LowbitError(f"data-parallel quantization runs the quant stage only; the recipe has a {stages[0]} "
                              "stage (run it in one process)")
    if blocker is None:
        return _quantize_layerwise(model_path, out, recipe, data=data, overwrite=overwrite, progress=progress,
                                   trust_remote_code=trust_remote_code, parallel=parallel,
                                   offload_activations=offload_activations, device=dev)
    model, tokenizer = load_model(model_path, trust_remote_code=trust_remote_code)
    if getattr(model, "_lowbit_quantized", False):
        raise LowbitError(f"{model_path} is already quantized by lowbit; quantize the original model")
    calib = calibration_data(recipe, tokenizer, model, data) if needs_data(recipe) else None
    ckpt = checkpoint_dir_for(out)
    result, recipe, extras = run_recipe(model, recipe, calib, progress=progress, checkpoint_dir=ckpt,
                                        parallel=parallel, offload_activations=offload_activations, device=dev)
    if parallel is not None and not parallel.main:  # rank 0 writes the output
        return {"method": recipe.quant.method, "rank": parallel.world.rank}
    save_result(model, result, recipe, extras, out, tokenizer=tokenizer, source=str(model_path), overwrite=overwrite)
    shutil.rmtree(ckpt, ignore_errors=True)
    return extras["summary"]


def _quantize_layerwise(model_path: str, out: Path, recipe: Recipe, *, data, overwrite, progress,
                        trust_remote_code, parallel=None, offload_activations=None, device=None) -> dict:
    """`quantize_job` with one decoder block in memory at a time (`lowbit.io.lazy`, `io.streamed`)."""
    from lowbit.io.lazy import TensorSource, skeleton
    from lowbit.io.native import _has_tokenizer, load_tokenizer
    from lowbit.io.streamed import save_quantized_blocks
    from lowbit.pipeline.calibrate import finished_block_counts, finished_block_states, quantize_model

    t0 = time.perf_counter()
    path = Path(model_path).expanduser()
    source = TensorSource(path)
    model = skeleton(path, source, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(str(path), trust_remote_code) if _has_tokenizer(path) else None
    calib = None
    if needs_data(recipe):
        if tokenizer is None:
            raise LowbitError(f"{path} has no tokenizer files; calibration text cannot be tokenized")
        calib = calibration_data(recipe, tokenizer, model, data)
    ckpt = checkpoint_dir_for(out)
    result = quantize_model(
        model, recipe.quant, calib, include=recipe.include or None, ignore=recipe.ignore or None,
        overrides=[(o.pattern, o.config) for o in recipe.overrides] or None,
        checkpoint_dir=ckpt, progress=progress, source=source, parallel=parallel,
        offload_activations=offload_activations, device=device)
    if parallel is not None and not parallel.main:  # rank 0 writes the output
        return {"method": recipe.quant.method, "rank": parallel.world.rank}
    blocks_path = model._lowbit_blocks
    n_blocks = len(model.get_submodule(blocks_path))
    counts = {"stored_bits": 0, "stored_params": 0}
    for i in range(n_blocks):
        c = finished_block_counts(ckpt, i)
        counts["stored_bits"] += c["stored_bits"]
        counts["stored_params"] += c["stored_params"]
    bpw = counts["stored_bits"] / counts["stored_params"] if counts["stored_params"] else 0.0
    summary = {
        "method": recipe.quant.method, "bits_per_weight": bpw, "bits_per_stored_weight": bpw,
        "quantize_seconds": time.perf_counter() - t0 + result.resumed_seconds,
        "resumed_blocks": result.resumed_blocks, "peak_memory_mb": result.peak_memory_mb,
        "n_layers": len(result.records), "calibration_windows": None if calib is None else list(calib.shape),
        "load": "layers", "dtype": str(source.dtype()).removeprefix("torch."), "device": str(device or "cpu"),
        "block_seconds": [round(t, 3) for t in result.block_seconds],
    }
    save_quantized_blocks(model, blocks_path, lambda i: finished_block_states(ckpt, i), source, out,
                          counts={"bits_per_weight": bpw, "stored_params": counts["stored_params"]}, tokenizer=tokenizer,
                          recipe=recipe.model_dump(mode="json"),
                          extra={"source_model": str(model_path), "summary": summary,
                                 "layers": [r.as_dict() for r in result.records]},
                          overwrite=overwrite)
    shutil.rmtree(ckpt, ignore_errors=True)
    return summary


def _budget_plan(model, recipe: Recipe, calib, progress: bool) -> tuple[Recipe, dict[str, str]]:
    """With a budget: measure, solve, and return the plan recipe (what the pipeline then runs and what is
    saved) plus the files that document it (plan.yaml reproduces the run; sensitivity.json the tables)."""
    if recipe.budget is None:
        return recipe, {}
    import json

    from lowbit.allocate.job import run_budget
    from lowbit.allocate.plan import plan_yaml

    from lowbit.cache import cache_root

    plan, planned, sens = run_budget(model, recipe, calib, cache=cache_root() / "sensitivity", progress=progress)
    return planned, {"plan.yaml": plan_yaml(plan, recipe),
                     "sensitivity.json": json.dumps(sens.to_json() | {"plan": plan.choice,
                                                                     "predicted_kl": plan.predicted_kl})}


def model_device_of(model) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def eval_job(model_path: str, *, base: str | None = None, protocol: Protocol | None = None,
             data: str | None = None, progress: bool = True, model=None, tokenizer=None, base_model=None,
             base_key: str | None = None, windows: torch.Tensor | None = None, device: str | None = None,
             tasks: list[str] | None = None, task_limit: int | float | None = None,
             num_fewshot: int | None = None) -> dict:
    """Perplexity of the model at `model_path` under `protocol` (default: the `full` profile) and, with a
    base model (`base` path or `base_model` + `base_key`), KL(base ‖ model) and top-1 agreement on the
    same windows. Pre-loaded models and tokenized `windows` (`eval.evaluate.protocol_windows`) avoid reloading.
    `tasks`: lm-evaluation-harness tasks run on the same model too (`lowbit.eval.harness`), under "tasks"."""
    from lowbit.eval.evaluate import base_outputs, evaluate, protocol_windows
    from lowbit.eval.protocol import get_protocol, model_key
    from lowbit.io.native import load_model

    protocol = protocol or get_protocol("full")
    if model is None:
        model, tokenizer = load_model(model_path)
    if device is not None:  # the model (quantized layers too: QuantLinear._apply) and the base on the device
        from lowbit.devices import resolve_device

        model.to(resolve_device(device))
    if windows is None:
        if tokenizer is None:
            raise LowbitError(f"{model_path} has no tokenizer files; the evaluation text cannot be tokenized")
        windows = protocol_windows(tokenizer, protocol, data)
    ref = None
    if base is not None or base_model is not None:
        if base_model is None:
            base_model, _ = load_model(base)
            if device is not None:
                base_model.to(model_device_of(model))
        key = base_key or (model_key(base) if base is not None else None)
        if key is None:
            from lowbit.fingerprint import weights_fingerprint

            key = f"model-{weights_fingerprint(base_model)[:12]}"
        ref = base_outputs(base_model, key, windows, protocol, progress)
    res = evaluate(model, windows, ref, batch_size=protocol.batch_size, progress=progress)
    out = res.as_dict()
    out["eval_seconds"] = out.pop("seconds")
    out.update({"tokenizer": getattr(tokenizer, "name_or_path", "?"), "protocol": protocol.model_dump()})
    if ref is not None:
        out["kl_windows"] = res.n_windows
    if tasks:
        from lowbit.eval.harness import run_tasks

        out["tasks"] = run_tasks(model, tokenizer, tasks, limit=task_limit, num_fewshot=num_fewshot,
                                 batch_size=protocol.batch_size, data=data)
    return out
