"""QAT on the reference model: RTN, GPTQ, QLoRA-style, LR-QAT, L4Q and LoQT at 4/3/2 bits (group 128 or
`--group-size`), and the training-memory comparison L4Q vs LoRA vs full-weight LSQ QAT.

    python bench/qat.py --bits 3                 # one bit width (results merge into bench/results/qat.*)
    python bench/qat.py --bits 4 3 2 --steps 100
    python bench/qat.py --bits 3 --group-size 64 --methods gptq l4q lr-qat --init-from gptq
    python bench/qat.py --bits 3 --methods qlora --rank 2 --adapter-dtype int8   # bits matched to g64
    python bench/qat.py --bits 3 --methods loqt loqt-lowrank   # LoQT re-quantized / kept as grid + factors
    python bench/qat.py --memory                 # peak memory per method, each in a fresh process

Every run is its own `lowbit quantize` / `lowbit finetune` process with one torch thread (OMP_NUM_THREADS=1:
on 2 shared cores two threads are several times slower). All QAT methods get the same data, steps, batch,
seed and schedule. Evaluation: WikiText-2 test perplexity on the first `--ppl-windows` windows of 256
tokens and KL(fp32 ‖ q) on the first `--kl-windows`.

Memory: a fresh process loads the model, swaps in the method's layers, resets its peak-RSS counter
(`/proc/self/clear_refs` = 5), runs `--memory-steps` optimizer steps, and reports VmHWM − RSS before training,
i.e. what training itself adds (activations, gradients, optimizer state, transient backward tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["method", "bits", "group_size", "rank", "bits_per_weight", "ppl", "kl", "top1_agreement", "steps",
           "train_seconds", "peak_memory_mb", "loss"]
MEM_COLUMNS = ["model", "method", "trainable_params", "rss_before_mb", "train_peak_mb", "train_added_mb", "seconds_per_step"]
ENV = dict(os.environ)
# Memory probes: large blocks always from mmap, so a freed tensor returns to the OS at once and VmHWM is the
# peak of live memory; with glibc's adaptive threshold, the transient [out, in] tensors of the QAT backwards
# land on the heap and fragment it, and VmHWM then measures the allocator, not the method.
MEM_ENV = {**ENV, "MALLOC_MMAP_THRESHOLD_": "131072"}


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd, env=ENV).returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")


def _merge(path: Path, rows: list[dict], key) -> list[dict]:
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    new_keys = {key(r) for r in rows}
    # rows of another model (none recorded: measured before rows carried it) are dropped, never mixed in one table
    models = {r.get("model") for r in rows}
    return [r for r in old if key(r) not in new_keys and r.get("model") in models] + rows


def quality(a) -> None:
    from lowbit.eval.protocol import get_protocol, model_key, provenance
    from lowbit.eval.report import results_table
    from lowbit.io.native import load_model
    from lowbit.jobs import eval_job
    from lowbit.reference import build_reference

    ref = str(build_reference())
    proto = get_protocol(a.profile)
    base, tok = load_model(ref)
    model_id = model_key(ref)  # outputs and rows of another reference model are never reused
    work = Path(a.work) / model_id
    rows = []
    a.provenance = provenance(ref, proto, training={"steps": a.steps, "batch_size": a.batch_size, "seqlen": 256,
                                                   "loss": a.loss, "lr": a.lr, "lr_quant": a.lr_quant})

    def evaluate(out: Path) -> dict:
        m, _ = load_model(str(out))
        ev = eval_job(str(out), model=m, tokenizer=tok, base_model=base, base_key=model_id, protocol=proto,
                      data=a.data, progress=False)
        return {"ppl": ev["ppl"], "kl": ev["kl"], "top1_agreement": ev["top1_agreement"]}

    for bits in a.bits:
        for method in a.methods:
            label = method if not a.init_from or method not in ("l4q", "lr-qat") else f"{method} ({a.init_from} init)"
            if method == "qlora" and a.adapter_dtype != "fp16":
                label += f" ({a.adapter_dtype} adapter)"
            if a.tag and method not in ("rtn", "gptq"):
                label += f" {a.tag}"
            g = a.group_size
            out = work / f"{label.replace(' ', '_').replace('(', '').replace(')', '')}-w{bits}g{g}r{a.rank}"
            if method in ("rtn", "gptq"):
                _run([sys.executable, "-m", "lowbit.cli", "quantize", ref, "-o", str(out), "--method", method,
                      "--bits", str(bits), "--group-size", str(g), "--calib-samples", str(proto.calib_samples),
                      "--calib-seqlen", str(proto.calib_seqlen), "--overwrite", "--quiet"])
                s = json.loads((out / "lowbit.json").read_text())["summary"]
                row = {"method": method, "bits": bits, "group_size": g, "bits_per_weight": s["bits_per_weight"],
                       "steps": 0, "train_seconds": s["quantize_seconds"], "peak_memory_mb": s["peak_memory_mb"]}
            else:
                cmd = [sys.executable, "-m", "lowbit.cli", "finetune", ref, "-o", str(out),
                       "--method", "loqt" if method.startswith("loqt") else method,
                       "--bits", str(bits), "--group-size", str(g), "--rank", str(a.rank), "--steps", str(a.steps),
                       "--lr", str(a.lr), "--lr-quant", str(a.lr_quant), "--batch-size", str(a.batch_size),
                       "--seqlen", "256", "--loss", a.loss, "--eval-every", "0", "--checkpoint-every", "0",
                       "--overwrite", "--quiet"]
                if method == "qlora":
                    cmd += ["--init-from", "gptq", "--adapter-dtype", a.adapter_dtype]
                if method == "spiel":  # quantized SpIEL on the GPTQ base (as qlora), trainable count = LoRA's
                    cmd += ["--spiel-base", "gptq", "--density", f"{lora_density(base, a.rank):.6f}",
                            "--reselect-every", str(max(2, a.steps // 4)), "--accumulate-steps", "2"]
                if method.startswith("loqt"):  # merge gaps scaled to the run: τ = steps / 3 (the paper: 100 of 10k+)
                    cmd += ["--update-gap", str(a.update_gap or max(1, a.steps // 3)),
                            "--loqt-export", "lowrank" if method == "loqt-lowrank" else "requantize"]
                if a.init_from and method in ("l4q", "lr-qat"):
                    cmd += ["--init-from", a.init_from]
                _run(cmd)
                info = json.loads((out / "lowbit.json").read_text())
                s = info["summary"]
                bpw = json.loads((out / "config.json").read_text())["quantization_config"]["bits_per_weight"]
                row = {"method": label, "bits": bits, "group_size": g, "bits_per_weight": bpw, "steps": a.steps,
                       "train_seconds": s["train_seconds"], "peak_memory_mb": s["peak_memory_mb"],
                       "loss": a.loss, "rank": a.rank}
            row.update(evaluate(out), model=model_id)
            print(row, flush=True)
            rows.append(row)
            _save([row], a)
    print(results_table(rows, COLUMNS)[0])


def lora_density(model, rank: int) -> float:
    """The SpIEL density whose trainable count equals LoRA's at `rank` over the model's decoder linears."""
    from lowbit.models.adapters import layer_weight
    from lowbit.qat.prepare import linear_names

    shapes = [layer_weight(model.get_submodule(n)).shape for n in linear_names(model)]
    return sum(rank * (o + i) for o, i in shapes) / sum(o * i for o, i in shapes)


NOTE = (
    "Reference model SmolLM2-135M-Instruct (dequantized Q4_1 weights). Evaluation: the protocol in each row's "
    "provenance (WikiText-2 test, seqlen 512, perplexity, KL(fp ‖ q) and top-1 agreement on the same windows). "
    "All linears of the decoder blocks quantized with groups of `group_size` input columns (576-wide inputs: a "
    "partial last group), asymmetric storage; embeddings in fp32. bits_per_weight counts everything stored, "
    "adapters included. QAT runs: `steps` optimizer steps of 4 × 256-token windows of C4 training documents "
    "(seed 0, the same batches for every method), loss `kd` (KL to the fp model), AdamW, lr 2e-3 (adapters) and "
    "1e-4 (steps/offsets), 10% warm-up then cosine, grad clip 1, alpha/rank = 1/rank. QLoRA-style = GPTQ base + "
    "LoRA exported as a low-rank term (fp16 factors). L4Q: L4Q_init, learned step and integer-snapped offset per "
    "group, LoRA merged before the quantizer. LR-QAT: min-max grid, fp32 Φ₀, learned s. LoQT: B trained beside "
    "the grid, P from the SVD of ∇W, 5 compensation iterations, merged at steps 0, τ, 2τ+1 (τ = steps/3), scale 1; "
    "`loqt` re-quantizes the final merge onto the first grid (a plain integer model), `loqt-lowrank` keeps B·P as "
    "fp16 factors. SpIEL: a sparse Δ on the GPTQ base with LoRA's trainable count (density = Σ r(in+out) / "
    "Σ in·out), dropped and regrown every steps/4 steps (p₀ 0.2, 2 accumulation steps), exported as the GPTQ grid "
    "plus the merged entries as fp16 outliers (values and positions counted). GPTQ/RTN: the "
    "protocol's calibration windows. train_seconds = optimisation only (quantize seconds for PTQ) on 2 CPU "
    "cores; peak_memory_mb = VmHWM of the whole process (model load included).")


# the settings NOTE describes; a run with others goes to qat_custom.* with its settings in the note
NOTE_SETTINGS = {"steps": 100, "batch_size": 4, "loss": "kd", "data": None}


def _save(rows: list[dict], a) -> None:
    """Merge `rows` into bench/results/qat.{json,md} under a lock (several bench processes may finish at once).
    A row is keyed by (model, method label, bits, group size, rank, loss); the note is `NOTE`."""
    order = a.order
    differ = {k: getattr(a, k) for k, v in NOTE_SETTINGS.items() if getattr(a, k) != v}
    stem, note = ("qat", NOTE) if not differ else ("qat_custom", f"{NOTE} NOT the settings of these rows: {differ}.")
    import fcntl

    from lowbit.eval.report import write_results

    RESULTS.mkdir(parents=True, exist_ok=True)
    lock = os.open(RESULTS, os.O_RDONLY)  # flock on the directory: no lock file left in the tree
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        key = lambda r: (r.get("model"), r["method"], r["bits"], r["group_size"],  # noqa: E731
                         r.get("rank"), r.get("loss"))
        path = RESULTS / a.profile / f"{stem}.json"
        merged = _merge(path, rows, key)
        first = lambda r: order.index(r["method"].split()[0]) if r["method"].split()[0] in order else 99  # noqa: E731
        merged.sort(key=lambda r: (-r["bits"], -r["group_size"], first(r), r["method"]))
        write_results(merged, RESULTS / a.profile, stem, COLUMNS, note=note, provenance=a.provenance)
    finally:
        os.close(lock)  # releases the flock


# ---- memory


def _wide_model():
    """A randomly initialised LLaMA whose linears dominate memory (hidden 1024, 4 layers, 50 M linear
    weights): the regime of the paper's memory claim, next to the reference model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float()


def probe(method: str, steps: int, batch: int, which: str = "reference", seqlen: int = 256) -> None:
    """In a fresh process: what training one method adds to resident memory."""
    import torch

    torch.set_num_threads(1)
    from lowbit.io.native import load_model
    from lowbit.qat.config import parse_qat_config
    from lowbit.qat.prepare import needs_ptq, prepare_model, ptq_weights, trainable
    from lowbit.qat.trainer import window_loss
    from lowbit.reference import reference_path

    model = load_model(str(reference_path()))[0] if which == "reference" else _wide_model()
    d = {"method": method, "bits": 4, "group_size": 128, "rank": 4}
    if method == "lora":
        d = {"method": "lora", "rank": 4}
    if method == "spiel":  # on the float base, as many trainable entries as LoRA r = 4
        d = {"method": "spiel", "density": lora_density(model, 4)}
    if method == "qlora":
        d["init_from"] = "rtn"  # the base's provenance does not change training memory
    if method == "full-fp":
        for p in model.parameters():
            p.requires_grad_(True)
        params = [p for p in model.parameters()]
    else:
        cfg = parse_qat_config(d)
        kind = needs_ptq(cfg)
        layers = prepare_model(model, cfg, ptq=ptq_weights(model, cfg, kind, None) if kind else None)
        main, quant = trainable(layers)
        params = list(main.values()) + list(quant.values())
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    ids = torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    import gc

    gc.collect()
    rss0 = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t = time.perf_counter()
    model.train()
    for _ in range(steps):
        (window_loss(model, ids, mask, "ce") / mask[:, 1:].sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = (time.perf_counter() - t) / steps
    peak = _status("VmHWM")
    print(json.dumps({"method": method, "trainable_params": sum(p.numel() for p in params),
                      "rss_before_mb": rss0, "train_peak_mb": peak, "train_added_mb": peak - rss0,
                      "seconds_per_step": dt}))


def _status(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**10
    raise RuntimeError(key)


def memory(a) -> None:
    from lowbit.eval.report import results_table, write_results

    rows = []
    for which, batch, seqlen in (("reference", a.batch_size, 256), ("wide", 1, 128)):
        for method in a.memory_methods:
            r = subprocess.run([sys.executable, __file__, "--probe", method, "--memory-steps", str(a.memory_steps),
                                "--batch-size", str(batch), "--probe-model", which, "--probe-seqlen", str(seqlen)],
                               env=MEM_ENV, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(r.stderr)
            rows.append({"model": f"{which} ({batch}×{seqlen} tokens)",
                         **json.loads(r.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    note = (f"fp32 weights, {a.memory_steps} AdamW steps after the peak counter is reset; train_added_mb = VmHWM − "
            "RSS before training. reference: SmolLM2-135M (106 M weights in its linears); wide: a random "
            "LLaMA with hidden 1024, 4 layers (50 M weights in its linears). lora: LoRA r=4 on the float model; "
            "spiel: SpIEL on the float model with LoRA r=4's trainable count (no reselection inside the probe); "
            "l4q: L4Q r=4, 4-bit g128, W₀ fp32; qlora: LoRA on a dequantized RTN base; lr-qat: r=4, fp32 Φ₀; "
            "lsq: every weight trainable with LSQ+ (full QAT); full-fp: plain full fine-tuning. One process per row.")
    note += (" Run with MALLOC_MMAP_THRESHOLD_=131072 so that freed large tensors leave the resident set"
             " (see MEM_ENV).")
    write_results(rows, RESULTS / a.profile, "qat_memory", MEM_COLUMNS, note=note)
    print(results_table(rows, MEM_COLUMNS)[0])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[3])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "qlora", "lr-qat", "l4q"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--adapter-dtype", default="fp16", choices=["fp16", "int8"], help="qlora: adapter storage.")
    ap.add_argument("--update-gap", type=int, default=None, help="loqt: τ (default steps // 3).")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-quant", type=float, default=1e-4)
    ap.add_argument("--loss", default="kd", choices=["ce", "kd"])
    ap.add_argument("--init-from", default=None)
    ap.add_argument("--tag", default="", help="Appended to the QAT rows' method label (e.g. a changed lr).")
    ap.add_argument("--profile", default="quick", choices=["quick", "full"], help="evaluation protocol")
    ap.add_argument("--data", default=None)
    ap.add_argument("--work", default="/tmp/lowbit-bench-qat")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--memory-methods", nargs="+", default=["lora", "spiel", "l4q", "qlora", "lr-qat", "lsq", "full-fp"])
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-model", default="reference", help=argparse.SUPPRESS)
    ap.add_argument("--probe-seqlen", type=int, default=256, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.order = ["rtn", "gptq", "qlora", "spiel", "lr-qat", "l4q", "loqt", "loqt-lowrank", "lsq", "lora"]
    if a.probe:
        probe(a.probe, a.memory_steps, a.batch_size, a.probe_model, a.probe_seqlen)
    elif a.memory:
        memory(a)
    else:
        quality(a)
