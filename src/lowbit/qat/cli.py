"""`lowbit finetune`: quantization-aware fine-tuning from the command line (registered in lowbit.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

DATA_HELP = "Data directory (default: $LOWBIT_DATA, else ../shared/data when present)."


def finetune(
    model: str = typer.Argument(..., help="HF model directory (or hub id when online)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (native lowbit format)."),
    method: str = typer.Option("l4q", help="{methods} (`lowbit methods` describes each; onebit: use with --loss kd --kd-hidden 1)."),
    bits: int = typer.Option(4, help="Weight bits: 2-8."),
    group_size: Optional[int] = typer.Option(None, help="Group size along the input dim; -1 per channel, 0 per tensor (default 128; loqt 64)."),
    rank: Optional[int] = typer.Option(None, help="LoRA / low-rank rank r (default 4; loqt 16)."),
    alpha: float = typer.Option(1.0, help="Adapter scale numerator: the low-rank term is multiplied by alpha/rank (loqt: by alpha itself, the paper's s)."),
    init_from: Optional[str] = typer.Option(None, help="Start grid: none (L4Q_init / min-max) | rtn | gptq. qlora: the PTQ base (default gptq)."),
    steps: int = typer.Option(100, help="Optimizer steps."),
    lr: float = typer.Option(1e-3, help="Learning rate of the adapters (and of W for lsq)."),
    lr_quant: float = typer.Option(1e-4, help="Learning rate of the steps s and offsets b (AdamW moves each by about this much per step)."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay on the adapters."),
    batch_size: int = typer.Option(4, help="Windows per optimizer step, over all processes."),
    micro_batch: Optional[int] = typer.Option(None, help="Windows per forward/backward (gradient accumulation)."),
    seqlen: int = typer.Option(256, help="Tokens per training window."),
    loss: str = typer.Option("ce", help="ce (next-token cross-entropy) | kd (KL to the unquantized model)."),
    kd_hidden: float = typer.Option(0.0, help="kd: weight of the hidden-state alignment term (Σ over blocks of the squared distance of the L2-normalised hidden states per token; OneBit: 1)."),
    dataset: str = typer.Option("c4", help="c4 (C4 training documents) | text (a UTF-8 file) | jsonl (chat/instruction examples)."),
    data_file: Optional[Path] = typer.Option(None, help="The file for --dataset text / jsonl."),
    eval_every: int = typer.Option(0, help="Evaluate the held-out loss every N steps (0: at the end only)."),
    eval_windows: int = typer.Option(16, help="Held-out windows for the periodic evaluation."),
    checkpoint_every: int = typer.Option(50, help="Checkpoint every N steps (0: never); a killed run resumes."),
    seed: int = typer.Option(0),
    learn_offset: bool = typer.Option(True, "--learn-offset/--no-learn-offset", help="l4q/lsq: learn the LSQ+ offset b (off: symmetric, b = 0)."),
    base_dtype: str = typer.Option("fp32", help="l4q: storage of the frozen W0: fp32 | bf16 | fp16."),
    phi: str = typer.Option("fp32", help="lr-qat: storage of the frozen W0/s0: fp32 | bf16 | fp16 | fixed8 | int."),
    symmetric: bool = typer.Option(False, "--sym/--asym", help="lr-qat / qlora / loqt / spiel: symmetric grid."),
    adapter_dtype: str = typer.Option("fp16", help="qlora: storage of the exported adapter: fp16 | int8 (per-row fp16 scales)."),
    update_gap: int = typer.Option(100, help="loqt: steps to the first merge (τ); later gaps τ + ⌊ψ^k⌋."),
    gap_growth: float = typer.Option(1.2, help="loqt: growth ψ of the merge gaps."),
    compensation_iters: int = typer.Option(5, help="loqt: alternations of quantize / fit B at each merge (0: B starts at 0)."),
    density: float = typer.Option(0.01, help="spiel: trained entries per layer / its size."),
    spiel_base: str = typer.Option("fp", help="spiel: fp (the float weights) | rtn | gptq (quantized SpIEL on --bits / --group-size)."),
    reselect_every: int = typer.Option(20, help="spiel: steps between drop-and-grow (R)."),
    accumulate_steps: int = typer.Option(5, help="spiel: steps of candidate gradients summed before each reselection (S)."),
    drop_fraction: float = typer.Option(0.2, help="spiel: share of the entries replaced at the first reselection, decayed linearly to 0."),
    loqt_export: str = typer.Option("requantize", help="loqt: requantize (final merge re-quantized: a plain integer model) | lowrank (grid + fp16 factors)."),
    settings: Optional[List[str]] = typer.Option(None, "--set", help="KEY=VALUE, repeatable: any setting of the method (quant.KEY, e.g. quant.regrid=true) or of training (train.KEY, e.g. train.grad_clip=1.0) by name; `lowbit methods` lists them."),
    nproc: int = typer.Option(1, help="Spawn N local data-parallel processes (or launch with torchrun)."),
    threads: Optional[int] = typer.Option(None, help="torch threads per process."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N: where the model, adapters and optimizer live (auto: the first GPU when CUDA is available; data-parallel CUDA runs: each process on cuda:LOCAL_RANK, NCCL)."),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    restart: bool = typer.Option(False, help="Ignore an existing checkpoint and start over."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Quantization-aware fine-tuning (L4Q, LR-QAT, QLoRA-style, LSQ, LoRA, OneBit, LoQT, SpIEL), exported to the native format.
    A killed run resumes from its last checkpoint when started again with the same command."""
    from rich.console import Console

    from lowbit.errors import LowbitError
    from lowbit.qat import distributed as dd
    from lowbit.qat.config import METHODS, parse_qat_config, parse_train_config
    from lowbit.qat.trainer import train

    if method not in METHODS:
        raise LowbitError(f"unknown finetune method {method!r}; choose one of {', '.join(METHODS)}")
    q = {"method": method, "bits": bits, "alpha": alpha}
    q.update({k: v for k, v in (("group_size", group_size), ("rank", rank)) if v is not None})
    if init_from is not None:
        q["init_from"] = init_from
    if method in ("l4q", "lsq"):
        q["learn_offset"] = learn_offset
    if method == "l4q":
        q["base_dtype"] = base_dtype
    if method == "lr-qat":
        q.update(phi=phi, symmetric=symmetric)
    if method == "qlora":
        q.update(symmetric=symmetric, adapter_dtype=adapter_dtype)
    if method == "lora":
        q = {"method": "lora", "alpha": alpha, **({"rank": rank} if rank is not None else {})}
    if method == "loqt":
        q = {k: v for k, v in q.items() if k != "alpha"}
        q.update(scale=alpha, symmetric=symmetric, update_gap=update_gap, gap_growth=gap_growth,
                 compensation_iters=compensation_iters, export=loqt_export)
    if method == "spiel":
        q = {k: v for k, v in q.items() if k in ("method", "bits", "group_size", "init_from")}
        q.update(density=density, base=spiel_base, symmetric=symmetric, reselect_every=reselect_every,
                 accumulate_steps=accumulate_steps, drop_fraction=drop_fraction)
    if method == "onebit":
        q = {"method": "onebit"}
    t = dict(steps=steps, lr=lr, lr_quant=lr_quant, weight_decay=weight_decay, batch_size=batch_size,
             micro_batch=micro_batch, seqlen=seqlen, loss=loss, kd_hidden=kd_hidden, dataset=dataset,
             data_path=str(data_file) if data_file else None, eval_every=eval_every, eval_windows=eval_windows,
             checkpoint_every=checkpoint_every, seed=seed)
    if settings:
        from lowbit.cli_options import assign

        both = assign({"quant": q, "train": t}, settings)
        if set(both) != {"quant", "train"}:
            raise LowbitError(f"--set: keys start with quant. or train., not {sorted(set(both) - {'quant', 'train'})}")
        q, t = both["quant"], both["train"]
    qcfg = parse_qat_config(q)
    tcfg = parse_train_config(t)
    if nproc < 1:
        raise LowbitError(f"--nproc must be at least 1, got {nproc}")
    kw = dict(data=data, overwrite=overwrite, progress=not quiet, restart=restart, threads=threads, device=device)
    if nproc > 1:
        dd.spawn(nproc, train, model, out, qcfg, tcfg, **kw)
        import json

        summary = json.loads((out / "lowbit.json").read_text())["summary"]
        summary["bits_per_weight"] = json.loads((out / "config.json").read_text()).get(
            "quantization_config", {}).get("bits_per_weight", 32.0)
    else:
        summary = train(model, out, qcfg, tcfg, **kw)
    if summary.get("bits_per_weight") is None:
        return
    Console(stderr=True).print(
        f"[green]saved[/green] {out}: {method} {summary['bits_per_weight']:.3f} bits/weight (all metadata), "
        f"{summary['steps']} steps in {summary['train_seconds']:.1f} s, held-out loss "
        f"{summary.get('eval_nll', float('nan')):.4f}, peak {summary['peak_memory_mb']:.0f} MB")
