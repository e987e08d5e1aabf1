"""Structured pruning of the reference model: policy-gradient masks against one-shot scores and UDFC.

    python bench/structured_pruning.py [--keep 0.9 0.8 0.7] [--pg-steps 60] [--profile quick]

Structures: attention KV groups (3 per layer on SmolLM2: each a key/value head and its 3 query heads) and
MLP channels (1536 per layer), removed in the same share (1 − keep) of each kind. Rows per keep ratio:
- magnitude / activation: one-shot scores (`lowbit.prune.structured.scores`): the same number of channels
  in every layer, KV groups by a global ranking (3 per layer: a per-layer share of 10–30 % does not
  exist), no weight update;
- activation+ls: the same masks, then o_proj / down_proj refit by least squares on calibration inputs;
- pg+ls: policy-gradient masks (`lowbit.prune.pg`), global over layers (widths differ per layer), started
  from the activation scores, then the least-squares refit; its budget (steps, forward passes, tokens,
  seconds) is in the row;
- search+ls: the efficient-LLM evolutionary search (`lowbit.prune.search`) over per-layer group counts
  and channel shares (mask mutation, crossover, a parameter budget equal to the uniform keep), fitness the
  cross-entropy on --search-windows C4 training windows, then the least-squares reformation;
- udfc / activation+ls (mlp): MLP channels only (UDFC prunes channels only), UDFC data-free closed form
  against the activation mask with the least-squares refit;
- depth-bi / depth: whole layers (keep = share of the 30 layers kept): ShortGPT's one-shot Block
  Influence (drop the layers that turn the hidden state least), and the policy-gradient depth search
  (`lowbit.prune.depth`, started from it, --pg-steps steps). No refit.
`--merge` keeps the rows of earlier runs except those (method, keep) run now.
Masked structures are zeroed at the inputs of o_proj / down_proj, the same function as slicing them out
(tested); `params_removed` counts the weights a slice deletes, over the decoder blocks' linear weights.
Evaluation: the shared protocol (`--profile`), KL to the unpruned model on the same windows.
Writes bench/results/<profile>/structured_pruning.{json,md} with provenance.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["method", "structures", "keep", "params_removed", "ppl", "kl", "top1_agreement", "pg_steps",
           "forward_passes", "seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.9, 0.8, 0.7])
    ap.add_argument("--pg-steps", type=int, default=60)
    ap.add_argument("--pg-batch", type=int, default=4, help="windows of --pg-seqlen tokens per policy sample")
    ap.add_argument("--pg-seqlen", type=int, default=128)
    ap.add_argument("--pg-lr", type=float, default=2e-3)
    ap.add_argument("--search-generations", type=int, default=8)
    ap.add_argument("--search-population", type=int, default=16)
    ap.add_argument("--search-windows", type=int, default=8, help="C4 training windows of the search fitness")
    ap.add_argument("--calib", type=int, default=32, help="calibration windows for scores and the refit")
    ap.add_argument("--profile", default="quick", choices=["quick", "full"])
    ap.add_argument("--methods", nargs="+", default=["magnitude", "activation", "activation+ls", "pg+ls", "search+ls",
                                                     "udfc", "activation+ls-mlp"])
    ap.add_argument("--data", default=None)
    ap.add_argument("--merge", action="store_true", help="keep earlier rows except the (method, keep) pairs run now")
    a = ap.parse_args()

    from lowbit import data as datasets
    from lowbit.eval.evaluate import protocol_windows
    from lowbit.eval.protocol import get_protocol, model_key, provenance
    from lowbit.eval.report import results_table, write_results
    from lowbit.io.native import load_model
    from lowbit.jobs import eval_job
    from lowbit.prune import structured as st
    from lowbit.prune.pg import pg_masks
    from lowbit.prune.policy import hard_mask
    from lowbit.reference import build_reference

    torch.manual_seed(0)
    ref = str(build_reference())
    proto = get_protocol(a.profile)
    base, tok = load_model(ref)
    base.eval()
    key = model_key(ref)
    ev_windows = protocol_windows(tok, proto, a.data)
    calib = datasets.calibration_windows(tok, datasets.c4_split("calib", a.data), a.calib, proto.calib_seqlen, 0)
    pg_windows = datasets.calibration_windows(tok, datasets.c4_split("train", a.data),
                                              max(a.pg_batch, a.pg_steps * a.pg_batch), a.pg_seqlen, 1)
    S0 = st.find_structures(base)
    print(f"moments of o_proj / down_proj inputs on {a.calib} windows ...", flush=True)
    moments = st.input_moments(base, S0, calib)
    total = sum(m.weight.numel() for _, attn, mlp in S0.blocks
                for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    rows = []
    if a.merge:
        import json

        old = RESULTS / a.profile / "structured_pruning.json"
        rows = [r for r in (json.loads(old.read_text())["rows"] if old.is_file() else [])
                if not (r["method"] in a.methods and r["keep"] in a.keep)]

    def evaluate(model, g, c, label, structures, keep, extra):
        with st.masked(model, st.find_structures(model), g.float(), c.float()):
            ev = eval_job(f"{label}-{keep}", model=model, tokenizer=tok, base_model=base, base_key=key, protocol=proto,
                          windows=ev_windows, progress=False)
        row = {"method": label, "structures": structures, "keep": keep,
               "params_removed": S0.parameters_removed(g, c) / total, "ppl": ev["ppl"], "kl": ev["kl"],
               "top1_agreement": ev["top1_agreement"], "pg_steps": 0, "forward_passes": 0, **extra}
        print(row, flush=True)
        rows.append(row)
        write_results(rows, RESULTS / a.profile, "structured_pruning", COLUMNS, note=note(a),
                      provenance=provenance(ref, proto, pruning=vars(a)))

    all_groups = torch.ones(S0.n_groups, dtype=torch.bool)
    for keep in a.keep:
        gs_m, cs_m = st.scores(S0, "magnitude")
        gs_a, cs_a = st.scores(S0, "activation", moments)
        # KV groups: 3 per layer, so no per-layer share but 1/3 steps exists: every method keeps the same
        # global count of groups (the largest scores); channels: every layer the same width for the one-shot rows
        g_a, c_a = hard_mask(gs_a, keep), st.per_layer_mask(cs_a, S0.n_channels, keep)
        for method in a.methods:
            t0 = time.perf_counter()
            model = base
            extra = {}
            if method == "magnitude":
                g, c, structures = hard_mask(gs_m, keep), st.per_layer_mask(cs_m, S0.n_channels, keep), "heads+mlp"
            elif method == "activation":
                g, c, structures = g_a, c_a, "heads+mlp"
            elif method in ("activation+ls", "activation+ls-mlp"):
                g = g_a if method == "activation+ls" else all_groups
                c, structures = c_a, "heads+mlp" if method == "activation+ls" else "mlp"
                model = copy.deepcopy(base)
                st.compensate(st.find_structures(model), g, c, moments)
            elif method == "pg+ls":
                structures = "heads+mlp"
                g, c, rec = pg_masks(base, S0, pg_windows, keep, moments, steps=a.pg_steps, batch_size=a.pg_batch,
                                     lr=a.pg_lr, progress=lambda t, r: print(f"  pg step {t}: loss {r['loss']:.4f}",
                                                                             flush=True) if t % 10 == 0 else None)
                extra = {"pg_steps": a.pg_steps, "forward_passes": rec["forward_passes"],
                         "changed_vs_start": rec["changed_vs_start"],
                         "pg_tokens": rec["forward_passes"] * a.pg_batch * a.pg_seqlen}
                model = copy.deepcopy(base)
                st.compensate(st.find_structures(model), g, c, moments)
            elif method == "search+ls":
                from lowbit.prune.search import search_masks

                structures = "heads+mlp"
                g, c, rec = search_masks(base, S0, pg_windows[:a.search_windows], keep, moments,
                                         generations=a.search_generations, population=a.search_population,
                                         progress=lambda gen, r: print(f"  search generation {gen}: {r}", flush=True))
                extra = {"forward_passes": rec["evaluations"] * ((a.search_windows + 3) // 4),
                         "search_generations": a.search_generations, "start_fitness": rec["start_fitness"],
                         "best_fitness": rec["best_fitness"], "groups_per_layer": rec["groups_per_layer"],
                         "channels_per_layer": rec["channels_per_layer"]}
                model = copy.deepcopy(base)
                st.compensate(st.find_structures(model), g, c, moments)
            elif method in ("depth", "depth-bi"):
                from lowbit.prune.depth import block_influence, expand, pg_layer_mask
                from lowbit.prune.policy import hard_mask as top

                structures = "layers"
                if method == "depth-bi":
                    lm = top(block_influence(base, S0, calib), keep)
                else:
                    lm, rec = pg_layer_mask(base, S0, pg_windows, keep, steps=a.pg_steps, batch_size=a.pg_batch,
                                            lr=a.pg_lr)
                    extra = {"pg_steps": a.pg_steps, "forward_passes": rec["forward_passes"],
                             "changed_vs_start": rec["changed_vs_start"]}
                extra["layers_dropped"] = torch.nonzero(~lm).flatten().tolist()
                g, c = (m.bool() for m in expand(S0, lm))
            elif method == "udfc":
                from lowbit.prune.config import PruneConfig
                from lowbit.prune.hf import prune_hf

                model, report, _ = prune_hf(base, PruneConfig(ratio=round(1 - keep, 4), compensation="udfc"))
                structures = "mlp"
                # the sliced model: no masks to apply; count what it removed
                S1 = st.find_structures(model)
                g = all_groups
                c = torch.ones(S1.n_all_channels, dtype=torch.bool)
                removed = S0.n_channels - S1.n_channels
                extra = {"params_removed_override": removed * len(S0.blocks) * S0.channel_params / total}
            else:
                raise SystemExit(f"unknown method {method}")
            extra["seconds"] = time.perf_counter() - t0
            override = extra.pop("params_removed_override", None)
            evaluate(model, g, c, method, structures, keep, extra)
            if override is not None:
                rows[-1]["params_removed"] = override
    print(results_table(rows, COLUMNS)[0])
    write_results(rows, RESULTS / a.profile, "structured_pruning", COLUMNS, note=note(a),
                  provenance=provenance(ref, proto, pruning=vars(a)))


def note(a) -> str:
    return ("Reference model SmolLM2-135M-Instruct; the shared evaluation protocol of the provenance (WikiText-2 "
            "test windows, KL to the unpruned model). keep = share of KV groups and of MLP channels kept "
            "(heads+mlp) or of MLP channels only (mlp); params_removed = weights a slice deletes over the decoder "
            f"blocks' linear weights. Scores and the least-squares refit use {a.calib} C4 calibration windows; "
            f"pg+ls: {a.pg_steps} policy steps of 2 sampled masks on {a.pg_batch}×{a.pg_seqlen}-token C4 training "
            f"batches, lr {a.pg_lr}, cosine, baseline window 5, the authors' normalised score, started from the "
            "activation scores (the paper: ~15k steps on 120k sequences). search+ls: "
            f"{a.search_generations} generations, population {a.search_population}, 8 mutations + 4 crossovers "
            f"per generation, α 0.8, fitness on {a.search_windows}×{a.pg_seqlen} C4 training tokens (the paper: "
            "population 100, 50 generations). udfc: data-free closed-form "
            "compensation into down_proj, MLP channels only, every layer the same width. depth-bi / depth: whole "
            "layers, keep = share of the layers kept (ShortGPT's Block Influence on the calibration windows; the "
            "policy-gradient depth search with the pg+ls budget, started from it), no refit. 2 CPU cores.")


if __name__ == "__main__":
    main()
