"""The toy model: a tiny LLaMA trained from scratch on local text in seconds, for unit tests only.

It is far too weak to tell quantization methods apart (the reference model, SmolLM2-135M-Instruct, is
`lowbit.reference`), but it runs every code path on real trained weights. `build_tiny` trains a
byte-level BPE tokenizer and a 2-block LLaMA on tiny-shakespeare (the last tenth held out for the
perplexity in training.json) with a fixed seed and one thread, so a build is bit-identical on one machine.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lowbit import data
from lowbit.errors import LowbitError
from lowbit.io.atomic import atomic_dir

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]


class ToyConfig(BaseModel):
    """Architecture and training recipe of the toy model (its linears take 64 or 128 inputs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(512, ge=len(SPECIAL_TOKENS) + 256)  # byte alphabet + specials
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    max_position_embeddings: int = 64
    tie_word_embeddings: bool = False  # a separate lm_head that quantizers skip
    seqlen: int = 64
    batch_size: int = 16
    steps: int = 200
    lr: float = 1e-2
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_max_windows: int | None = 32


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style, so any text round-trips without <unk>)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=max_length)


def make_model(cfg: ToyConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    # HF initializes weights from the global generator; fork it so the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config).float()


def _batches(stream: torch.Tensor, seqlen: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of non-overlapping windows, a new random offset every epoch."""
    if stream.numel() < seqlen * batch_size + seqlen:
        raise LowbitError(f"training text has {stream.numel()} tokens; too short for batches of "
                          f"{batch_size} x {seqlen}")
    while True:
        offset = int(torch.randint(0, seqlen, (1,), generator=gen))
        n = (stream.numel() - offset) // seqlen
        windows = stream[offset:offset + n * seqlen].view(n, seqlen)
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield windows[order[i:i + batch_size]]


def _lr_factor(step: int, cfg: ToyConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(model: LlamaForCausalLM, stream: torch.Tensor, cfg: ToyConfig) -> list[dict]:
    """AdamW training; returns the loss curve as [{step, loss, lr}]."""
    gen = torch.Generator().manual_seed(cfg.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms: decaying them hurts
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    batches = _batches(stream, cfg.seqlen, cfg.batch_size, gen)
    curve: list[dict] = []
    model.train()
    for step in range(cfg.steps):
        x = next(batches)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        curve.append({"step": step + 1, "loss": round(loss.item(), 5), "lr": opt.param_groups[0]["lr"]})
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    model.eval()
    return curve


def perplexity(model: LlamaForCausalLM, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Perplexity by the project's one implementation (lowbit.eval.perplexity)."""
    from lowbit.eval.perplexity import perplexity as _perplexity

    return _perplexity(model, windows, batch_size=batch_size).ppl


def _build(out: Path, cfg: ToyConfig, train_text: str, eval_text: str) -> None:
    t0 = time.perf_counter()
    tokenizer = train_tokenizer([train_text], cfg.vocab_size, cfg.max_position_embeddings)
    stream = data.token_stream(tokenizer, [train_text])
    model = make_model(cfg, tokenizer)
    curve = train(model, stream, cfg)
    windows = data.eval_windows(tokenizer, eval_text, cfg.seqlen, cfg.eval_max_windows)
    ppl = perplexity(model, windows)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    report = {"config": cfg.model_dump(), "parameters": sum(p.numel() for p in model.parameters()),
              "eval": {"dataset": "tinyshakespeare-last-10pct", "seqlen": cfg.seqlen, "windows": windows.shape[0],
                       "perplexity": ppl},
              "wall_time_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__, "loss_curve": curve}
    (out / "training.json").write_text(json.dumps(report, indent=1))  # last: marks a complete build


def build_tiny(path: str | Path, seed: int = 0, steps: int = 200, data_path: str | Path | None = None,
               config: ToyConfig | None = None) -> Path:
    """The toy LLaMA trained on tiny-shakespeare, saved in HF format with its tokenizer (atomically)."""
    cfg = config or ToyConfig(seed=seed, steps=steps)
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / "training.json").is_file():
        raise LowbitError(f"{path} exists and is not a previous build; choose an empty or new directory")
    text = data.corpus_text(data.TINYSHAKESPEARE, data_path)
    split = len(text) * 9 // 10
    # One thread: tiny matmuls gain nothing from two, a second OpenMP thread stalls badly when other
    # processes share the cores, and a fixed count keeps results bit-identical.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with atomic_dir(path, overwrite=True) as tmp:
            _build(tmp, cfg, text[:split], text[split:])
    finally:
        torch.set_num_threads(before)
    return path


def load_toy(path: str | Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """(model in eval mode, tokenizer) from a directory written by build_tiny."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LowbitError(f"{path} holds no model (no config.json); build it with build_tiny()")
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)
