"""`gguf` with K-quant mixes (Q4_K_M/S, Q5_K_M/S, Q6_K, Q8_0) from an unquantized model, block scales fitted
to an importance matrix taken from lowbit's calibration data.

llama.cpp users run K-quants; this writes them directly (`lowbit export MODEL -f gguf --gguf-type Q4_K_M
[--imatrix]`), where MODEL is an unquantized HF directory (the float weights are what is quantized).

Which block type each tensor gets follows llama.cpp's `llama_tensor_get_type` for these mixes:

* Q4_K_M: Q4_K everywhere, but Q6_K for `attn_v` and `ffn_down` in the "more bits" layers (the first and
  last eighth of the blocks and every third one between: i < n/8, i ≥ 7n/8, (i − n/8) mod 3 = 2) and for
  the output matrix (the token embedding when the output is tied to it);
* Q4_K_S: Q4_K everywhere, the output Q6_K;
* Q5_K_M / Q5_K_S: the same with Q5_K in place of Q4_K;
* Q6_K / Q8_0: that type everywhere.

A row whose length is not a multiple of 256 cannot hold K-quant super-blocks; like llama.cpp, it falls back
to a 32-weight type: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0. (SmolLM2's 576-wide layers therefore become Q5_0 under
Q4_K_M; only its 1536-wide ffn_down holds K-quants.) Norms stay F32.

Importance matrix (`imatrix`): per quantized layer, the mean of x² per input column over the calibration
windows (the diagonal of the layer's Hessian up to a factor 2), collected by hooks in one pass over the
float model; the fit of every block then minimises Σ imatrix_c·(w − ŵ)², the diagonal part of the layer's
output error ‖X(W − Ŵ)ᵀ‖². The tied embedding, used as the output matrix, gets the output layer's input
statistics. Without it, ggml's default weights |w| + rms(block) are used. Block math: `formats.kquants`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.formats import kquants

MIXES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0")
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q8_0": "Q8_0"}


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(hf_name: str, mix: str, n_layers: int, tied: bool) -> str:
    """The block type of one 2-D tensor under `mix` (before the row-length fallback)."""
    if mix in ("Q6_K", "Q8_0"):
        return mix
    output = hf_name == "lm_head.weight" or (tied and hf_name == "model.embed_tokens.weight")
    if output:
        return "Q6_K"
    base = mix[:4]  # Q4_K | Q5_K
    if mix.endswith("_M") and (".self_attn.v_proj." in hf_name or ".mlp.down_proj." in hf_name):
        i = int(hf_name.split(".")[2])
        return "Q6_K" if use_more_bits(i, n_layers) else base
    return base


def block_type_for(hf_name: str, cols: int, mix: str, n_layers: int, tied: bool) -> str:
    t = tensor_type(hf_name, mix, n_layers, tied)
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


def export_gguf_kquants(model_dir: str | Path, out: str | Path, mix: str = "Q4_K_M", *,
                        imatrix: dict[str, torch.Tensor] | None = None, overwrite: bool = False,
                        progress: bool = False, model: nn.Module | None = None) -> dict:
    """Write `model_dir` (unquantized HF LLaMA-family model) as OUT/model.gguf in `mix`. Returns a summary:
    block types, bits per weight of the decoder linears as stored, and whether an imatrix was used.
    `model`: the model of `model_dir` already loaded (it is only read), to spare loading it again."""
    from lowbit.exporters.gguf import _ARCHS, write_llama_gguf
    from lowbit.io.atomic import atomic_dir
    from lowbit.io.native import load_model, write_tokenizer
    from lowbit.progress import progress_iter

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
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    if _ARCHS.get(config.get("model_type")) is None:
        raise LowbitError(f"cannot export a {config.get('model_type')} model to gguf: lowbit writes the LLaMA family")
    n_layers = config["num_hidden_layers"]
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    state = model.state_dict()
    names = [n for n in state if not (tied and n == "lm_head.weight")]
    tensors, types, bits, params = [], {}, 0, 0
    for name in progress_iter(names, f"gguf {mix}", progress):
        t = state[name].float()
        if t.ndim != 2:
            tensors.append((name, t.numpy(), None))
            continue
        qtype = block_type_for(name, t.shape[1], mix, n_layers, tied)
        imp = None
        if imatrix is not None:
            key = "lm_head" if (tied and name == "model.embed_tokens.weight") else name.removesuffix(".weight")
            imp = imatrix.get(key)
        tensors.append((name, kquants.encode(t, qtype, imp).numpy(), qtype))
        types[name] = qtype
        if name in linears and name != "lm_head.weight":
            bits += t.numel() * kquants.bits_per_weight(qtype)
            params += t.numel()
    counts = Counter(types.values())
    summary = {"mix": mix, "types": dict(counts), "imatrix": imatrix is not None,
               "bits_per_weight": bits / params if params else 0.0, "tensor_types": types}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_llama_gguf(tmp / "model.gguf", config, model_dir, tensors, mix)
        write_tokenizer(model_dir, tmp)
        (tmp / "lowbit-gguf.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
