"""`gguf` with K-quant mixes (Q4_K_M/S, Q5_K_M/S, Q6_K, Q8_0) from an unquantized model, block scales fitted
to an importance matrix taken from lowbit's calibration data.

llama.cpp users run K-quants; this writes them directly (`lowbit export MODEL -f gguf --gguf-type Q4_K_M
[--imatrix]`), where MODEL is an unquantized HF directory (the float weights are what is quantized).

Which block type each tensor gets follows llama.cpp's `llama_tensor_get_type` for these mixes (src/
llama-quant.cpp; i is the layer, n the number of layers, "more bits" layers: i < n/8, i ≥ 7n/8 and
(i − n/8) mod 3 = 2, gqa = attention heads / key-value heads):

* Q2_K: Q2_K; attn_v Q3_K (Q4_K when gqa ≥ 4), ffn_down and attn_output Q3_K;
* Q3_K_S: Q3_K everywhere;
* Q3_K_M: Q3_K; attn_v Q5_K in the first two layers, Q4_K after; ffn_down Q5_K for i < n/16, Q4_K
  after; attn_output Q4_K;
* Q3_K_L: Q3_K; attn_v, ffn_down and attn_output Q5_K;
* Q4_K_M / Q5_K_M: Q4_K / Q5_K; attn_v and ffn_down Q6_K in the "more bits" layers;
* Q4_K_S: Q4_K; attn_v Q5_K in the first four layers, ffn_down Q5_K for i < n/8;
* Q5_K_S: Q5_K everywhere;
* Q6_K / Q8_0: that type everywhere;
* in every mix but Q8_0 the output matrix (the token embedding when the output is tied to it) is Q6_K.

A row whose length is not a multiple of 256 cannot hold K-quant super-blocks; like llama.cpp, it falls back
to a 32-weight type: Q2_K, Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0. (SmolLM2's 576-wide layers
therefore become Q5_0 under Q4_K_M and Q4_0 under Q2_K / Q3_K_*; only its 1536-wide ffn_down holds
K-quants.) Norms stay F32.

Importance matrix (`imatrix`): per quantized layer, the mean of x² per input column over the calibration
windows (the diagonal of the layer's Hessian up to a factor 2), collected by hooks in one pass over the
float model; the fit of every block then minimises Σ imatrix_c·(w − ŵ)², the diagonal part of the layer's
output error ‖X(W − Ŵ)ᵀ‖². The tied embedding, used as the output matrix, gets the output layer's input
statistics. Without it, ggml's default weights |w| + rms(block) are used. Block math: `formats.kquants`.

GPTQ codes (`gptq`: calibration windows): the codes are chosen by GPTQ's column sweep
(`methods.gptq_blocks`) instead of by nearest rounding, each block's scales fitted as above (the
imatrix is then diag H / 2) when the sweep reaches it; the file holds exactly the swept values. H of
every quantized layer comes from hooks on the float model (the inputs the float model gives each layer,
as llama.cpp's imatrix, not GPTQ's sequentially quantized ones), collected for as many consecutive
layers at a time as fit in `hessian_budget` bytes (one pass over the windows per such chunk). The token
embedding keeps nearest rounding: untied it has no Hessian; tied, it is also the output layer, but the
sweep would trade error between the columns of each row to suit the output layer's H alone, while each
row is also an input embedding looked up as it is (its scales still follow the output layer's imatrix).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.io.read import read_json
from lowbit.formats import kquants
from lowbit.progress import progress_iter

MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q8_0": "Q8_0"}


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(hf_name: str, mix: str, n_layers: int, tied: bool, gqa: int = 1) -> str:
    """The block type of one 2-D tensor under `mix` (before the row-length fallback)."""
    if mix in ("Q6_K", "Q8_0"):
        return mix
    if hf_name == "lm_head.weight" or (tied and hf_name == "model.embed_tokens.weight"):
        return "Q6_K"
    base = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K"}.get(mix, mix[:4])
    if not hf_name.startswith("model.layers."):
        return base
    i = int(hf_name.split(".")[2])
    more = use_more_bits(i, n_layers)
    if ".self_attn.v_proj." in hf_name:
        return {"Q2_K": "Q4_K" if gqa >= 4 else "Q3_K", "Q3_K_M": "Q5_K" if i < 2 else "Q4_K", "Q3_K_L": "Q5_K",
                "Q4_K_S": "Q5_K" if i < 4 else base, "Q4_K_M": "Q6_K" if more else base,
                "Q5_K_M": "Q6_K" if more else base}.get(mix, base)
    if ".mlp.down_proj." in hf_name:
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q5_K" if i < n_layers // 16 else "Q4_K", "Q3_K_L": "Q5_K",
                "Q4_K_S": "Q5_K" if i < n_layers // 8 else base, "Q4_K_M": "Q6_K" if more else base,
                "Q5_K_M": "Q6_K" if more else base}.get(mix, base)
    if ".self_attn.o_proj." in hf_name:
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix, base)
    return base


def block_type_for(hf_name: str, cols: int, mix: str, n_layers: int, tied: bool, gqa: int = 1) -> str:
    t = tensor_type(hf_name, mix, n_layers, tied, gqa)
    return t if cols % kquants.BLOCKS[t][0] == 0 else FALLBACK[t]


@torch.no_grad()
def collect_imatrix(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Linear layer name → mean over every calibration token of x² per input column (float32)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(_, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(hook(name)))
    was = model.training
    model.eval()
    try:
        for i in range(0, windows.shape[0], batch_size):
            model(windows[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {n: sums[n] / counts[n] for n in sums}


class _Hessians:
    """H = (2/N)·Σxxᵀ of each named linear on `windows`, collected lazily for a run of consecutive names
    (in the order they will be asked for) whose Hessians fit in `budget` bytes, one forward pass per run."""

    def __init__(self, model: nn.Module, order: list[str], windows: torch.Tensor, budget: int, progress: bool):
        self.model, self.order, self.windows, self.budget, self.progress = model, order, windows, budget, progress
        self.cache: dict[str, torch.Tensor] = {}

    def pop(self, name: str) -> torch.Tensor:
        from lowbit.pipeline.collect import collect_stats

        if name not in self.cache:
            self.cache.clear()
            run, size = [], 0
            for n in self.order[self.order.index(name):]:
                cols = self.model.get_submodule(n).weight.shape[1]
                if run and size + 4 * cols * cols > self.budget:
                    break
                run.append(n)
                size += 4 * cols * cols
            if self.progress:
                print(f"[gguf] Hessians of {len(run)} layers ({size / 2**20:.0f} MiB) from "
                      f"{self.windows.shape[0]} windows", flush=True)
            self.cache = {n: st.hessian for n, st in collect_stats(self.model, run, self.windows).items()}
        return self.cache.pop(name)


def export_gguf_kquants(model_dir: str | Path, out: str | Path, mix: str = "Q4_K_M", *,
                        imatrix: dict[str, torch.Tensor] | None = None, gptq: torch.Tensor | None = None,
                        hessian_budget: int = 2 * 2**30, damp_percent: float = 0.01, overwrite: bool = False,
                        progress: bool = False, model: nn.Module | None = None) -> dict:
    """Write `model_dir` (unquantized HF LLaMA-family model) as OUT/model.gguf in `mix`. Returns a summary:
    block types, bits per weight of the decoder linears as stored, whether an imatrix was used and how the
    codes were chosen. `gptq`: calibration windows [n, seqlen]; the codes then come from GPTQ's sweep
    against the fitted block scales. `model`: the model of `model_dir` already loaded (it is only read)."""
    from lowbit.exporters.gguf import _ARCHS, write_llama_gguf
    from lowbit.io.atomic import atomic_dir
    from lowbit.io.native import load_model, write_tokenizer
    from lowbit.methods.gptq_blocks import gptq_block_codes

    if mix not in MIXES:
        raise LowbitError(f"unknown K-quant mix {mix!r}: choose one of {', '.join(MIXES)}")
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"output directory {out} exists; pass --overwrite")
    if model is None:
        model, _ = load_model(str(model_dir))
    if getattr(model, "_lowbit_quantized", False):
        raise LowbitError(f"{model_dir} is a lowbit output: K-quants are fitted to the float weights; pass the "
                          "unquantized model (a lowbit Q4_0/Q4_1/Q8_0-compatible output exports with --gguf-type "
                          "Q4_0 | Q4_1 | Q8_0)")
    config = read_json(model_dir / "config.json", "not a model directory")
    config.pop("quantization_config", None)
    if _ARCHS.get(config.get("model_type")) is None:
        raise LowbitError(f"cannot export a {config.get('model_type')} model to gguf: lowbit writes the LLaMA family")
    n_layers = config["num_hidden_layers"]
    gqa = config["num_attention_heads"] // config.get("num_key_value_heads", config["num_attention_heads"])
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    state = model.state_dict()
    names = [n for n in state if not (tied and n == "lm_head.weight")]

    def layer(name: str) -> str | None:  # the linear whose inputs a 2-D tensor sees
        if tied and name == "model.embed_tokens.weight":
            return "lm_head" if "lm_head.weight" in linears else None
        return name.removesuffix(".weight") if name in linears else None

    def swept(name: str) -> bool:  # the tensors whose codes GPTQ chooses
        return name in linears and name != "model.embed_tokens.weight" and state[name].ndim == 2

    hessians = None
    if gptq is not None:
        # the tied embedding's scales want the output layer's mean x² = diag H / 2: its H comes first
        first = ["lm_head"] if (tied and imatrix is None and layer("model.embed_tokens.weight")) else []
        hessians = _Hessians(model, first + [layer(n) for n in names if swept(n)], gptq, hessian_budget, progress)
        if first:
            imatrix = {"lm_head": hessians.pop("lm_head").diagonal() / 2}
    tensors, types, bits, params = [], {}, 0, 0
    for name in progress_iter(names, f"gguf {mix}", progress):
        t = state[name].float()
        if t.ndim != 2:
            tensors.append((name, t.numpy(), None))
            continue
        qtype = block_type_for(name, t.shape[1], mix, n_layers, tied, gqa)
        key = layer(name)
        imp = imatrix.get(key) if (imatrix is not None and key is not None) else None
        if hessians is not None and swept(name):
            f, codes = gptq_block_codes(t, hessians.pop(key), qtype, imp, damp_percent)  # imp None: diag H / 2
            data = kquants.pack(f, codes)
        else:
            data = kquants.encode(t, qtype, imp)
        tensors.append((name, data.numpy(), qtype))
        types[name] = qtype
        if name in linears and name != "lm_head.weight":
            bits += t.numel() * kquants.bits_per_weight(qtype)
            params += t.numel()
    counts = Counter(types.values())
    summary = {"mix": mix, "types": dict(counts), "imatrix": imatrix is not None or gptq is not None,
               "codes": "gptq" if gptq is not None else "nearest",
               "bits_per_weight": bits / params if params else 0.0, "tensor_types": types}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_llama_gguf(tmp / "model.gguf", config, model_dir, tensors, mix)
        write_tokenizer(model_dir, tmp)
        (tmp / "lowbit-gguf.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
