"""`lowbit compare`: several recipes on one model, the same evaluation data, one table and a Pareto plot.

The list of (name, Recipe) is built first (`recipe_files`, `budget_recipes`,
any Recipe a caller makes) and `run_compare` takes any Recipe objects. Each recipe runs through
`quantize_job` (so composed recipes, prune / budget / fine-tune, run exactly as `lowbit quantize` runs
them) into REPORT_DIR/runs/NAME; the fp model is loaded once, and every quantized model is evaluated on
the same WikiText-2 test windows with `eval_job` against it, under one `Protocol` (`lowbit.eval.protocol`):
its calibration windows replace every recipe's own, so all runs calibrate on the same data too.

REPORT_DIR:
    compare.json       the model this directory belongs to (path + weight fingerprint); another is refused
    baseline.json      the unquantized model's row
    runs/NAME.json     one finished run (key, recipe, result), written atomically when the run ends
    runs/NAME/         its quantized model in the native format (kept with --keep-models)
    report.md, report.html, pareto.png

Resume: a run's key hashes what its numbers depend on (the recipe with its calibration section, the
model path and weights, the data directory, the protocol and its evaluation windows). Started again,
the command reuses every saved run whose key matches and reruns the others; a killed run continues
from quantize_job's block checkpoints when its key is unchanged, so a kill loses at most the blocks in
progress of one recipe.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path


import lowbit
from lowbit.errors import LowbitError
from lowbit.io.read import read_json
from lowbit.eval.pareto import pareto_front
from lowbit.eval.protocol import Protocol, get_protocol, model_key, provenance
from lowbit.fingerprint import file_sha256, json_sha, tensors_sha, weights_fingerprint
from lowbit.io.atomic import atomic_write_text
from lowbit.recipe import Recipe, load_recipe, make_recipe, merge

__all__ = ["Comparison", "budget_recipes", "pareto_front", "recipe_files",
           "unique_names", "run_compare", "storage_split"]

FORMAT = "lowbit-compare/1"
NamedRecipes = list[tuple[str, Recipe]]


# ---- the list of recipes


def unique_names(named: Sequence[tuple[str, Recipe]]) -> NamedRecipes:
    """File-safe names, unique even on case-insensitive file systems: a clash gets -2, -3, ..."""
    seen, out = set(), []
    for name, recipe in named:
        base = re.sub(r"[^A-Za-z0-9._+-]", "_", name).strip(".") or "recipe"
        new, i = base, 2
        while new.lower() in seen:
            new, i = f"{base}-{i}", i + 1
        seen.add(new.lower())
        out.append((new, recipe))
    return out


def recipe_files(paths: Sequence[str | Path] | None) -> NamedRecipes:
    """Every recipe YAML loaded (and validated) before anything runs; named after the file stem."""
    if not paths:
        raise LowbitError("no recipes given: pass --recipes a.yaml b.yaml ...")
    return unique_names([(Path(p).stem, load_recipe(p)) for p in paths])


def budget_recipes(budgets: Sequence[float], base: Recipe | None = None) -> NamedRecipes:
    """One recipe per bits-per-weight budget, named `budget-3.0`: `base` (default: the default Recipe)
    with its `budget` section's `bits_per_weight` set, so the allocator plans each run in quantize_job."""
    base = base or Recipe()
    out = []
    for b in budgets:
        d = base.model_dump(mode="json")
        d["budget"] = {**(d.get("budget") or {}), "bits_per_weight": float(b)}
        out.append((f"budget-{float(b)}", make_recipe(d, source=f"budget {b}")))
    return out


def describe(recipe: Recipe) -> str:
    """One short line: method, bits, grouping, low-rank, layer selection."""
    q = recipe.quant
    if recipe.budget is not None:  # the allocator picks bits / group / rank per layer from these lists
        b = recipe.budget
        g = "/".join({-1: "ch", 0: "t"}.get(x, str(x)) for x in b.group_sizes)
        head = (f"{q.method} budget {b.bits_per_weight} bpw (w{'/'.join(map(str, b.bits))} g{g} "
                f"r{'/'.join(map(str, b.ranks))})")
        return " ".join([head, *("+" + s for s in ("prune", "finetune") if getattr(recipe, s) is not None)])
    gs = getattr(q, "group_size", None)
    parts = [q.method, f"w{q.bits}"]
    if q.method == "aqlm":  # "MxB gG": the codebooks are the grid
        parts, gs = [q.method, f"{q.num_codebooks}x{q.nbits_per_codebook} g{q.in_group_size}"], None
        if q.finetune_steps:
            parts.append(f"block-tuned {q.finetune_steps} steps")
    if getattr(q, "format", "int") == "mxint":  # the shared-exponent block is the grouping
        parts.append(f"mxint b{q.block_size}")
    elif gs is not None:
        parts.append({-1: "per-channel", 0: "per-tensor"}.get(gs, f"g{gs}"))
    # the settings that tell recipes of one method apart in a table (defaults stay silent)
    if getattr(q, "base", "rtn") != "rtn":
        parts.append(f"on {q.base}")
    if getattr(q, "init", None) == "gptq" and q.method == "quantease":
        parts.append("from gptq")
    if q.method == "lrq":  # the step budget tells LRQ runs apart (the authors': 5000 per block)
        parts.append(("flexround" if q.rank == 0 else f"r{q.rank}" if q.rank else "r/4") + f" {q.iters} steps")
    if getattr(q, "codebook_bits", 16) != 16:
        parts.append(f"cb{q.codebook_bits}")
    if getattr(q, "target_bits", None):
        parts.append(f"AP {q.target_bits}")
    out = getattr(q, "outliers", 0.0)
    if out not in (0.0, "none", None):
        parts.append(f"OR {out}" if isinstance(out, str) else f"+{100 * out:g}% outliers")
    if getattr(q, "outlier_count", 0):
        parts.append(f"OR {q.outlier_count}/tail")
    lr = getattr(q, "lqer", None)
    if lr is not None:
        rule = (f"≤{lr.target_bits} bpw" if lr.target_bits else f"energy {lr.rank_energy}" if lr.rank_energy
                else f"r{lr.rank}")
        kind = "lqer" if lr.scale == "none" else "l2qer" if lr.scale == "act-mean" else f"lqer {lr.scale}"
        parts.append(f"+{kind} {rule} {lr.factor_dtype}")
    if getattr(q, "act", None) is not None:
        parts.append(f"a{q.act.bits}" + (" per token" if q.act.format == "int" else " mxint"))
    for what, items in (("include", recipe.include), ("ignore", recipe.ignore), ("override", recipe.overrides)):
        if items:
            parts.append(f"{len(items)} {what}")
    if recipe.prune is not None:  # composed stages
        parts.append("+prune")
    if recipe.finetune is not None:
        ft = recipe.finetune
        parts.append(f"+{getattr(ft, 'method', 'finetune')} {getattr(ft, 'steps', '?')} steps")
    return " ".join(parts)


# ---- bits by kind


def storage_group(key: str) -> str:
    """A `QuantizedWeight.storage()` key → codes | outliers | lowrank | meta (scales, zeros, codebooks, ...)."""
    if key == "codes":
        return "codes"
    if key.startswith("outlier"):
        return "outliers"
    if key.startswith("lowrank"):
        return "lowrank"
    return "meta"


def storage_split(qweights: dict, bits_per_weight: float | None = None) -> dict[str, float]:
    """Bits per weight of every quantized layer together, split by kind; the parts sum to the total.
    `bits_per_weight`: the total to split instead of stored bits / stored elements (a pruned model
    counts over its original element count)."""
    bits = {"codes": 0, "meta": 0, "outliers": 0, "lowrank": 0}
    for q in qweights.values():
        for key, b in q.storage().items():
            bits[storage_group(key)] += b
    total = sum(bits.values())
    if bits_per_weight is None:
        n = sum(q.shape[0] * q.shape[1] for q in qweights.values())
        bits_per_weight = total / n if n else 0.0
    return {k: bits_per_weight * v / total if total else 0.0 for k, v in bits.items()}


# ---- keys and saved runs


def _data_source(data: str | None) -> str:
    from lowbit.data import data_dir

    try:
        return str(data_dir(data).resolve())
    except LowbitError:
        return "hub"


def _read_saved(path: Path, key: str) -> dict | None:
    """The saved result at `path` when its key matches; None when absent, stale or unreadable (rerun)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved["result"] if isinstance(saved, dict) and saved.get("key") == key and "result" in saved else None


def _stored_dtype(model_path: str, model) -> str:
    """The dtype the model is stored in (config.json), which the fp row is labelled with."""
    cfg = Path(model_path) / "config.json"
    try:
        d = json.loads(cfg.read_text())
        name = d.get("dtype") or d.get("torch_dtype")
    except (OSError, ValueError):
        name = None
    return str(name or getattr(model.config, "dtype", "float32")).removeprefix("torch.")


FP_BITS = {"float32": (32, "fp32"), "bfloat16": (16, "bf16"), "float16": (16, "fp16")}


# ---- the comparison


def claim_dir(out: Path) -> dict | None:
    """Refuse an output that is a file or a non-empty directory `lowbit compare` did not make; return
    its compare.json when it has one. Checked before the model is loaded: nothing is written here."""
    if out.exists() and not out.is_dir():
        raise LowbitError(f"report directory {out} is a file")
    manifest = out / "compare.json"
    if out.is_dir() and any(out.iterdir()) and not manifest.is_file():
        raise LowbitError(f"report directory {out} exists and was not made by lowbit compare (no compare.json); "
                          f"choose a new or empty directory")
    if not manifest.is_file():
        return None
    return read_json(manifest, "", "choose another report directory", format=FORMAT)


def task_columns(results: dict) -> dict:
    """lm-eval results as row fields: `task:NAME` = accuracy (the report's columns), `lm_eval` = everything."""
    if not results:
        return {}
    return {**{f"task:{t}": m.get("acc") for t, m in results.items()}, "lm_eval": results}


class Comparison:
    """The fp model, its tokenizer and the test windows, loaded once; `run(name, recipe)` quantizes with
    quantize_job and evaluates the result against the fp model, or reuses a saved run."""

    def __init__(self, model_path: str, out_dir: str | Path, protocol: Protocol | None = None, *,
                 data: str | None = None, keep_models: bool = False, progress: bool = True,
                 trust_remote_code: bool = False, isolate: bool = False, device: str | None = None,
                 tasks: list[str] | None = None, task_limit: int | float | None = None):
        from lowbit.devices import resolve_device
        from lowbit.io.native import load_model
        from lowbit.eval.evaluate import base_outputs, protocol_windows

        self.protocol = protocol or get_protocol("full")
        self.out, self.data, self.isolate = Path(out_dir), data, isolate
        self.keep_models, self.progress, self.trust_remote_code = keep_models, progress, trust_remote_code
        # quantization runs each block and its solver there; evaluation runs the whole model there
        self.device = None if device is None else str(resolve_device(device))
        manifest = claim_dir(self.out)
        self.model_path = str(Path(model_path).resolve()) if Path(model_path).exists() else str(model_path)
        self.model, self.tokenizer = load_model(model_path, trust_remote_code=trust_remote_code)
        if getattr(self.model, "_lowbit_quantized", False):
            raise LowbitError(f"{model_path} is already quantized by lowbit; compare recipes on the original model")
        if self.tokenizer is None:
            raise LowbitError(f"{model_path} has no tokenizer files; the evaluation text cannot be tokenized")
        self.fingerprint = weights_fingerprint(self.model)
        if manifest is not None and manifest.get("model_fingerprint") != self.fingerprint:
            raise LowbitError(f"report directory {self.out} holds results of another model "
                              f"({manifest.get('model')}); choose another directory for {model_path}")
        self.windows = protocol_windows(self.tokenizer, self.protocol, data)
        self.dtype = _stored_dtype(model_path, self.model)
        self.base_key = (model_key(model_path) if Path(model_path).is_dir()
                         else f"{Path(str(model_path)).name}-{self.fingerprint[:12]}")
        self.tasks, self.task_limit = list(tasks or []), task_limit
        self._eval_key = {"model": self.model_path, "model_fingerprint": self.fingerprint,
                          "windows": tensors_sha(self.windows), "protocol": self.protocol.model_dump(),
                          "data": _data_source(data), "lowbit": lowbit.__version__}
        if self.tasks:  # (absent without tasks: the keys of runs saved before lm-eval columns stay valid)
            self._eval_key["lm_eval"] = {"tasks": self.tasks, "limit": task_limit}
        if self.device is not None:  # the base's outputs once on the device; the host copy is all that stays
            self.model.to(self.device)
        self.base = base_outputs(self.model, self.base_key, self.windows, self.protocol, progress)
        self.model.to("cpu")
        n, t = self.windows.shape
        self.provenance = provenance(model_path, self.protocol, windows={"n": n, "seqlen": t,
                                                                         "sha": tensors_sha(self.windows)})
        (self.out / "runs").mkdir(parents=True, exist_ok=True)
        if manifest is None:
            atomic_write_text(self.out / "compare.json", json.dumps(
                {"format": FORMAT, "model": self.model_path, "model_fingerprint": self.fingerprint}, indent=2) + "\n")

    # -- inputs

    def key(self, recipe: Recipe) -> str:
        c = recipe.calibration
        text = None
        if c.dataset == "text" and c.path and Path(c.path).is_file():
            text = file_sha256(c.path)
        return json_sha({**self._eval_key, "recipe": recipe.model_dump(mode="json"), "calib_text": text})

    def eval_settings(self) -> dict:
        n, seqlen = self.windows.shape
        return {"dataset": "WikiText-2 raw test (GPTQ protocol)", "seqlen": seqlen, "n_windows": n,
                "n_tokens": n * (seqlen - 1), "kl_windows": n, "protocol": self.protocol.describe(n, n * (seqlen - 1)),
                "tokenizer": getattr(self.tokenizer, "name_or_path", "?")}

    # -- runs

    def baseline(self) -> dict:
        """The unquantized model's row (KL 0 and top-1 agreement 1 by definition)."""
        from lowbit.eval.evaluate import base_result

        key = json_sha({**self._eval_key, "baseline": True})
        path = self.out / "baseline.json"
        saved = _read_saved(path, key)
        if saved is not None:
            return {**saved, "resumed": True}
        ev = base_result(self.base)  # the base's own NLL, computed with its cached outputs
        bits, label = FP_BITS.get(self.dtype, (32, self.dtype))
        row = {"name": f"{label} (unquantized)", "setting": f"stored as {self.dtype}", "baseline": True,
               "bits_per_weight": float(bits), "bpw_codes": float(bits), "bpw_meta": 0.0, "bpw_outliers": 0.0,
               "bpw_lowrank": 0.0, "ppl": ev.ppl, "kl": 0.0, "top1_agreement": 1.0, "calibration": "—",
               "quantize_seconds": 0.0, "eval_seconds": 0.0}
        if self.tasks:
            from lowbit.eval.harness import run_tasks

            if self.device is not None:
                self.model.to(self.device)
            row.update(task_columns(run_tasks(self.model, self.tokenizer, self.tasks, limit=self.task_limit,
                                              batch_size=self.protocol.batch_size, data=self.data)))
            self.model.to("cpu")
        atomic_write_text(path, json.dumps({"format": FORMAT, "key": key, "result": row,
                                            "provenance": self.provenance}, indent=2) + "\n")
        return {**row, "resumed": False}

    def run(self, name: str, recipe: Recipe) -> dict:
        from lowbit.io.native import load_quantized
        from lowbit.jobs import checkpoint_dir_for, eval_job, quantize_job

        recipe = merge(recipe, {}, self.protocol.calibration())  # one calibration set for every run
        key = self.key(recipe)
        runs = self.out / "runs"
        path, model_dir, pending = runs / f"{name}.json", runs / name, runs / f"{name}.pending"
        saved = _read_saved(path, key)
        if saved is not None and (not self.keep_models or model_dir.is_dir()):
            return {**saved, "resumed": True}
        if not (pending.is_file() and pending.read_text() == key):
            # What a killed run of another recipe under this name left (block checkpoints, caches): its
            # quantize_job would refuse to resume them, or reuse them wrongly.
            shutil.rmtree(checkpoint_dir_for(model_dir), ignore_errors=True)
            atomic_write_text(pending, key)
        if self.isolate:
            summary = self._quantize_in_subprocess(model_dir, recipe)
        else:
            summary = quantize_job(self.model_path, model_dir, recipe, data=self.data, overwrite=True,
                                   progress=self.progress, trust_remote_code=self.trust_remote_code,
                                   device=self.device)
        model, qweights, info = load_quantized(model_dir, trust_remote_code=self.trust_remote_code)
        ev = eval_job(name, model=model, tokenizer=self.tokenizer, base_model=self.model, base_key=self.base_key,
                      windows=self.windows, protocol=self.protocol, progress=self.progress, device=self.device,
                      tasks=self.tasks or None, task_limit=self.task_limit)
        eval_seconds = ev["eval_seconds"]
        saved_recipe = info["provenance"].get("recipe") or recipe.model_dump(mode="json")  # a budget's plan
        c, windows = recipe.calibration, summary.get("calibration_windows")
        calib_note = (f"{c.dataset}{f' {c.path}' if c.dataset == 'text' else ''} {windows[0]}×{windows[1]} "
                      f"seed {c.seed}" if windows else "none (data-free)")
        bpw = summary["bits_per_weight"]
        row = {"name": name, "setting": describe(recipe), "baseline": False, "bits_per_weight": bpw,
               **{f"bpw_{k}": v for k, v in storage_split(qweights, bpw).items()},
               "ppl": ev["ppl"], "kl": ev["kl"], "top1_agreement": ev["top1_agreement"], "calibration": calib_note,
               "quantize_seconds": summary["quantize_seconds"], "eval_seconds": eval_seconds,
               "peak_memory_mb": summary.get("peak_memory_mb"),
               "n_layers": len(qweights), **task_columns(ev.get("tasks", {}))}
        del model, qweights
        if (model_dir / "plan.yaml").is_file():  # a budgeted run: keep its plan beside the result
            atomic_write_text(runs / f"{name}.plan.yaml", (model_dir / "plan.yaml").read_text())
        atomic_write_text(path, json.dumps({"format": FORMAT, "key": key, "name": name,
                                            "recipe": recipe.model_dump(mode="json"), "quantized_recipe": saved_recipe,
                                            "result": row, "provenance": {**self.provenance, "date": time.strftime(
                                                "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}, indent=2) + "\n")
        pending.unlink(missing_ok=True)
        if not self.keep_models:
            shutil.rmtree(model_dir, ignore_errors=True)
        return {**row, "resumed": False}


    def finished_runs(self, skip: set[str]) -> list[tuple[str, dict, dict]]:
        """The saved runs of this directory not in `skip` whose results still hold: their key, recomputed
        from their saved recipe, matches (same model, protocol, windows and data). A report of a few
        recipes added to a directory thus lists every run in it, as a table grown over several calls.
        Returns (name, row, recipe as saved) in name order."""
        rows = []
        for path in sorted((self.out / "runs").glob("*.json")):
            if path.stem in skip:
                continue
            try:
                as_saved = json.loads(path.read_text())["recipe"]
                recipe = Recipe.model_validate(as_saved)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a run of this format: left out of the table, never deleted
            saved = _read_saved(path, self.key(recipe))
            if saved is not None:
                rows.append((path.stem, {**saved, "resumed": True}, as_saved))
        return rows

    def _quantize_in_subprocess(self, model_dir: Path, recipe: Recipe) -> dict:
        """`lowbit quantize --recipe` as its own process, so its peak memory and time are its own, exactly as
        a user runs it; its summary is read back from the output's lowbit.json."""
        import subprocess
        import sys

        recipe_file = model_dir.parent / f".{model_dir.name}.recipe.yaml"
        atomic_write_text(recipe_file, recipe.to_yaml())
        cmd = [sys.executable, "-m", "lowbit.cli", "quantize", self.model_path, "-o", str(model_dir), "--recipe",
               str(recipe_file), "--overwrite", *(["--data", self.data] if self.data else []),
               *([] if self.progress else ["--quiet"]), *(["--trust-remote-code"] if self.trust_remote_code else []),
               *(["--device", self.device] if self.device else [])]
        try:
            if subprocess.run(cmd).returncode != 0:
                raise LowbitError(f"quantization failed: {' '.join(cmd)}")
        finally:
            recipe_file.unlink(missing_ok=True)
        return read_json(model_dir / "lowbit.json", "the quantization's summary")["summary"]


def run_compare(model_path: str, named: Sequence[tuple[str, Recipe]], out_dir: str | Path,
                protocol: Protocol | None = None, *, data: str | None = None, keep_models: bool = False,
                progress: bool = True, command: str | None = None, trust_remote_code: bool = False,
                on_run: Callable[[dict], None] | None = None, isolate: bool = False, device: str | None = None,
                tasks: list[str] | None = None, task_limit: int | float | None = None) -> dict:
    """Run every recipe (reusing saved runs), then write report.md, report.html and pareto.png over
    these runs and every other finished run of the directory made under the same evaluation. Returns {"rows", "baseline", "paths"}; `on_run` sees each row as it is done. `isolate`: each
    quantization runs as its own `lowbit quantize` process (honest peak memory per run). `device`:
    `lowbit.devices.resolve_device` (default: the CPU), for quantization and evaluation. `tasks`:
    lm-evaluation-harness tasks run on every model too (one accuracy column each; `task_limit` examples)."""
    from lowbit.eval.compare_report import write_report

    if not named:
        raise LowbitError("no recipes given: pass --recipes a.yaml b.yaml ...")
    named = unique_names(named)
    t0 = time.perf_counter()
    cmp = Comparison(model_path, out_dir, protocol, data=data, keep_models=keep_models, progress=progress,
                     trust_remote_code=trust_remote_code, isolate=isolate, device=device, tasks=tasks,
                     task_limit=task_limit)
    baseline = cmp.baseline()
    rows = []
    for name, recipe in named:
        rows.append(cmp.run(name, recipe))
        if on_run is not None:
            on_run(rows[-1])
    others = cmp.finished_runs({name for name, _ in named})
    rows += [row for _, row, _ in others]
    info = {"model": cmp.model_path, "command": command, "eval": cmp.eval_settings(),
            "provenance": cmp.provenance, "wall_seconds": time.perf_counter() - t0,
            "recipes": {**{n: r.model_dump(mode="json") for n, r in named}, **{n: r for n, _, r in others}}}
    paths = write_report(cmp.out, rows, baseline, info)
    return {"rows": rows, "baseline": baseline, "paths": paths}
