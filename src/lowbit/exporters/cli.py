"""`lowbit export`: registered on the main typer app in lowbit.cli."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def export_cmd(
    source: Path = typer.Argument(..., help="A lowbit output directory (from `lowbit quantize`)."),
    fmt: str = typer.Option(..., "--format", "-f", help="compressed-tensors | gptq | peft-lora | gguf | dequantized."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (created atomically)."),
    dtype: Optional[str] = typer.Option(None, help="float32 | float16 | bfloat16 for the unquantized tensors "
                                        "(default: as saved; gptq float16; dequantized float16)."),
    lowrank_adapter: bool = typer.Option(False, help="Layers with LQER factors: write the grid-only base and "
                                         "the factors as a PEFT LoRA adapter in OUT/lora_adapter."),
    gguf_type: Optional[str] = typer.Option(None, help="GGUF block type: Q4_0 | Q4_1 | Q8_0 (default: the one "
                                            "that fits the grid exactly)."),
    base: Optional[str] = typer.Option(None, help="peft-lora: base_model_name_or_path to record."),
    eval_json: Optional[Path] = typer.Option(None, help="Evaluation figures for the model card (`lowbit eval --json`)."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
):
    """Export a lowbit output to a format other runtimes load; refuses formats that cannot hold it exactly."""
    from lowbit.exporters import export

    path = export(source, fmt, out, dtype=dtype, overwrite=overwrite, lowrank_adapter=lowrank_adapter,
                  gguf_type=gguf_type, base=base, eval_json=eval_json)
    typer.echo(f"exported {source} as {fmt} to {path} (model card: {path / 'README.md'})")
