"""`gguf`: a llama.cpp model file whose blocks hold lowbit's own codes (no re-quantization).

ggml block types (ggml-common.h; k-quants PR #1684), 32 weights along the input dimension per block:
    Q4_0  fp16 d, 16 bytes of nibbles        ŵ = (q − 8)·d
    Q4_1  fp16 d, fp16 m, 16 bytes           ŵ = q·d + m
    Q8_0  fp16 d, 32 int8                    ŵ = q8·d
Nibble j of a block sits in byte j % 16, low half for j < 16, high half otherwise. Our grid maps exactly:
a symmetric 4-bit grid (zero 8) is Q4_0 with d = s; an asymmetric one is Q4_1 with d = s, m = −z·s when
that product is an fp16 number (checked, else refused); a symmetric 8-bit grid (zero 128) is Q8_0 with
q8 = q − 128. Groups of 32·k columns (and per-channel grids) repeat their scale over k blocks; a partial
last group (input dimension not a multiple of the group size, still of 32) covers fewer blocks. Anything
else (3-bit, other groups, codebooks, outliers, low-rank terms) is refused: re-quantizing would change
the weights. LLaMA-family tensors are renamed and Q/K rows permuted as llama.cpp's convert_hf_to_gguf.py
does (a row permutation: blocks stay intact); unquantized tensors are written in F32.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.io.read import read_json
from lowbit.exporters.card import model_card
from lowbit.exporters.common import Source, group_size_of, per_row, plain_tensors, refuse, require_uniform

GGUF_TYPES = ("Q4_0", "Q4_1", "Q8_0")
BLOCK = 32
_ARCHS = {"llama": "llama", "mistral": "llama"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str | None:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        mod, leaf = ".".join(parts[3:-1]), parts[-1]
        if mod in _LAYER:
            return f"blk.{parts[2]}.{_LAYER[mod]}.{leaf}"
    return None


def _permute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: per head, interleave the two rotary halves (convert_hf_to_gguf permute)."""
    r = x.shape[0]
    return x.reshape(n_head, 2, r // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def block_type(qw, forced: str | None = None) -> str:
    """The ggml type holding `qw` exactly, or raise why not."""
    g, (rows, cols) = qw.grid, qw.shape
    gs = group_size_of(g, cols)
    if gs % BLOCK or cols % BLOCK:
        raise ValueError(f"group size {gs} / input dimension {cols} not a multiple of the 32-weight block")
    if g.g_idx is not None:
        raise ValueError("act-order g_idx (dynamic groups) cannot be expressed as consecutive blocks")
    if g.bits == 4 and g.symmetric:
        t = "Q4_0"
    elif g.bits == 4:
        s, z = per_row(g, rows)
        m = -z.float() * s.float()
        if not torch.equal(m.half().float(), m):
            raise ValueError("Q4_1's fp16 minimum m = −zero·scale is not exact for some groups")
        t = "Q4_1"
    elif g.bits == 8 and g.symmetric:
        t = "Q8_0"
    else:
        raise ValueError(f"no ggml block type holds a {g.bits}-bit {'symmetric' if g.symmetric else 'asymmetric'} "
                         "grid exactly (Q4_0: symmetric 4-bit, Q4_1: asymmetric 4-bit, Q8_0: symmetric 8-bit)")
    if forced is not None and forced != t:
        raise ValueError(f"the grid fits {t}, not {forced}")
    return t


def block_bytes(qw, qtype: str) -> np.ndarray:
    """[rows, cols/32 · bytes per block] uint8 in ggml's block layout."""
    g, (rows, cols) = qw.grid, qw.shape
    nb = cols // BLOCK
    s, z = per_row(g, rows)
    rep = group_size_of(g, cols) // BLOCK
    d = s.to(torch.float16).repeat_interleave(rep, dim=1)[:, :nb]  # [rows, nb]; a partial group has fewer blocks
    parts = [d.numpy().view(np.uint8).reshape(rows, nb, 2)]
    q = qw.codes.reshape(rows, nb, BLOCK)
    if qtype == "Q4_1":
        m = (-z.float() * s.float()).to(torch.float16).repeat_interleave(rep, dim=1)[:, :nb]
        parts.append(m.numpy().view(np.uint8).reshape(rows, nb, 2))
    if qtype in ("Q4_0", "Q4_1"):
        parts.append((q[..., :16] | (q[..., 16:] << 4)).numpy().astype(np.uint8))
    else:
        parts.append((q.to(torch.int16) - 128).to(torch.int8).numpy().view(np.uint8))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _tokenizer_metadata(w, path: Path) -> bool:
    f = path / "tokenizer.json"
    if not f.is_file():
        return False
    tj = read_json(f, "the tokenizer", "the tokenizer file is damaged")
    model = tj.get("model", {})
    if model.get("type") != "BPE" or (tj.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        return False
    vocab = dict(model["vocab"])
    for a in tj.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
    tokens = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in tj.get("added_tokens", []) if a.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])
    w.add_token_types([3 if i in special else (5 if t is None else 1) for i, t in enumerate(tokens)])
    w.add_token_merges(merges)
    return True


def write_llama_gguf(path: Path, c: dict, model_dir: Path, tensors: list[tuple[str, np.ndarray, str | None]],
                     file_type: str) -> None:
    """One LLaMA-family GGUF file: hyperparameters from the HF config `c`, the tokenizer of `model_dir`, and
    `tensors` as (HF name, array, ggml type or None for a float array; a block type's array is its bytes,
    one row per weight row). Q/K rows are permuted as llama.cpp's converter does."""
    import gguf

    n_head = c["num_attention_heads"]
    n_kv = c.get("num_key_value_heads") or n_head
    head_dim = c.get("head_dim") or c["hidden_size"] // n_head
    rope = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(Path(model_dir).name)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(c["vocab_size"])
    w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{file_type}"))
    if _tokenizer_metadata(w, Path(model_dir)):
        for key, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                        ("pad_token_id", w.add_pad_token_id)):
            v = c.get(key)
            if isinstance(v, int):
                fn(v)
    for hf, a, qtype in tensors:
        name = gguf_name(hf)
        if name is None:
            raise LowbitError(f"cannot export tensor {hf} to gguf: no llama.cpp name for it")
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            a = _permute_rows(a, n_head if ".attn_q." in name else n_kv)
        if qtype is None:
            w.add_tensor(name, np.ascontiguousarray(a))
        else:
            w.add_tensor(name, np.ascontiguousarray(a), raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def export_gguf(src: Source, out: Path, *, tensor_type: str | None = None, overwrite: bool = False,
                lowrank_adapter: bool = False) -> Path:
    from lowbit.io.atomic import atomic_dir
    from lowbit.io.native import write_tokenizer

    if tensor_type is not None and tensor_type not in GGUF_TYPES:
        raise LowbitError(f"unknown GGUF type {tensor_type!r} for a lowbit output: it is written with "
                          f"{', '.join(GGUF_TYPES)} (the block types its grids fit exactly); K-quant mixes are "
                          "made from the unquantized model (lowbit export MODEL -f gguf --gguf-type Q4_K_M)")
    arch = _ARCHS.get(src.config.get("model_type"))
    if arch is None:
        raise LowbitError(f"cannot export a {src.config.get('model_type')} model to gguf: lowbit writes the "
                          "LLaMA family; use --format dequantized and llama.cpp's convert_hf_to_gguf.py")
    if lowrank_adapter:
        raise LowbitError("gguf export does not write LoRA adapters; use --format peft-lora for the low-rank term")
    require_uniform(src, "gguf", (4, 8), split_lowrank=False)
    types = {}
    for name, qw in src.qweights.items():
        try:
            types[name] = block_type(qw, tensor_type)
        except ValueError as e:
            raise refuse("gguf", name, f"cannot be stored exactly: {e}", "use --format compressed-tensors or "
                         "dequantized (and llama-quantize to re-quantize, which changes the weights)") from None
    counts = Counter(types.values())
    main = counts.most_common(1)[0][0]
    plain = plain_tensors(src, torch.float32)
    tensors = [(hf, t.numpy(), None) for hf, t in plain.items()]
    tensors += [(f"{hf}.weight", block_bytes(qw, types[hf]), types[hf]) for hf, qw in src.qweights.items()]
    bpb = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
    n = sum(q.shape[0] * q.shape[1] for q in src.qweights.values())
    file_bits = sum(q.shape[0] * q.shape[1] // BLOCK * bpb[types[k]] * 8 for k, q in src.qweights.items()) / n
    how = (f"# llama.cpp\nllama-cli -m {out.name}/model.gguf -p 'Once upon a time'\n"
           f"# transformers (dequantizes on load)\nAutoModelForCausalLM.from_pretrained('{out.name}', gguf_file='model.gguf')")
    notes = [f"Block types: {dict(counts)}; unquantized tensors in F32. The blocks hold lowbit's own codes and "
             "scales, so llama.cpp computes with exactly the quantized weights (Q4_1's m = −zero·scale is fp16-exact).",
             "Groups larger than 32 repeat their scale in every 32-weight block, so the file costs more bits per "
             "weight than the lowbit output."]
    card = model_card(src, f"GGUF ({'/'.join(sorted(counts))})", loads_with="llama.cpp, transformers (gguf_file=)",
                      how=how, notes=notes, file_bits=file_bits)
    if out.resolve() == src.path.resolve():
        raise LowbitError(f"output directory {out} is the input; choose another one")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_llama_gguf(tmp / "model.gguf", src.config, src.path, tensors, main)
        write_tokenizer(src.path, tmp)
        (tmp / "README.md").write_text(card)
    return out
