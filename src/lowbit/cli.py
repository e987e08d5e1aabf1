"""The `lowbit` command line. Every `LowbitError` ends as one line on stderr and exit status 2."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from lowbit.errors import LowbitError

app = typer.Typer(help="lowbit: make language models small (quantize, evaluate, build the reference model).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
reference_app = typer.Typer(help="The small reference LLaMA model used by the demo, tests and benches.",
                            no_args_is_help=True)
app.add_typer(reference_app, name="reference")
console = Console(stderr=True)

DATA_HELP = "Data directory (default: $LOWBIT_DATA, else ../shared/data when present)."


def clean_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LowbitError as e:
            print(f"lowbit: error: {e}", file=sys.stderr)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            print("lowbit: interrupted; run the same command again to resume", file=sys.stderr)
            raise typer.Exit(130)
    return wrapper


@app.command()
@clean_errors
def quantize(
    model: str = typer.Argument(..., help="HF model directory (or hub id when online)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (native lowbit format)."),
    method: Optional[str] = typer.Option(None, help="rtn | gptq (default gptq, or the recipe's)."),
    bits: Optional[int] = typer.Option(None, help="Weight bits: 2-8 (default 4)."),
    group_size: Optional[int] = typer.Option(None, help="Group size along the input dim; -1 per channel, 0 per tensor (default 128)."),
    symmetric: Optional[bool] = typer.Option(None, "--sym/--asym", help="Symmetric grid (default asymmetric)."),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="GPTQ: sweep columns by descending diag(H) (default on)."),
    static_groups: Optional[bool] = typer.Option(None, "--static-groups/--dynamic-groups", help="GPTQ: group params from the original W, so act-order needs no g_idx (default static; dynamic stores g_idx, 32 bits per input column)."),
    damp_percent: Optional[float] = typer.Option(None, help="GPTQ dampening as a fraction of mean diag(H) (default 0.01)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="RTN: int | mxint (default int)."),
    lqer_rank: Optional[int] = typer.Option(None, help="Add LQER low-rank error correction of this rank (fp16 factors, counted in bits)."),
    lqer_scale: Optional[str] = typer.Option(None, help="LQER scale: none (plain LQER) | act-mean (L²QER, default) | act-rms | exact (R_xx^½)."),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe; flags given explicitly override it."),
    calib_dataset: Optional[str] = typer.Option(None, help="c4 | wikitext2-valid | text (default c4, documents never used to train the reference model)."),
    calib_file: Optional[Path] = typer.Option(None, help="Text file for --calib-dataset text."),
    calib_samples: Optional[int] = typer.Option(None, help="Calibration windows (default 128)."),
    calib_seqlen: Optional[int] = typer.Option(None, help="Tokens per window (default min(2048, model max positions))."),
    seed: Optional[int] = typer.Option(None, help="Calibration sampling seed (default 0)."),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the model repo (off by default)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
):
    """Quantize MODEL block by block and save it to OUT. A killed run resumes when started again."""
    from lowbit.jobs import quantize_job
    from lowbit.recipe import Recipe, load_recipe, merge

    base = load_recipe(recipe) if recipe else Recipe()
    q = {k: v for k, v in dict(method=method, bits=bits, group_size=group_size, symmetric=symmetric,
                                   act_order=act_order, static_groups=static_groups,
                                   damp_percent=damp_percent, format=fmt).items() if v is not None}
    if lqer_rank is not None or lqer_scale is not None:
        lr = base.quant.lqer.model_dump() if base.quant.lqer is not None else {}
        lr.update({k: v for k, v in dict(rank=lqer_rank, scale=lqer_scale).items() if v is not None})
        q["lqer"] = lr
    c = {k: v for k, v in dict(dataset=calib_dataset, path=str(calib_file) if calib_file else None,
                                   n_samples=calib_samples, seqlen=calib_seqlen, seed=seed).items() if v is not None}
    r = merge(base, q, c)
    summary = quantize_job(model, out, r, data=data, overwrite=overwrite, progress=not quiet,
                           trust_remote_code=trust_remote_code)
    console.print(f"[green]saved[/green] {out}: {summary['method']} {summary['bits_per_weight']:.3f} bits/weight "
                  f"(all metadata), {summary['quantize_seconds']:.1f} s, peak {summary['peak_memory_mb']:.0f} MB")


@app.command("eval")
@clean_errors
def eval_cmd(
    model: str = typer.Argument(..., help="A lowbit output directory or an HF model directory."),
    base: Optional[str] = typer.Option(None, help="Unquantized model for the KL divergence (default: the source recorded in a lowbit output, when it exists)."),
    seqlen: Optional[int] = typer.Option(None, help="Context length (default min(2048, model max positions))."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate only the first N windows."),
    kl_windows: int = typer.Option(128, help="Windows used for the KL divergence."),
    batch_size: int = typer.Option(8),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """WikiText-2 test perplexity (GPTQ protocol) and KL divergence to the base model."""
    from lowbit.jobs import eval_job

    if base is None:
        info = Path(model) / "lowbit.json"
        if info.is_file():
            src = json.loads(info.read_text()).get("source_model")
            if src and Path(src).exists():
                base = src
    res = eval_job(model, base=base, seqlen=seqlen, max_windows=max_windows, kl_windows=kl_windows,
                   data=data, batch_size=batch_size)
    if as_json:
        print(json.dumps(res, indent=2))
        return
    line = (f"WikiText-2 test perplexity {res['ppl']:.3f} (seqlen {res['seqlen']}, {res['n_windows']} windows, "
            f"tokenizer {res['tokenizer']})")
    if "kl" in res:
        line += f"; KL(base‖model) {res['kl']:.5f} nats/token on {res['kl_windows']} windows, top-1 agreement {res['top1_agreement']:.3f}"
    print(line)


@reference_app.command("build")
@clean_errors
def reference_build(force: bool = typer.Option(False, help="Rebuild even if cached."),
                    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (default $LOWBIT_CACHE or ~/.cache/lowbit).")):
    """Train the tokenizer and the reference LLaMA model (cached by config) and print its path."""
    from lowbit.reference import build_reference

    print(build_reference(cache_dir=cache_dir, force=force))


@reference_app.command("path")
@clean_errors
def reference_path_cmd(cache_dir: Optional[Path] = typer.Option(None)):
    """Print where the reference model is (or would be) cached."""
    from lowbit.reference import reference_path

    print(reference_path(cache_dir=cache_dir))


@app.command()
@clean_errors
def demo(
    results: Path = typer.Option(Path("results"), help="Where demo.md / demo.json are written."),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    max_windows: Optional[int] = typer.Option(None, help="Perplexity on the first N windows only (default all)."),
    kl_windows: int = typer.Option(128, help="Windows used for the KL divergence."),
):
    """Build the reference model if needed, quantize it with RTN and GPTQ at 4 and 3 bits, evaluate, tabulate."""
    from lowbit.demo import run_demo

    run_demo(results, data=data, max_windows=max_windows, kl_windows=kl_windows)


if __name__ == "__main__":
    app()
