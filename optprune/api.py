"""The Python API: :func:`prune`, :func:`save`, :func:`evaluate`, :func:`verify`, :func:`analyze`.

The keyword names are the CLI's option names (``--sparsity`` ↔ ``sparsity=``, ``--dataset`` ↔ ``dataset=``,
``--save-format`` ↔ ``format=`` of :func:`save`). The heavy modules are imported lazily, so ``import optprune``
works without the LLM extras.

Example::

    import optprune
    texts = [...]                                           # a list of strings (or a datasets.Dataset, ...)
    model, record = optprune.prune("stories260k", method="sparsegpt", sparsity=0.5, pattern="2:4",
                                   dataset=texts, nsamples=16, seqlen=128)
    optprune.save(model, "out/", format="gguf", gguf_type="q8_0")   # or format="dense" (default)
"""
from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

if TYPE_CHECKING:  # pragma: no cover
    import torch

from .llm_adapters.description import with_signature as _with_signature  # (the standard library only)

__all__ = ["prune", "save", "evaluate", "verify", "analyze"]

PathLike = Union[str, os.PathLike]
#: tokenizer of each model :func:`prune` returned, so that :func:`save` writes it without being told
_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: run record of each model :func:`prune` returned (pruned layer names, pattern, input dtype) for :func:`save`
_RECORDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prune(*args, **kwargs) -> tuple:
    """Prune a causal LM layer by layer; returns ``(pruned model, record)``. Nothing is written: see :func:`save`.

    The parameters are the run options of ``optprune prune`` (llm_adapters/description.py declares each once),
    Python-only ones included; booleans take True/False or the words true/false, yes/no, on/off, 1/0.

    Returns:
        ``(model, record)``: the pruned ``PreTrainedModel`` and the JSON-ready run record (the ``run.json`` of
        the CLI: config, per-layer errors, summary, timings).
    """
    from .llm_adapters.description import bind, from_api, signature
    from .llm_adapters.run import prune as _prune
    given = from_api(bind(signature(api=True), args, kwargs, "prune"))
    mdl, tok, record = _prune(**given, output=None, verbose=False, return_model=True)
    if tok is not None:
        _TOKENIZERS[mdl] = tok
    _RECORDS[mdl] = record
    return mdl, record


_with_signature(prune, api=True)  # parameters and their docs: llm_adapters/description.py


def save(model: "torch.nn.Module", output: PathLike, tokenizer: Any = None, *, format: str = "dense",
         dtype: str = "auto", gguf_type: Optional[str] = None, record: Optional[dict] = None,
         overwrite: bool = False) -> dict:
    """Write a pruned model to the directory ``output`` (created); returns what was written.

    The output is written into a temporary folder beside ``output`` and renamed into place when complete, so an
    interrupted save leaves ``output`` as it was; an existing optprune output is replaced only with ``overwrite``.

    Args:
        model: a model returned by :func:`prune` (or any causal LM with zeroed weights).
        output: the directory.
        tokenizer: written next to the model (default: the one :func:`prune` used for this model).
        format: ``dense`` (stock ``save_pretrained``, no ``sparsity_config``), ``gguf`` (one GGUF file with
            the tokenizer, for llama.cpp / Ollama) or ``compressed-sparse-legacy`` (compressed-tensors' sparse
            bitmask, which only compressed-tensors <= 0.14 reads). docs/deployment.md says which tools load what.
        dtype: ``auto`` (the dtype of the model :func:`prune` was given; else the model's own), ``float32``,
            ``float16`` or ``bfloat16``.
        gguf_type: ``format="gguf"`` only: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (default: from ``dtype``).
        record: the run record from :func:`prune` (default: the one of this model); written as ``run.json``.
    """
    from .llm_adapters import export
    from .llm_adapters.architectures import get_arch
    from .llm_adapters.checkpoint import atomic_output
    from .llm_adapters.preflight import check_output
    from .llm_adapters.run import RUN_FILE
    from .llm_adapters.saving import save_pruned_model
    from .solvers.serialization import to_json
    from .solvers import get_method
    import torch

    record = record if record is not None else _RECORDS.get(model)
    tokenizer = tokenizer if tokenizer is not None else _TOKENIZERS.get(model)
    cfg = (record or {}).get("config") or {}
    if cfg.get("method") and str(cfg.get("structure") or "").lower() == "depth":
        from .llm_adapters.depth import depth_rule
        spec = depth_rule(cfg["method"])  # whole blocks removed: saved like any structured model
    else:
        spec = get_method(cfg["method"]) if cfg.get("method") else None
    structured = bool(spec and spec.structured)
    config = model.config.to_dict() if hasattr(getattr(model, "config", None), "to_dict") else None
    export.check_save_options(format, dtype, structured=structured, config=config, gguf_type=gguf_type)
    export.check_loaded(model, tokenizer, format, gguf_type=gguf_type)
    out = check_output(output, overwrite=overwrite)
    with atomic_output(out, overwrite=overwrite) as stage:  # written beside the target, renamed into place
        src = ((record or {}).get("model") or {}).get("source_dtype")
        src_dtype = getattr(torch, src) if src else next(model.parameters()).dtype
        layers = [r["name"] for r in (record or {}).get("layers", [])] or None
        if spec is None:
            info = {"path": str(Path(out).resolve())}
            info.update(export.save_model(model, stage, tokenizer, format=format,
                                          dtype=export.resolve_dtype(dtype, src_dtype), layers=layers,
                                          gguf_type=gguf_type))
        else:
            target = export.resolve_dtype(dtype, src_dtype)
            if structured and target != next(model.parameters()).dtype:
                import copy
                model = copy.deepcopy(model)  # the shrunk model is cast to be saved: not the caller's
            info = save_pruned_model(model, tokenizer, stage, get_arch(model), spec, save_format=format, dtype=target,
                         layers=layers, pattern=cfg.get("pattern"), format_options={"gguf_type": gguf_type})
            info["path"] = str(Path(out).resolve())
        if record is not None:
            rec = dict(record, saved=info)
            rec["config"] = dict(cfg, output=str(out), save_format=format, dtype=dtype, gguf_type=gguf_type)
            (stage / RUN_FILE).write_text(json.dumps(to_json(rec), indent=1))
    return info


def evaluate(model: PathLike, *, protocol: Optional[str] = None, eval_datasets: Union[str, Sequence[str], None] = None,
             eval_seqlen: Optional[int] = None, eval_windows: Optional[int] = None,
             reference: Optional[PathLike] = None,
             tasks: Union[str, Sequence[str], None] = None, task_limit: Optional[int] = None,
             include_path: Optional[PathLike] = None, output: Optional[PathLike] = None,
             data_dir: Optional[PathLike] = None, model_dir: Optional[PathLike] = None, device: Optional[str] = None,
             seed: int = 0, batch_size: Optional[int] = None, progress: bool = True) -> dict:
    """Perplexity (per protocol), KL/top-1 against a ``reference`` and lm-eval ``tasks`` of a saved model.

    Args:
        model: built-in name, directory (any ``--save-format``), ``.gguf`` or hub id.
        protocol: ``smoke``, ``cpu`` or ``paper``: evaluation texts and windows (docs/protocols.md).
        eval_datasets: evaluation texts (wikitext2, ptb, c4, or a text file); ``[]`` with ``tasks`` skips
            perplexity.
        eval_seqlen, eval_windows: window length and the number of windows (0 = all).
        reference: dense model to compare next-token distributions with.
        tasks: lm-evaluation-harness task names (needs the ``eval`` extra; run offline: tasks whose data are local
            or cached).
        task_limit: examples per task.
        include_path: a folder of custom lm-eval task YAML files.
        output: JSON file (or directory → ``eval.json``) for the record.
        data_dir, model_dir, device, seed, batch_size, progress: as on the CLI.
    """
    from .llm_adapters.run import evaluate as _evaluate
    return _evaluate(model, protocol=protocol, output=output, data_dir=data_dir, model_dir=model_dir,
                     device=device, seed=seed, eval_datasets=eval_datasets, eval_seqlen=eval_seqlen,
                     eval_windows=eval_windows, reference=reference, batch_size=batch_size, progress=progress,
                     tasks=tasks, task_limit=task_limit, include_path=include_path)


def verify(*, quick: bool = False, gurobi: Optional[bool] = None, output: Optional[PathLike] = None,
           seed: int = 0, time_limit: Optional[float] = None, threads: Optional[int] = 1,
           instances: Optional[int] = None) -> list:
    """Cross-check every program against every reference backend that can take it (selected by capability)
    and every production solver of it, on small instances; returns one row per (instance, program, solver).

    Args:
        quick: a small set of instances (under a minute on 2 cores).
        gurobi: None = use Gurobi where installed and licensed; True = require it; False = skip it.
        output: write the rows and the per-pair table as JSON here (and the heuristics' gap plot beside it).
        seed: instance seed.
        time_limit: seconds per reference solve (default 3 quick, 10 full).
        threads: torch/Gurobi threads while verifying (None keeps the current settings).
        instances: instances per program (default 100; quick: 4).
    """
    from .solvers.verification import verify as _verify
    return _verify(quick=quick, gurobi=gurobi, output=output, seed=seed, time_limit=time_limit, threads=threads,
                   instances=instances)


def analyze(model: PathLike, *, sparsity: float = 0.7, allocation: str = "alpha",
            allocation_eps: Optional[float] = None, output: PathLike = "analysis", matrix: Optional[str] = None,
            calibration: Optional[str] = None, nsamples: Optional[int] = None, seqlen: Optional[int] = None,
            granularity: str = "block", data_dir: Optional[PathLike] = None, model_dir: Optional[PathLike] = None,
            device: Optional[str] = None, seed: int = 0) -> dict:
    """Heavy-tailed spectra (α per layer), per-layer allocations and plots; returns the ``analysis.json`` record.

    Args:
        model: built-in name, directory, ``.gguf`` or hub id.
        sparsity: mean sparsity the allocations distribute.
        allocation: ``alpha``, ``owl`` or ``uniform``.
        allocation_eps: sparsities within ``[S(1-ε), S(1+ε)]``.
        output: directory for the PNG plots and ``analysis.json``.
        matrix: the matrix whose ESD is plotted (default: the first MLP down projection).
        calibration, nsamples, seqlen: calibration for activation-based allocations (owl).
        granularity: ``block`` (one sparsity per block) or ``matrix`` (one per matrix).
        data_dir, model_dir, device, seed: as on the CLI.
    """
    from .llm_adapters.analysis import analyze as _analyze
    return _analyze(model, sparsity=sparsity, allocation=allocation, allocation_eps=allocation_eps, output=output,
                    matrix=matrix, calibration=calibration, nsamples=nsamples, seqlen=seqlen,
                    granularity=granularity, data_dir=data_dir, model_dir=model_dir, device=device, seed=seed)
