"""Zero-shot tasks through lm-evaluation-harness's Python API (the ``eval`` extra), offline-safe.

``run_tasks(model, tokenizer, tasks, *, include_path=None, limit=None, batch_size=8, device=None, offline=None)``
wraps the loaded model in lm-eval's ``HFLM`` and calls ``lm_eval.simple_evaluate`` with a ``TaskManager``.

* ``include_path``: a folder of custom task YAML files (e.g. a ``multiple_choice`` task over a local jsonl file,
  ``dataset_path: json`` + ``dataset_kwargs.data_files``). When every asked-for task is defined there, lm-eval's
  built-in task index is not built (seconds instead of a scan of thousands of YAML files).
* ``offline``: None = offline when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set or the hub is not
  reachable; offline sets the Hugging Face offline switches (hub, datasets, transformers) for the call, so a task
  whose data are neither local nor cached fails at once with lm-eval's/datasets' error instead of retrying
  connections.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["lm_eval_available", "run_tasks", "check_tasks", "LMEvalError", "LMEvalMissing"]

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class LMEvalError(ValueError):
    """An unknown task or include path (one line)."""


class LMEvalMissing(ImportError):
    """lm-evaluation-harness is not installed."""


_MISSING = "--tasks needs lm-evaluation-harness: pip install lm-eval (or 'optprune[eval]')"


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def _env_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in _OFFLINE_VARS)


@contextlib.contextmanager
def _offline_switches(on: bool):
    if not on:
        yield
        return
    old = {k: os.environ.get(k) for k in _OFFLINE_VARS}
    patched = []
    try:
        for k in _OFFLINE_VARS:
            os.environ[k] = "1"
        # libraries already imported read these at import time: flip their module-level switches too
        for mod, attr in (("datasets.config", "HF_DATASETS_OFFLINE"), ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
            m = importlib.import_module(mod) if importlib.util.find_spec(mod.split(".")[0]) else None
            if m is not None and hasattr(m, attr):
                patched.append((m, attr, getattr(m, attr)))
                setattr(m, attr, True)
        yield
    finally:
        for m, attr, v in patched:
            setattr(m, attr, v)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _yaml_task_names(folder: Path) -> set:
    import yaml
    names = set()
    for f in list(folder.rglob("*.yaml")) + list(folder.rglob("*.yml")):
        try:
            d = yaml.safe_load(f.read_text())
        except Exception:  # lm-eval YAMLs may use !function tags; they are not ours to check
            continue
        if isinstance(d, dict):
            for k in ("task", "group", "tag"):
                v = d.get(k)
                names.update([v] if isinstance(v, str) else [x for x in (v or []) if isinstance(x, str)])
    return names


def _task_manager(tasks, inc):
    from lm_eval.tasks import TaskManager
    local_only = inc is not None and set(tasks) <= _yaml_task_names(inc)
    tm = TaskManager(include_path=str(inc) if inc else None, include_defaults=not local_only)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise LMEvalError(f"unknown lm-eval task(s) {', '.join(unknown)}"
                          f"{' (not in ' + str(inc) + ')' if inc else ''}; `lm_eval ls tasks` lists them")
    return tm


def _include(include_path) -> Optional[Path]:
    if include_path is None:
        return None
    inc = Path(include_path).expanduser()
    if not inc.is_dir():
        raise LMEvalError(f"--include-path {inc} is not a folder of task YAML files")
    return inc


def check_tasks(tasks: Sequence[str], include_path=None) -> None:
    """Fail before any model is loaded when lm-eval is missing or a task is unknown."""
    if not lm_eval_available():
        raise LMEvalMissing(_MISSING)
    with _offline_switches(True):  # the task index is local files: no network needed to list it
        _task_manager([str(t) for t in tasks], _include(include_path))


def run_tasks(model, tokenizer, tasks: Sequence[str], *, include_path=None, limit: Optional[int] = None,
              batch_size: int = 8, device=None, offline: Optional[bool] = None) -> dict:
    """``{task: {metric: value}}`` for the numeric metrics lm-eval reports (module doc)."""
    if not lm_eval_available():
        raise LMEvalMissing(_MISSING)
    tasks = [str(t) for t in tasks]
    inc = _include(include_path)
    if offline is None:
        offline = _env_offline()
        if not offline:
            from .loading import hub_reachable
            offline = not hub_reachable()
    with _offline_switches(offline):
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        tm = _task_manager(tasks, inc)
        dev = str(device) if device is not None else str(next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=dev)
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit)
    out = {}
    for task, metrics in ((res or {}).get("results") or {}).items():
        out[task] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out
