"""`lowbit prune`: UDFC MLP-channel pruning (+ optional RTN quantization) of an HF decoder, written atomically.

Without --bits the output is an ordinary HF checkpoint (save_pretrained, safetensors) with the smaller
`intermediate_size`, loadable by transformers' AutoModelForCausalLM, plus `prune_report.json`. With
--bits the MLP linears are stored quantized in lowbit's native format (honest bit count; `lowbit eval`
loads it) and the report goes into its `lowbit.json` under "prune".

`--method activation|pg|search` removes KV groups and MLP channels with per-layer widths (`prune.slicing`):
an HF directory whose config.json lists the widths, which `lowbit.io.native.load_model` (so `lowbit eval`,
`quantize`'s loader and `generate`) reads; plain `from_pretrained` cannot, its config has one width.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

REPORT = "prune_report.json"


def prune_job(model_path: str, out: str | Path, config, *, data: str | None = None, overwrite: bool = False,
              trust_remote_code: bool = False) -> dict:
    from lowbit import data as datasets
    from lowbit.errors import LowbitError
    from lowbit.io.atomic import atomic_dir
    from lowbit.io.native import load_model, save_quantized
    from lowbit.prune.hf import prune_hf

    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"output directory {out} exists; pass --overwrite to replace it")
    src = Path(model_path).expanduser()
    if src.exists() and out.resolve() == src.resolve():
        raise LowbitError(f"output directory {out} is the input model directory; choose another one")
    model, tokenizer = load_model(model_path, trust_remote_code=trust_remote_code)
    if getattr(model, "_lowbit_quantized", False):
        raise LowbitError(f"{model_path} is quantized by lowbit; prune the original model")
    windows = None
    if config.data_light:
        if tokenizer is None:
            raise LowbitError(f"{model_path} has no tokenizer; data-light mode needs one for calibration text")
        seqlen = config.calib_seqlen or min(2048, getattr(model.config, "max_position_embeddings", 2048) or 2048)
        windows = datasets.calibration_windows(tokenizer, datasets.c4_split("calib", data), config.calib_samples,
                                               seqlen, config.seed)
    t0 = time.perf_counter()
    model, report, qweights = prune_hf(model, config, windows, inplace=True)
    report.update(source_model=str(model_path), seconds=time.perf_counter() - t0,
                  calibration_windows=None if windows is None else list(windows.shape))
    if qweights:
        save_quantized(model, qweights, out, tokenizer=tokenizer,
                       recipe={"quant": {"method": "rtn", "bits": config.bits, "group_size": -1, "symmetric": True}},
                       extra={"source_model": str(model_path), "prune": report}, overwrite=overwrite)
    else:
        from transformers.utils import logging as hf_logging

        with atomic_dir(out, overwrite=overwrite) as tmp:
            hf_logging.disable_progress_bar()
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / REPORT).write_text(json.dumps(report, indent=1))
    return report


def structured_job(model_path: str, out: str | Path, method: str, ratio: float, *, calib_samples: int = 32,
                   calib_seqlen: int | None = None, pg_steps: int = 100, search_generations: int = 8,
                   search_population: int = 16, seed: int = 0, data: str | None = None, overwrite: bool = False,
                   trust_remote_code: bool = False) -> dict:
    """KV groups and MLP channels pruned by `activation` scores, the policy-gradient masks (`pg`) or the
    structure search (`search`), the same share of each kind, o_proj / down_proj refit by least squares,
    then cut out per layer (`prune.slicing`) and saved as an HF directory with `prune_report.json`."""
    from lowbit import data as datasets
    from lowbit.errors import LowbitError
    from lowbit.io.atomic import atomic_dir
    from lowbit.io.native import load_model
    from lowbit.prune.criteria import check_ratio
    from lowbit.prune.structured_run import structured_prune

    check_ratio(ratio)
    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"output directory {out} exists; pass --overwrite to replace it")
    model, tokenizer = load_model(model_path, trust_remote_code=trust_remote_code)
    if getattr(model, "_lowbit_quantized", False):
        raise LowbitError(f"{model_path} is quantized by lowbit; prune the original model")
    if tokenizer is None:
        raise LowbitError(f"{model_path} has no tokenizer; structured pruning reads calibration text")
    seqlen = calib_seqlen or min(512, getattr(model.config, "max_position_embeddings", 512) or 512)
    calib = datasets.calibration_windows(tokenizer, datasets.c4_split("calib", data), calib_samples, seqlen, seed)
    train = None
    if method in ("pg", "search", "depth"):  # masks are scored on C4 training documents, not the calibration set
        n_train = max(8, 4 * pg_steps) if method in ("pg", "depth") else 8
        train = datasets.calibration_windows(tokenizer, datasets.c4_split("train", data), n_train,
                                             min(128, seqlen), seed + 1)
    report = structured_prune(model, method, ratio, calib, train, pg_steps=pg_steps,
                              search_generations=search_generations, search_population=search_population,
                              seed=seed)
    report["source_model"] = str(model_path)
    from transformers.utils import logging as hf_logging

    with atomic_dir(out, overwrite=overwrite) as tmp:
        hf_logging.disable_progress_bar()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / REPORT).write_text(json.dumps(report, indent=1, default=str))
    return report


def prune(
    model: str = typer.Argument(..., help="HF decoder directory (LLaMA / Mistral / Qwen2) or hub id."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory."),
    method: str = typer.Option("udfc", help="udfc (MLP channels, every layer the same width, data-free closed-form compensation) | activation | pg (policy-gradient masks) | search (evolutionary structure search): KV groups and MLP channels, least-squares refit, per-layer widths (load with lowbit) | depth (whole layers by policy gradient; --ratio = share of layers removed)."),
    ratio: float = typer.Option(0.3, help="Fraction of MLP channels pruned in every layer (0 <= r < 1); activation / pg / search: of all KV groups and of all MLP channels."),
    pg_steps: int = typer.Option(100, help="pg: policy steps (2 sampled masks of 4 × 128 C4 tokens each)."),
    search_generations: int = typer.Option(8, help="search: generations."),
    search_population: int = typer.Option(16, help="search: population size."),
    bits: Optional[int] = typer.Option(None, help="Also quantize the MLP linears: per-channel symmetric RTN, 2-8 bits (native lowbit output)."),
    compensation: str = typer.Option("udfc", help="none | merge (one partner) | udfc (closed form)."),
    criterion: str = typer.Option("l2", help="l1 | l2 (norm of the gate/up rows) | recon (greedy expected error)."),
    family: str = typer.Option("scale", help="UDFC family: scale (rescale kept, combine pruned) | prune | full."),
    data_light: bool = typer.Option(False, "--data-light", help="Moments from calibration activations (C4 calib split) instead of the data-free Gaussian proxy."),
    calib_samples: int = typer.Option(32, help="Calibration windows for --data-light."),
    calib_seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration window (default min(2048, max positions))."),
    mc_samples: int = typer.Option(8192, help="Gaussian samples per layer for the data-free proxy."),
    seed: int = typer.Option(0, help="Seed of the proxy samples / calibration sampling."),
    data: Optional[str] = typer.Option(None, help="Data directory (default: $LOWBIT_DATA, else ../shared/data)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the model repo (off by default)."),
):
    """Prune MLP channels (UDFC compensation into down_proj) and optionally quantize, or prune KV groups and
    MLP channels with activation scores, policy-gradient masks or the structure search; save to OUT."""
    from pydantic import ValidationError

    from lowbit.errors import LowbitError
    from lowbit.prune.config import PruneConfig

    if method != "udfc":
        if bits is not None:
            raise LowbitError(f"--bits goes with --method udfc; quantize a {method}-pruned model with lowbit quantize")
        rep = structured_job(model, out, method, ratio, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                             pg_steps=pg_steps, search_generations=search_generations,
                             search_population=search_population, seed=seed, data=data, overwrite=overwrite,
                             trust_remote_code=trust_remote_code)
        b, a = rep["parameters"]
        print(f"saved {out}: {method}, {b / 1e6:.2f}M -> {a / 1e6:.2f}M parameters, KV groups per layer "
              f"{rep['widths']['kv_groups']}, channels {min(rep['widths']['channels'])}–"
              f"{max(rep['widths']['channels'])} ({rep['seconds']:.1f} s)")
        return

    try:
        cfg = PruneConfig(ratio=ratio, bits=bits, compensation=compensation, criterion=criterion, family=family,
                          data_light=data_light, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
                          mc_samples=mc_samples, seed=seed)
    except ValidationError as e:
        err = e.errors()[0]
        raise LowbitError(f"invalid option --{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}") from None
    rep = prune_job(model, out, cfg, data=data, overwrite=overwrite, trust_remote_code=trust_remote_code)
    lo, hi = rep["intermediate_size"]
    errs = [la["proxy_rel_error"] for la in rep["layers"]]
    print(f"saved {out}: intermediate_size {lo} -> {hi}, {rep['parameters'] / 1e6:.2f}M parameters"
          + (f", MLP {rep['bits_per_weight_mlp']:.3f} bits/weight" if bits else "")
          + f", mean proxy rel. error {sum(errs) / len(errs):.4f} ({rep['seconds']:.1f} s)")
