"""`lowbit export`: registered on the main typer app in lowbit.cli."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def export_cmd(
    source: Path = typer.Argument(..., help="A lowbit output directory (from `lowbit quantize`); for the K-quant GGUF types, the unquantized HF model."),
    fmt: str = typer.Option(..., "--format", "-f", help="compressed-tensors | gptq | peft-lora | gguf | dequantized."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (created atomically)."),
    dtype: Optional[str] = typer.Option(None, help="float32 | float16 | bfloat16 for the unquantized tensors "
                                        "(default: as saved; gptq float16; dequantized float16)."),
    lowrank_adapter: bool = typer.Option(False, help="Layers with LQER factors: write the grid-only base and "
                                         "the factors as a PEFT LoRA adapter in OUT/lora_adapter."),
    gguf_type: Optional[str] = typer.Option(None, help="GGUF block type of a lowbit output: Q4_0 | Q4_1 | Q8_0 "
                                            "(default: the one that fits the grid exactly); or a K-quant mix made "
                                            "from an unquantized model: Q2_K | Q3_K_S | Q3_K_M | Q3_K_L | Q4_K_S | "
                                            "Q4_K_M | Q5_K_S | Q5_K_M | Q6_K | Q8_0 (rows not a multiple of 256 fall "
                                            "back to Q4_0 / Q5_0 / Q5_1 / Q8_0, as in llama.cpp)."),
    imatrix: bool = typer.Option(False, help="K-quant mixes: fit every block's scales to an importance matrix "
                                 "(mean x² per input column of each layer) from calibration windows."),
    gptq: bool = typer.Option(False, help="K-quant mixes: fit the block scales to the imatrix, then choose the "
                              "codes by GPTQ's column sweep against them (Hessians from calibration windows)."),
    calib_samples: int = typer.Option(128, help="--imatrix / --gptq: calibration windows (512 tokens of C4)."),
    data: Optional[str] = typer.Option(None, help="Data directory (default: the packaged corpora)."),
    base: Optional[str] = typer.Option(None, help="peft-lora: base_model_name_or_path to record."),
    eval_json: Optional[Path] = typer.Option(None, help="Evaluation figures for the model card (`lowbit eval --json`)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
):
    """Export a lowbit output to a format other runtimes load; refuses formats that cannot hold it exactly.
    With a K-quant --gguf-type (Q4_K_M, ...), SOURCE is an unquantized model quantized into ggml blocks."""
    from lowbit.exporters import export

    path = export(source, fmt, out, dtype=dtype, overwrite=overwrite, lowrank_adapter=lowrank_adapter,
                  gguf_type=gguf_type, base=base, eval_json=eval_json, imatrix=imatrix, gptq=gptq,
                  calib_samples=calib_samples,
                  data=data)
    typer.echo(f"exported {source} as {fmt} to {path} (model card: {path / 'README.md'})")
