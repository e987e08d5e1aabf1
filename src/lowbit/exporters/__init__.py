"""Exporters: a native lowbit output → formats other runtimes load (one file per format).

Every exporter refuses, with a `LowbitError` naming the layer and the alternative, a model its format
cannot represent exactly, writes atomically, and writes a model card (README.md)."""

from __future__ import annotations

from pathlib import Path

from lowbit.errors import LowbitError

FORMATS = ("compressed-tensors", "gptq", "peft-lora", "gguf", "dequantized")


def export(source: str | Path, fmt: str, out: str | Path, *, dtype: str | None = None, overwrite: bool = False,
           lowrank_adapter: bool = False, gguf_type: str | None = None, base: str | None = None,
           eval_json: str | Path | None = None, imatrix: bool = False, gptq: bool = False,
           calib_samples: int = 128, data: str | None = None) -> Path:
    """Export the lowbit output `source` to `out` in format `fmt`; returns `out`. With `fmt` gguf and a
    K-quant mix as `gguf_type` (`exporters.gguf_kquants.MIXES`: Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K,
    Q8_0), `source` is an unquantized model whose float weights are quantized into ggml blocks, with
    `imatrix`: block scales fitted to the activations of `calib_samples` calibration windows; with `gptq`:
    also the codes chosen by GPTQ's sweep against those scales."""
    import torch

    from lowbit.exporters.common import DTYPES, load_source

    if fmt not in FORMATS:
        raise LowbitError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in DTYPES:
        raise LowbitError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    td = DTYPES[dtype] if dtype else None
    out = Path(out)
    if out.exists() and not overwrite:  # before the (slow) load
        raise LowbitError(f"output directory {out} exists; pass --overwrite")
    from lowbit.exporters.gguf_kquants import MIXES

    # A lowbit output is written with its own codes; an unquantized model is quantized into K-quant blocks
    # (Q8_0 names both: the block a symmetric 8-bit grid fits, and the mix made from float weights).
    if fmt == "gguf" and gguf_type in MIXES and not (Path(source) / "lowbit.json").is_file():
        return _kquants(source, out, gguf_type, imatrix, gptq, calib_samples, data, overwrite)
    if imatrix or gptq:
        raise LowbitError(f"--imatrix / --gptq apply to the K-quant GGUF mixes made from an unquantized model "
                          f"(--gguf-type {' | '.join(MIXES)})")
    src = load_source(source, eval_json)
    if fmt == "compressed-tensors":
        from lowbit.exporters.compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(src, out, dtype=td, overwrite=overwrite, lowrank_adapter=lowrank_adapter)
    if fmt == "gptq":
        from lowbit.exporters.gptq import export_gptq

        return export_gptq(src, out, dtype=td, overwrite=overwrite, lowrank_adapter=lowrank_adapter)
    if fmt == "peft-lora":
        from lowbit.exporters.peft_lora import export_peft_lora

        return export_peft_lora(src, out, dtype=td, base=base, overwrite=overwrite)
    if fmt == "gguf":
        from lowbit.exporters.gguf import export_gguf

        return export_gguf(src, out, tensor_type=gguf_type, overwrite=overwrite, lowrank_adapter=lowrank_adapter)
    from lowbit.exporters.dequantized import export_dequantized

    return export_dequantized(src, out, dtype=td or torch.float16, overwrite=overwrite,
                              lowrank_adapter=lowrank_adapter)


def _kquants(source, out: Path, mix: str, imatrix: bool, gptq: bool, calib_samples: int, data,
             overwrite: bool) -> Path:
    from lowbit.exporters.gguf_kquants import collect_imatrix, export_gguf_kquants

    imat = model = windows = None
    if imatrix or gptq:
        from lowbit.io.native import load_model
        from lowbit.jobs import calibration_data
        from lowbit.recipe import make_recipe

        model, tok = load_model(str(source))
        if tok is None:
            raise LowbitError(f"{source} has no tokenizer files; the imatrix needs calibration text")
        recipe = make_recipe({"calibration": {"n_samples": calib_samples}})
        windows = calibration_data(recipe, tok, model, data)
        if not gptq:  # with GPTQ the imatrix is diag H / 2 of the Hessians it collects anyway
            imat = collect_imatrix(model, windows)
    export_gguf_kquants(source, out, mix, imatrix=imat, gptq=windows if gptq else None, overwrite=overwrite,
                        model=model, progress=True)
    return out
