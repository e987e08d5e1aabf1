"""lm-evaluation-harness tasks on a lowbit model (`lowbit eval --tasks ...`).

The model (quantized layers and all) is handed to lm-eval's own `HFLM` wrapper as an in-memory
`PreTrainedModel`, so every task of the harness runs on it exactly as on an fp checkpoint; the task data
of the registry's tasks comes from the hub (online). One task ships with lowbit and runs offline:

* `lowbit_c4_continuation`: 4-way multiple choice over the held-out C4 documents of the packaged
  corpus (documents 1800–1999, which no calibration draws from; those with CONTEXT_WORDS + CHOICE_WORDS
  words of at most MAX_WORD characters). The context is a document's first CONTEXT_WORDS words; the choices are the next CHOICE_WORDS words of that document and of the three
  documents after it (cyclically) at the same position. Metrics acc and acc_norm (lm-eval's). The file is
  written once, deterministically, under lowbit's cache.

Results are lm-eval's numbers (`results[task]`), with their bootstrap standard errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.fingerprint import sha

CONTEXT_WORDS, CHOICE_WORDS, N_CHOICES, MAX_WORD = 48, 12, 4, 24
LOCAL_TASK = "lowbit_c4_continuation"


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LowbitError("lm-eval tasks need the lm-evaluation-harness: pip install lm-eval "
                          "(or pip install 'lowbit[eval]')") from None


def c4_continuation_docs(data: str | None = None) -> list[dict]:
    """The local task's examples: {"context", "choices", "label"} (label 0..3, rotated by index)."""
    from lowbit import data as corpora

    words = [d.split() for d in corpora.c4_split("heldout", data)]
    need = CONTEXT_WORDS + CHOICE_WORDS
    # documents long enough whose spans hold ordinary words (no URL or run-on token of > MAX_WORD chars)
    usable = [w for w in words if len(w) >= need and max(map(len, w[:need])) <= MAX_WORD]
    docs = []
    for i, w in enumerate(usable):
        others = [usable[(i + k) % len(usable)] for k in range(1, N_CHOICES)]
        true = " ".join(w[CONTEXT_WORDS:need])
        choices = [" ".join(o[CONTEXT_WORDS:need]) for o in others]
        label = i % N_CHOICES  # the true continuation's slot rotates: no position bias
        choices.insert(label, true)
        docs.append({"context": " ".join(w[:CONTEXT_WORDS]), "choices": choices, "label": label})
    return docs


def _local_file(data: str | None) -> Path:
    from lowbit.cache import cache_root
    from lowbit.io.atomic import atomic_write_text

    docs = c4_continuation_docs(data)
    text = "".join(json.dumps(d) + "\n" for d in docs)
    path = cache_root() / "lm-eval" / f"{LOCAL_TASK}-{sha(text.encode())[:12]}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return path


def parse_tasks(tasks: str | None, limit: float | None) -> tuple[list[str] | None, int | float | None]:
    """The CLI's `--tasks a,b` and `--task-limit` (N examples, or a fraction when < 1)."""
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    return names or None, None if limit is None else (int(limit) if limit >= 1 else limit)


def task_config(name: str, data: str | None = None) -> str | dict:
    """A task name of the harness registry as it is, or the local task's config (a dict lm-eval takes)."""
    if name != LOCAL_TASK:
        return name
    return {
        "task": LOCAL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(_local_file(data))}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def run_tasks(model, tokenizer, tasks: list[str], *, limit: int | float | None = None,
              num_fewshot: int | None = None, batch_size: int = 8, data: str | None = None,
              seed: int = 0) -> dict[str, dict[str, Any]]:
    """task → {metric: value} (lm-eval's `results[task]`, the ",none" filter suffix dropped)."""
    if not tasks:
        raise LowbitError("no tasks given: --tasks lowbit_c4_continuation,arc_easy,...")
    _require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    was = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=[task_config(t, data) for t in tasks], limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      bootstrap_iters=1000)
    except (KeyError, ValueError, FileNotFoundError, ConnectionError, OSError) as e:
        raise LowbitError(f"lm-eval could not run {', '.join(tasks)}: {type(e).__name__}: {e} "
                          f"(tasks other than {LOCAL_TASK} read their data from the hub)") from None
    finally:
        model.train(was)
    res = {}
    for task, metrics in (out or {}).get("results", {}).items():
        res[task] = {k.replace(",none", ""): v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and k != "alias"}
    return res
