"""Resumable QAT state: trainable tensors + AdamW moments in safetensors, the rest in JSON, written atomically.

    .OUT.qat-partial/
        state-000120.safetensors   param/<name>, adam/<name>/{exp_avg, exp_avg_sq, step}, state/<name>
        state.json                 {"format", "fingerprint", "step", "file", "history"}, replaced last

`state.json` names the tensor file it belongs to and is replaced only after that file is complete, so a
kill at any moment leaves either the previous consistent pair or the new one. `state/` holds training state
that is not a parameter but changes during training (LoQT's grid and projection after each merge). The batch order and the
learning rate are functions of the step (`qat.data.batch_indices`), so nothing else is needed to continue
bit-identically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lowbit.errors import LowbitError
from lowbit.io.read import read_json
from lowbit.io.atomic import atomic_save_safetensors, atomic_write_text

FORMAT = "lowbit-qat-partial/1"


def checkpoint_dir_for(out: Path) -> Path:
    return Path(out).parent / f".{Path(out).name}.qat-partial"


def save(root: Path, step: int, params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer,
         fingerprint: dict, history: list[dict], state: dict[str, torch.Tensor] | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tensors = {f"param/{n}": p.detach().contiguous() for n, p in params.items()}
    tensors.update({f"state/{n}": t.detach().cpu().contiguous() for n, t in (state or {}).items()})
    for n, p in params.items():
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                tensors[f"adam/{n}/{k}"] = v.detach().contiguous()
    name = f"state-{step:06d}.safetensors"
    atomic_save_safetensors(tensors, root / name)
    old = _read_state(root)
    atomic_write_text(root / "state.json", json.dumps(
        {"format": FORMAT, "fingerprint": fingerprint, "step": step, "file": name, "history": history}, indent=1))
    if old and old.get("file") != name:
        (root / old["file"]).unlink(missing_ok=True)


def _read_state(root: Path) -> dict | None:
    p = root / "state.json"
    if not p.exists():
        return None
    return read_json(p, "", f"unreadable QAT checkpoint: delete {root} to start over", format=FORMAT)


def load(root: Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer,
         fingerprint: dict) -> tuple[int, list[dict], dict[str, torch.Tensor]]:
    """Restore params and AdamW state in place; returns (step, history, {name: state tensor}).
    (0, [], {}) when there is nothing."""
    st = _read_state(root)
    if st is None:
        return 0, [], {}
    old = st.get("fingerprint", {})
    changed = [k for k in fingerprint if old.get(k) != fingerprint[k]]
    if changed:
        raise LowbitError(f"QAT checkpoint in {root} was made with a different {', '.join(changed)}; use the "
                          f"same command to resume, or delete the directory (or pass --restart) to start over")
    try:
        t = load_file(str(root / st["file"]))
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(t[f"param/{n}"])
                state = {k.rsplit("/", 1)[1]: v for k, v in t.items() if k.startswith(f"adam/{n}/")}
                if state:
                    opt.state[p] = state
        extra = {k[len("state/"):]: v for k, v in t.items() if k.startswith("state/")}
        return int(st["step"]), list(st.get("history", [])), extra
    except (OSError, KeyError, RuntimeError, SafetensorError) as e:
        raise LowbitError(f"damaged QAT checkpoint in {root} ({e!r}); delete it to start over") from None
