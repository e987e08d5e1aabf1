"""The native lowbit format: one directory, readable without pickle.

    config.json        the model's HF config + `quantization_config` (quant_method "lowbit", per-layer meta)
    model.safetensors  every non-quantized tensor under its state_dict name, and each quantized layer's
                       `QuantizedWeight.to_state()` tensors under `{module_name}.{key}`
    tokenizer files    copied from the source directory or written by `tokenizer.save_pretrained`
    lowbit.json        provenance (version, recipe, caller's extras) and a sha256 of every other file

Saving is atomic (`atomic_dir`); loading checks everything it can and turns every kind of damage —
missing file, bad JSON, flipped byte, truncation, missing or misshapen tensor — into a `LowbitError`.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import torch
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.fingerprint import file_sha256
from lowbit.formats.quantized_weight import QuantizedWeight, bit_counts
from lowbit.io.atomic import atomic_dir
from lowbit.io.read import check_safetensors_dir, dtype_kwargs, read_json, read_safetensors

FORMAT_VERSION = 1
CONFIG, WEIGHTS, INFO = "config.json", "model.safetensors", "lowbit.json"
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                   "spiece.model", "chat_template.*", "generation_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# ---------------------------------------------------------------------------------------------- save

def plain_state(model: nn.Module, quantized: set[str], skip: str | None = None) -> dict[str, torch.Tensor]:
    """The state_dict minus quantized weights, each tied tensor once, no two tensors sharing memory.
    `skip`: leave out everything under this module prefix (the decoder blocks of a streamed save)."""
    owner = {n: id(t) for n, t in (*model.named_parameters(remove_duplicate=False),
                                   *model.named_buffers(remove_duplicate=False))}
    out, seen_obj, seen_storage = {}, set(), set()
    for name, t in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if (leaf == "weight" and module in quantized) or (skip and name.startswith(skip + ".")):
            continue
        if name in owner:  # tied parameters are one object under several names: keep the first
            if owner[name] in seen_obj:
                continue
            seen_obj.add(owner[name])
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage:  # views of one storage (untied): safetensors refuses them, so copy
            t = t.clone()
        seen_storage.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _quant_config(qweights: dict[str, QuantizedWeight], recipe: dict | None,
                  original_shapes: dict | None = None, *, layers: dict | None = None,
                  counts: dict | None = None) -> dict:
    """The `quantization_config` of config.json; a streamed save passes the `layers` metadata and the bit
    `counts` it gathered block by block instead of `qweights`."""
    recipe = recipe or {}
    method_cfg = recipe.get("quant", recipe)  # a full Recipe dump, or a bare method config
    counts = counts or bit_counts(qweights, original_shapes)
    out = {
        "quant_method": "lowbit",
        "format_version": FORMAT_VERSION,
        "method": method_cfg.get("method"),
        "config": method_cfg,
        "layers": layers if layers is not None else {name: q.to_state()[1] for name, q in qweights.items()},
        # Every stored bit (codes, scales, zeros, outliers, low-rank) over every quantized weight of the
        # original model: a channel removed by structured pruning stores nothing.
        "bits_per_weight": counts["bits_per_weight"],
        "total_quantized_params": counts["stored_params"],
    }
    if original_shapes:
        out["bits_per_stored_weight"] = counts["bits_per_stored_weight"]
        out["original_quantized_params"] = counts["original_params"]
    return out


def write_tokenizer(tokenizer, out: Path) -> None:
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        for pattern in TOKENIZER_FILES:
            for f in src.glob(pattern):
                if f.is_file():
                    shutil.copy2(f, out / f.name)  # copy: the source directory is only read
    elif tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def _check_not_input(model: nn.Module, tokenizer, out: Path) -> None:
    sources = [getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")]
    if isinstance(tokenizer, (str, Path)):
        sources.append(str(tokenizer))
    for s in sources:
        # Equal, or inside the output: --overwrite would delete the input.
        if s and Path(s).exists() and Path(s).resolve().is_relative_to(out.resolve()):
            raise LowbitError(f"output directory {out} is (or contains) the input model directory {s}; "
                              "choose another one")


def save_quantized(model: nn.Module, qweights: dict[str, QuantizedWeight], out_dir: str | Path, *,
                   tokenizer=None, recipe: dict | None = None, extra: dict | None = None,
                   overwrite: bool = False, original_shapes: dict | None = None,
                   sidecars: dict[str, tuple[dict, dict]] | None = None) -> Path:
    """Write `model` with `qweights` replacing the named modules' weights as a native lowbit directory.

    `model` may still hold the original modules or already have QuantLinears swapped in. `tokenizer` is
    a tokenizer object or a source directory whose tokenizer files are copied. `recipe` goes to
    lowbit.json (and its `quant` part, or the dict itself, to `quantization_config.config`); the keys of
    `extra` (source_model, seed, timings, ...) go to the top level of lowbit.json. `original_shapes`
    (name → [out, in] before structured pruning) makes bits_per_weight count the original elements.
    `sidecars`: {file name: (tensors, metadata)}, further safetensors files written into the same directory
    (inside the same atomic write, hashed in lowbit.json), e.g. SpIEL's sparse delta.
    """
    out = Path(out_dir)
    _check_not_input(model, tokenizer, out)
    for name in qweights:
        try:
            model.get_submodule(name)
        except AttributeError as e:
            raise LowbitError(f"quantized layer {name} is not a module of the model") from e
    tensors = plain_state(model, set(qweights))
    for name, q in qweights.items():
        for key, t in q.to_state()[0].items():
            full = f"{name}.{key}"
            if full in tensors:
                raise LowbitError(f"tensor name clash: {full} is both a model tensor and a quantized field")
            tensors[full] = t.detach().cpu().contiguous()
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["quantization_config"] = _quant_config(qweights, recipe, original_shapes)
    from lowbit.models.experts import ExpertList

    unfused = [n for n, m in model.named_modules() if isinstance(m, ExpertList)]
    if unfused:  # the loader unfuses the same modules of the freshly built model before loading
        config["quantization_config"]["unfused_experts"] = unfused
    for name in qweights:  # a layer's activation format (LQER's W4A8) travels with it
        act = getattr(model.get_submodule(name), "act", None)
        if act is not None:
            config["quantization_config"]["layers"][name]["act"] = act.model_dump()

    from safetensors.torch import save_file

    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        for fname, (t, meta) in (sidecars or {}).items():
            save_file(t, str(tmp / fname), metadata=meta)
        write_metadata(tmp, config, tokenizer, recipe, extra)
    return out


def write_metadata(tmp: Path, config: dict, tokenizer, recipe: dict | None, extra: dict | None) -> None:
    """config.json, the tokenizer files and lowbit.json (with the sha256 of every file, weights included)
    into a directory being written; the weights file must be there already."""
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=str))
    write_tokenizer(tokenizer, tmp)
    info = {"lowbit_version": lowbit.__version__, "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "recipe": recipe, **(extra or {}),
            "sha256": {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}}
    (tmp / INFO).write_text(json.dumps(info, indent=2, default=str))


# ---------------------------------------------------------------------------------------------- load

def _quantization_config(path: Path) -> dict:
    qc = read_json(path / CONFIG, "not a model directory").get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "lowbit":
        raise LowbitError(f"{path} is not a lowbit output (config.json has no lowbit quantization_config)")
    if qc.get("format_version", 0) > FORMAT_VERSION or not isinstance(qc.get("layers"), dict):
        raise LowbitError(f"{path}: lowbit format version {qc.get('format_version')} is not supported "
                          f"by lowbit {lowbit.__version__} (knows {FORMAT_VERSION})")
    return qc


def is_quantized_dir(path: str | Path) -> bool:
    try:
        _quantization_config(Path(path))
    except LowbitError:
        return False
    return True


def _verify(path: Path, info: dict) -> None:
    for name, digest in (info.get("sha256") or {}).items():
        f = path / name
        if not f.is_file():
            raise LowbitError(f"{f} is missing (listed in {INFO}); the output is incomplete")
        if file_sha256(f) != digest:
            raise LowbitError(f"{f} fails its sha256 check: the file is corrupt or was modified after saving")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path / WEIGHTS, "the output is incomplete or damaged: quantize again")


def _build_model(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None,
                 trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype is None:  # the dtype the non-quantized tensors were saved in (the largest one decides)
        floats = [t for t in tensors.values() if t.is_floating_point()]
        dtype = max(floats, key=torch.Tensor.numel).dtype if floats else torch.float32
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        if hasattr(config, "quantization_config"):  # ours, not an HF quantizer's: keep it out of HF's way
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **dtype_kwargs(dtype))
    except (ValueError, KeyError, OSError) as e:
        raise LowbitError(f"cannot build the model from {path / CONFIG}: {e}") from e
    from lowbit.prune.slicing import KEY, resize

    if getattr(config, KEY, None) is not None:  # a structurally pruned model: per-layer widths
        resize(model, config, path / CONFIG)
    return model


def _split(tensors: dict, layers: dict, expected: set[str]) -> tuple[dict, dict[str, dict]]:
    """Separate the model's own tensors from each quantized layer's `to_state()` tensors."""
    plain, quant = dict(tensors), {}
    for name in layers:
        prefix = f"{name}."
        quant[name] = {k[len(prefix):]: plain.pop(k) for k in list(plain)
                       if k.startswith(prefix) and k not in expected}
    unexpected = sorted(set(plain) - expected)
    if unexpected:
        raise LowbitError(f"{WEIGHTS}: unexpected tensor {unexpected[0]} (the file does not match config.json)")
    return plain, quant


def _aliases(model: nn.Module) -> dict[str, set[str]]:
    """Every state name → all names of the same object (tied weights share one Parameter)."""
    by_obj: dict[int, set[str]] = {}
    for n, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        by_obj.setdefault(id(t), set()).add(n)
    return {n: names for names in by_obj.values() for n in names}


def _load_plain(model: nn.Module, plain: dict, layers: dict) -> None:
    try:
        missing = model.load_state_dict(plain, strict=False).missing_keys
    except RuntimeError as e:  # size mismatches
        msg = str(e).strip().splitlines()
        raise LowbitError(f"{WEIGHTS}: tensor with the wrong shape: {msg[-1].strip() if msg else e}") from e
    quantized, absent, aliases = {f"{n}.weight" for n in layers}, set(missing), _aliases(model)
    for key in missing:  # fine if quantized, or tied to a tensor that was loaded
        if key not in quantized and not (aliases.get(key, {key}) - absent):
            raise LowbitError(f"{WEIGHTS}: corrupt/partial file: missing tensor {key}")


def _qweight(model: nn.Module, name: str, t: dict, meta: dict) -> QuantizedWeight:
    from lowbit.models.adapters import is_quantizable, layer_shape

    try:
        q = QuantizedWeight.from_state(t, meta)
    except LowbitError as e:  # say where: the record itself does not know its file or layer
        raise LowbitError(f"{WEIGHTS}: quantized layer {name}: {e}") from e
    try:
        module = model.get_submodule(name)
    except AttributeError as e:
        raise LowbitError(f"{CONFIG}: quantized layer {name} is not a module of the model") from e
    if not is_quantizable(module) or layer_shape(module) != q.shape:
        raise LowbitError(f"{WEIGHTS}: quantized layer {name} has shape {q.shape}, the model's "
                          f"{type(module).__name__} does not match")
    try:  # catches misshapen scales/zeros/outliers now rather than at the first forward pass
        q.dequantize()
    except (RuntimeError, IndexError, ValueError) as e:
        raise LowbitError(f"{WEIGHTS}: quantized layer {name} is corrupt: {e}") from e
    return q


def _act_config(name: str, d):
    from pydantic import ValidationError

    from lowbit.methods.config import ActQuantConfig

    try:
        return ActQuantConfig.model_validate(d)
    except ValidationError as e:
        raise LowbitError(f"{CONFIG}: quantized layer {name} has an invalid activation format: "
                          f"{e.errors()[0]['msg']}") from None


def load_quantized(path: str | Path, *, trust_remote_code: bool = False, dtype: torch.dtype | None = None,
                   verify: bool = True) -> tuple[nn.Module, dict[str, QuantizedWeight], dict]:
    """Load a native lowbit directory → (model in eval mode with QuantLinears, qweights, info).

    `dtype` is the dtype of the non-quantized parts (default: as saved). `verify` checks the sha256 of
    every file listed in lowbit.json. `info` = {"path", "quantization_config", "provenance"}.
    """
    path = Path(path)
    if not path.is_dir():
        raise LowbitError(f"{path} is not a directory")
    qc = _quantization_config(path)
    provenance = read_json(path / INFO, "") if (path / INFO).exists() else {}
    if verify:
        _verify(path, provenance)
    tensors = _read_tensors(path)
    model = _build_model(path, tensors, dtype, trust_remote_code)
    if qc.get("unfused_experts"):
        from lowbit.models.experts import unfuse_experts

        unfuse_experts(model, list(qc["unfused_experts"]))
    plain, quant = _split(tensors, qc["layers"], set(model.state_dict()))
    _load_plain(model, plain, qc["layers"])
    model.tie_weights()  # before the swap: a quantized lm_head must not be re-tied to the embeddings
    qweights = {name: _qweight(model, name, quant[name], meta) for name, meta in qc["layers"].items()}
    from lowbit.models.swap import swap_in  # lazily: models imports the method registry

    swap_in(model, qweights)
    for name, meta in qc["layers"].items():
        if meta.get("act") is not None:
            model.get_submodule(name).act = _act_config(name, meta["act"])
    model.eval()
    model._lowbit_quantized = True
    return model, qweights, {"path": str(path), "quantization_config": qc, "provenance": provenance}


# ---------------------------------------------------------------------------------- any model source

def _has_tokenizer(path: Path) -> bool:
    return any(next(path.glob(p), None) for p in ("tokenizer*", "vocab.*", "spiece.model"))


def load_tokenizer(source: str, trust_remote_code: bool, **hub_kw):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_kw)
    except (OSError, ValueError, KeyError) as e:
        raise LowbitError(f"cannot load the tokenizer of {source}: {e}") from e


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds. Without this check an
    offline machine spends ~50 s in huggingface_hub's retries before saying that a model is not local."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:  # no DNS, no route, refused, timed out
        return False


def load_model(path_or_id: str | Path, *, dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False) -> tuple[nn.Module, object | None]:
    """(model in eval mode, tokenizer or None) from a lowbit output, an HF model directory or a hub id.

    The tokenizer is None for a directory without tokenizer files. Remote code runs only when asked.
    """
    from transformers import AutoModelForCausalLM

    p = Path(path_or_id).expanduser()
    hub_kw: dict = {}
    if p.exists():
        if not p.is_dir():
            raise LowbitError(f"{p} is a file, not a model directory")
        if not (p / CONFIG).is_file():
            raise LowbitError(f"{p} is not a model directory (no config.json)")
        tokenizer = load_tokenizer(str(p), trust_remote_code) if _has_tokenizer(p) else None
        if is_quantized_dir(p):
            return load_quantized(p, trust_remote_code=trust_remote_code, dtype=dtype)[0], tokenizer
        from lowbit.prune.slicing import is_sliced_dir, load_sliced

        if is_sliced_dir(p):  # structured pruning with per-layer widths (`lowbit prune --method pg|search`)
            return load_sliced(p, dtype), tokenizer
        check_safetensors_dir(p)
        source = str(p)
    elif _HUB_ID.match(str(path_or_id)) and ".." not in str(path_or_id):
        source, tokenizer = str(path_or_id), None
        if not hub_reachable():  # only the local hub cache can have it: look there, fail in seconds
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(source, CONFIG), str):
                raise LowbitError(f"model {source} is not a local directory, the Hugging Face hub is unreachable "
                                  "(offline?) and the local hub cache does not have it: pass a model directory")
            hub_kw["local_files_only"] = True
    else:
        raise LowbitError(f"model path {p} does not exist (and is not a hub id of the form org/name)")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_kw,
                                                     **dtype_kwargs(dtype))
    except OSError as e:
        if p.exists():
            raise LowbitError(f"cannot load model {source}: {str(e).splitlines()[0]}") from e
        why = "the hub is unreachable and it is not in the local hub cache" if hub_kw else "no such model?"
        raise LowbitError(f"model {source} is not a local directory and could not be loaded from the Hugging "
                          f"Face hub ({why}): {str(e).splitlines()[0]}") from e
    except (ValueError, KeyError) as e:
        raise LowbitError(f"cannot load model {source}: {e}") from e
    if tokenizer is None and not p.exists():
        tokenizer = load_tokenizer(source, trust_remote_code, **hub_kw)
    model.eval()
    return model, tokenizer
