"""`lowbit prune`: UDFC MLP-channel pruning (+ optional RTN quantization) of an HF decoder, written atomically.

Without --bits the output is an ordinary HF checkpoint (save_pretrained, safetensors) with the smaller
`intermediate_size`, loadable by transformers' AutoModelForCausalLM, plus `prune_report.json`. With
--bits the MLP linears are stored quantized in lowbit's native format (honest bit count; `lowbit eval`
loads it) and the report goes into its `lowbit.json` under "prune".
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


def prune(
    model: str = typer.Argument(..., help="HF decoder directory (LLaMA / Mistral / Qwen2) or hub id."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory."),
    ratio: float = typer.Option(0.3, help="Fraction of MLP channels pruned in every layer (0 <= r < 1)."),
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
    """Prune MLP channels (UDFC compensation into down_proj) and optionally quantize; save to OUT."""
    from pydantic import ValidationError

    from lowbit.errors import LowbitError
    from lowbit.prune.config import PruneConfig

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
