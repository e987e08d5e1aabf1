"""Exporters: a native lowbit output → formats other runtimes load (one file per format).

Every exporter refuses, with a `LowbitError` naming the layer and the alternative, a model its format
cannot represent exactly, writes atomically, and writes a model card (README.md)."""

from __future__ import annotations

from pathlib import Path

from lowbit.errors import LowbitError

FORMATS = ("compressed-tensors", "gptq", "peft-lora", "gguf", "dequantized")


def export(source: str | Path, fmt: str, out: str | Path, *, dtype: str | None = None, overwrite: bool = False,
           lowrank_adapter: bool = False, gguf_type: str | None = None, base: str | None = None,
           eval_json: str | Path | None = None) -> Path:
    """Export the lowbit output `source` to `out` in format `fmt`; returns `out`."""
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
