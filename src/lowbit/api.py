"""lowbit's Python API: the CLI's jobs on in-memory models.

    import lowbit
    model, tok = lowbit.load("HuggingFaceTB/SmolLM2-135M-Instruct")      # or a local directory
    q = lowbit.quantize(model, {"quant": {"method": "gptq", "bits": 4}}, tokenizer=tok)
    print(q.summary["bits_per_weight"], lowbit.evaluate(q.model, base=ref_model, tokenizer=tok)["kl"])
    q.save("out/gptq4")                                                   # the native format
    lowbit.export("out/gptq4", "gptq", "out/gptq4-gptq")                  # formats runtimes load

`quantize` changes the model it is given in place (its linears become `QuantLinear`s, pruned channels
are gone) and returns a `Quantized` report holding that same model and every `QuantizedWeight`; pass a
copy to keep the original. A recipe is a `Recipe`, a dict of the YAML's keys, a path to a YAML file, or
a bare method config (`GPTQConfig(...)` or `{"method": ...}`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError

__all__ = ["Quantized", "evaluate", "export", "load", "quantize"]


@dataclass
class Quantized:
    """What `quantize` made: the (same, now quantized) model and how."""

    model: nn.Module  # the one source of truth: its QuantLinears hold the QuantizedWeights
    recipe: Any  # the Recipe that ran (a budget's plan recipe when the recipe had a budget)
    summary: dict  # bits_per_weight (all metadata), quantize_seconds, peak_memory_mb, n_layers, ...
    records: list  # per layer: shape, bits per weight, seconds, relative output error on the calibration data
    tokenizer: Any = None
    extras: dict = field(default_factory=dict)  # prune / finetune reports, plan files

    @property
    def qweights(self) -> dict:
        """Layer name → QuantizedWeight, read from the model (so it never disagrees with what runs)."""
        from lowbit.nn.quant_linear import quantized_weights

        return quantized_weights(self.model)

    def save(self, out: str | Path, *, overwrite: bool = False, source: str = "") -> Path:
        """Write the quantized model as a native lowbit directory (atomically); `lowbit eval`, `lowbit
        export` and `lowbit.load` read it."""
        from lowbit.jobs import save_result

        out = Path(out)
        result = _Result(self.qweights, self.records)
        save_result(self.model, result, self.recipe, {**self.extras, "summary": self.summary}, out,
                    tokenizer=self.tokenizer, source=source, overwrite=overwrite)
        return out


@dataclass
class _Result:
    qweights: dict
    records: list


def _recipe(recipe):
    from lowbit.recipe import Recipe, load_recipe, make_recipe

    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe)
    if isinstance(recipe, dict):
        return make_recipe(recipe if "method" not in recipe else {"quant": recipe}, source="recipe")
    if hasattr(recipe, "method"):  # a method config object
        return make_recipe({"quant": recipe.model_dump()}, source="method config")
    raise LowbitError(f"a recipe is a Recipe, a dict, a YAML path or a method config; got {type(recipe).__name__}")


def _calibration(calibration, recipe, model, tokenizer, data) -> torch.Tensor | None:
    from lowbit import data as datasets
    from lowbit.jobs import calibration_data, needs_data

    if not needs_data(recipe):
        return None
    if isinstance(calibration, torch.Tensor):
        return calibration
    if tokenizer is None:
        raise LowbitError("this recipe needs calibration data: pass `calibration=` (token windows or texts) or "
                          "`tokenizer=` to draw windows from the recipe's calibration set")
    if calibration is None:
        return calibration_data(recipe, tokenizer, model, data)
    if isinstance(calibration, str):
        calibration = [calibration]
    if isinstance(calibration, (list, tuple)) and all(isinstance(t, str) for t in calibration):
        c = recipe.calibration
        seqlen = c.seqlen or min(2048, getattr(getattr(model, "config", None), "max_position_embeddings", 2048))
        return datasets.calibration_windows(tokenizer, list(calibration), c.n_samples, seqlen, c.seed)
    raise LowbitError("calibration= takes token windows [n, seqlen] (LongTensor), a text or a list of texts")


def quantize(model: nn.Module | str | Path, recipe=None, *, calibration=None, tokenizer=None,
             data: str | None = None, progress: bool = False) -> Quantized:
    """Quantize `model` (an in-memory HF or torch model, changed in place; or a path / hub id, loaded first)
    with `recipe`. `calibration`: token windows [n, seqlen], a text or a list of texts (cut into the
    recipe's windows), or None for the recipe's calibration set (needs `tokenizer`). A plain torch model
    takes its own batch-first inputs as `calibration`."""
    from lowbit.jobs import run_recipe

    if isinstance(model, (str, Path)):
        model, loaded_tok = load(model)
        tokenizer = tokenizer or loaded_tok
    r = _recipe(recipe)
    calib = _calibration(calibration, r, model, tokenizer, data)
    result, ran, extras = run_recipe(model, r, calib, progress=progress)
    model._lowbit_quantized = True
    return Quantized(model, ran, extras["summary"], result.records, tokenizer,
                     {k: v for k, v in extras.items() if k != "summary"})


def load(path: str | Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """(model, tokenizer or None) from a lowbit output, an HF model directory or a hub id."""
    from lowbit.io.native import load_model

    kw = {} if dtype is None else {"dtype": dtype}
    return load_model(path, trust_remote_code=trust_remote_code, **kw)


def evaluate(model: nn.Module | str | Path, *, base: nn.Module | str | Path | None = None, tokenizer=None,
             profile: str = "full", data: str | None = None, progress: bool = False,
             tasks: list[str] | None = None, task_limit: int | float | None = None, **protocol) -> dict:
    """WikiText-2 perplexity of `model` under lowbit's protocol (`profile` quick|full, fields such as
    `windows=` or `seqlen=` overridable) and, with `base`, KL(base ‖ model) and top-1 agreement on the same
    windows; with `tasks`, lm-evaluation-harness tasks too (`lowbit.eval.harness`; the first `task_limit`
    examples of each). Returns the same dict as `lowbit eval --json`."""
    from lowbit.eval.protocol import get_protocol
    from lowbit.jobs import eval_job

    proto = get_protocol(profile, **protocol)
    path = str(model) if isinstance(model, (str, Path)) else "(in-memory model)"
    m, tok = (load(model) if isinstance(model, (str, Path)) else (model, None))
    tok = tokenizer or tok
    if tok is None:
        raise LowbitError("evaluate needs a tokenizer for the evaluation text: pass tokenizer=")
    kw: dict = {"base": str(base)} if isinstance(base, (str, Path)) else {"base_model": base}
    return eval_job(path, model=m, tokenizer=tok, protocol=proto, data=data, progress=progress, tasks=tasks,
                    task_limit=task_limit, **({} if base is None else kw))


def export(source: str | Path, fmt: str, out: str | Path, **kw) -> Path:
    """Export the lowbit output directory `source` to `out` in `fmt` (compressed-tensors, gptq, peft-lora,
    gguf, dequantized); see `lowbit export --help` for the options."""
    from lowbit.exporters import export as _export

    return _export(source, fmt, out, **kw)
