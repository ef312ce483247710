"""One typed description of a prune run: every option of ``optprune prune`` declared once.

A run option is one field of one of six frozen groups — :class:`ModelOptions`, :class:`CalibrationOptions`,
:class:`MethodOptions`, :class:`OutputOptions`, :class:`EvaluationOptions`, :class:`ExecutionOptions` — made
with :func:`option`, which carries everything the rest of the package needs to know about it: type, default,
help text, the CLI flag (and its ``--no-x`` form), where it is exposed (CLI, :func:`optprune.prune`), its
allowed range or choices, and whether it belongs to the resume key, the record (``config`` of run.json), a
``--config`` file and a ``--replay``. From these fields are derived:

* the ``optprune prune`` options (:func:`add_cli_options`);
* the signature and parameter docs of :func:`optprune.llm_adapters.run.prune` and :func:`optprune.prune`
  (:func:`signature`, :func:`parameter_docs`);
* the typed checks of the values (:func:`check_run_options`, the registry's :func:`check_value`);
* the keys a ``--config`` file may set and a ``--replay`` takes over (:func:`config_keys`, :func:`replay_keys`);
* the recorded settings and the resume key of a resolved run (:meth:`RunDescription.record`,
  :meth:`RunDescription.resume_key`).

:func:`resolve` builds the one :class:`RunDescription` of a run from keyword options: types checked, every
combination, file and folder checked before any weight is read (bad input raises one line), the protocol
settings resolved and the pattern parsed — the engine (:mod:`.engine`) reads nothing else.

Adding an option is one :func:`option` field in its group (docs/extending.md, "Adding a run option").
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["option", "ModelOptions", "CalibrationOptions", "MethodOptions", "OutputOptions", "EvaluationOptions",
           "ExecutionOptions", "GROUPS", "RunDescription", "resolve", "options", "option_group", "signature",
           "parameter_docs", "with_signature", "bind", "from_api", "add_cli_options", "cli_destinations",
           "check_run_options", "config_keys", "cli_flags",
           "replay_keys", "run_options", "RESOLVE_EXTRA", "add_option", "isolated"]

log = logging.getLogger("optprune")
_REQUIRED = object()  # the default of a required option (model, method)


def option(default=None, help: str = "", *, type=None, flags=None, action=None, choices=None, range=None,
           metavar=None, cli: bool = True, api: bool = True, config: Optional[bool] = None, record: bool = False,
           replay: Optional[bool] = None, key: bool = False, check: Optional[bool] = None, doc: Optional[str] = None,
           api_name: Optional[str] = None, api_default=_REQUIRED, dest: Optional[str] = None, annotation=None,
           required: bool = False, label: Optional[str] = None):
    """One run option: a dataclass field whose metadata says everything about it.

    ``type``: int, float, bool or str (None: any object); ``range`` (``"[1, inf)"``) and ``choices`` are checked
    by the registry's :func:`check_value` (as method options are) when ``check`` (default: for typed options).
    ``flags``: the CLI spellings (default ``--name-with-dashes``; a boolean defaulting to True gets
    ``--no-name``); ``cli=False``: Python only. ``api``: a parameter of :func:`optprune.prune` (``api_name``
    and ``api_default`` where it differs there). ``config``: a ``--config`` file key (default: when on the CLI);
    ``record``: in run.json's ``config``; ``replay``: taken over by ``--replay`` (default: when recorded);
    ``key``: part of the resume key. ``doc``: the API docs' text when it differs from ``help``; ``label``: how
    messages name it when not by its flag."""
    meta = dict(help=help, type=type, flags=flags, action=action, choices=choices, range=range, metavar=metavar,
                cli=cli, api=api, config=cli if config is None else config, record=record,
                replay=record if replay is None else replay, key=key,
                check=(type in (int, float, bool)) if check is None else check, doc=doc, api_name=api_name,
                api_default=api_default, dest=dest, annotation=annotation, required=required, label=label)
    return field(default=default, metadata=meta)


#: --save-format choices (the formats registered in llm_adapters/export*.py; tests/test_export.py keeps them equal)
SAVE_FORMAT_HELP = {
    "dense": "stock save_pretrained directory, loaded by transformers, vLLM, llm-compressor (default)",
    "gguf": "one GGUF file with tokenizer and chat template, for llama.cpp / Ollama (--gguf-type)",
    "compressed-sparse-legacy": "compressed-tensors sparse bitmask; only compressed-tensors<=0.14 loads it",
    "pack-quantized": "--quant grids as compressed-tensors packed int codes + scales (W4A16/W8A16), loaded by "
                      "stock transformers and vLLM",
}


# ============================================================================================ the groups
@dataclass(frozen=True)
class ModelOptions:
    """Which model is pruned."""
    model: Any = option(None, "built-in name (stories260k, smollm2-135m), HF dir, hub id, or .gguf (required "
                              "unless in --config/--replay)", record=True, key=True, required=True, annotation="model",
                        doc="a built-in name (``stories260k``, ``smollm2-135m``), a Hugging Face directory, a "
                            "``.gguf`` file, a hub id, or a loaded ``PreTrainedModel`` (pruned in place, in its own "
                            "dtype; the Gram matrices and solves are float32/float64 either way).")
    tokenizer: Any = option(None, cli=False, config=False, annotation=Any,
                            doc="the tokenizer of an in-memory model (needed for text calibration, evaluation and "
                                "saving); overrides the one loaded with a named model.")
    model_dir: Any = option(None, "folder holding built-in models such as stories260K (default: $OPTPRUNE_MODEL_DIR)",
                            annotation="path")


@dataclass(frozen=True)
class CalibrationOptions:
    """The calibration data and the protocol they default from."""
    calibration: Any = option(
        None, "calibration: c4, wikitext2, ptb, self, or a text file (default: the protocol's; c4 if the data dir has "
              "it, else self)", flags=("--dataset", "--calibration"), dest="dataset", api_name="dataset",
        annotation=Any, doc="calibration: a name (``c4``, ``wikitext2``, ``ptb``, ``self``), a text file path, a "
                            "list of strings, a ``datasets.Dataset`` with a ``text_column``, or a LongTensor of token "
                            "ids ``(nsamples, seqlen)`` (or a 1-D stream). Default: the protocol's.")
    calibration_packing: Optional[str] = option(
        None, "rows: each document (a line of a text file) one sample, truncated at --seqlen, short ones kept; "
              "windows: documents joined, --nsamples windows of --seqlen tokens (default: rows for a text file, "
              "windows for c4/wikitext2/ptb)", choices=("rows", "windows"), record=True, key=True, check=False)
    nsamples: Optional[int] = option(None, "calibration samples: windows, or at most this many rows (default from "
                                           "--protocol)", type=int, range="[1, inf)")
    seqlen: Optional[int] = option(None, "tokens per calibration window; the longest row (default from --protocol)",
                                   type=int, range="[2, inf)")
    protocol: Optional[str] = option(None, "smoke, cpu or paper (docs/protocols.md): sets data and eval defaults "
                                           "(default: the model's, else cpu)")
    text_column: str = option("text", cli=False, config=True, doc="the text column of a ``datasets.Dataset`` "
                                                                   "calibration.")
    seed: int = option(0, "random seed of calibration sampling and instances", type=int, record=True, key=True)
    data_dir: Any = option(None, "folder with wikitext-2-raw/, ptb/, c4/ (default: $OPTPRUNE_DATA_DIR; layout in "
                                 "docs/protocols.md)", record=True, annotation="path")


@dataclass(frozen=True)
class MethodOptions:
    """What is pruned, how much, and by which method."""
    method: Optional[str] = option(None, "magnitude, wanda, sparsegpt, ria, refit, fista, spap, eggs, ... (required "
                                         "unless in --config/--replay)", record=True, key=True, required=True,
                                   annotation=str)
    sparsity: Optional[float] = option(None, "fraction of weights removed per layer (default: 0.5; N:M: 1 − N/M)",
                                       type=float, record=True, key=True,
                                       doc="fraction of weights removed per layer (default 0.5; N:M patterns fix "
                                           "their own: 1 − N/M; 0 with ``quant`` alone).")
    pattern: str = option("unstructured", "unstructured, row, N:M (e.g. 2:4), groups", record=True, key=True)
    quant: Optional[str] = option(
        None, "kept weights on an integer grid: w<bits>[g<group>][a], e.g. w4 (per channel), w4g128 (per 128 "
              "inputs), w4g64a (asymmetric); methods gptq, rtn, sparsegpt, quant-refit (default: none)",
        record=True, key=True)
    min_degree: Optional[int] = option(None, "expander N:M: keep ≥ B entries per column per tile (default: none)",
                                       type=int, range="[0, inf)", record=True, key=True)
    allocation: str = option("uniform", "per-layer sparsity: uniform, alpha, owl, auto; options after ':' "
                                        "(alpha:median, alpha:weighted, alpha:bounded, auto:finalists=3); with "
                                        "--quant alone: per-layer bit widths in 2..8 averaging the --quant bits "
                                        "(alpha, owl, auto)",
                             record=True, key=True)
    allocation_eps: Optional[float] = option(None, "alpha/owl: sparsities in [S(1-ε), S(1+ε)] (default: the "
                                                   "allocation's)", type=float, range="[0, 1)", record=True, key=True)
    structure: Optional[str] = option(
        None, "structured methods (default: mlp): mlp, heads (query heads), heads:kv (whole key/value groups under "
              "GQA), or a comma list such as mlp,heads; hidden: shrink the residual stream (with slicegpt: a "
              "rotation; with a structured method: hidden channels); depth: remove whole blocks (--method depth or "
              "shortgpt)", record=True, key=True)
    equal_widths: bool = option(False, "structured methods: the same widths in every block, so the saved config "
                                       "states them and stock tools load it (uniform allocation; heads removed as "
                                       "whole key/value groups)", type=bool, record=True, replay=False)
    speedup: Optional[float] = option(
        None, "--structure depth: remove blocks, --structure mlp: shrink MLP widths (mean sparsity spread by "
              "--allocation), until the modelled prefill latency on this machine (measured, cached) drops to 1/X of "
              "the dense model's; the measured speed-up goes into run.json (default: none)", type=float, check=False,
        record=True, replay=False)
    flops: Optional[float] = option(None, "--structure depth: keep at most this fraction of the dense FLOPs per token "
                                          "(default: none)", type=float, check=False, record=True, replay=False)
    mode: str = option("sequential", "block inputs from the pruned model (sequential) or the dense model "
                                     "(independent blocks)", choices=("sequential", "dense-input"), check=False,
                       record=True, key=True)
    error_correction: bool = option(True, "within a block, solve each sub-layer on dense inputs instead of "
                                          "pruned-upstream inputs", type=bool, record=True, key=True)
    refit: bool = option(False, "finish every layer with the least-squares refit", type=bool, record=True, key=True)
    method_options: Optional[dict] = option(
        None, "method option, repeatable; `optprune list methods` shows each method's options and defaults "
              "(default: none)", flags=("-O", "--method-opt"), action="append", metavar="KEY=VALUE",
        dest="method_opt", record=True, key=True, annotation=Optional[dict])
    damp: Optional[float] = option(None, cli=False, config=True, type=float, range="[0, inf)", record=True, key=True,
                                   label="--damp",
                                   doc="Hessian damping (default: the pipeline's).")
    targets: Any = option(None, "comma list of sub-layers to prune: full names, class names (Linear) or re:REGEX "
                                "(default: all)", record=True, annotation="names")
    ignore: Any = option(None, "comma list of sub-layers left dense, same forms, e.g. 're:.*self_attn.*' (default: "
                               "none)", record=True, annotation="names")
    certify: bool = option(False, "per layer: a valid lower bound on the optimal error of its L0 program and the "
                                  "relative gap of our solution (and FISTA's certified ℓ1 duality gap), in run.json "
                                  "and the summary", type=bool, record=True, replay=False)


@dataclass(frozen=True)
class OutputOptions:
    """Where and how the pruned model is written."""
    output: Any = option(None, "directory for the pruned model and run.json (default: not saved)", api=False,
                         record=True, replay=False, annotation="path")
    save_format: str = option("dense", "; ".join(f"{k}: {v}" for k, v in SAVE_FORMAT_HELP.items()) +
                              " (docs/deployment.md)", api=False, record=True, choices=tuple(SAVE_FORMAT_HELP),
                              check=False)
    gguf_type: Optional[str] = option(None, "--save-format gguf: type of the matrices in the GGUF file (default: from "
                                            "--dtype; norms stay f32); q4_0/q4_1/q5_0/q5_1/q8_0 store a --quant "
                                            "grid of the same bits exactly (groups a multiple of 32)",
                                      choices=("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"),
                                      check=False, api=False, record=True)
    dtype: str = option("auto", "dtype of the saved weights (auto: the input model's); solving is float32/float64 "
                                "anyway", choices=("auto", "float32", "float16", "bfloat16"), check=False, api=False,
                        record=True)
    overwrite: bool = option(False, "replace an existing optprune output in --output (atomically, once the new one "
                                    "is complete)", type=bool, api=False, config=False)
    checkpoint_dir: Any = option(None, "checkpoint after every block here (default: .<output>.optprune-checkpoint "
                                       "beside --output; kept when a run is interrupted, deleted when it completes)",
                                 api=False, config=False, annotation="path")
    resume: bool = option(False, "continue an interrupted run from its checkpoint", type=bool, api=False,
                          config=False)
    return_model: bool = option(False, cli=False, api=False, config=False, type=bool,
                                doc="return ``(model, tokenizer, record)`` instead of the record.")


@dataclass(frozen=True)
class EvaluationOptions:
    """What is measured after pruning."""
    evaluate: bool = option(True, "skip the evaluation after pruning", flags=("--no-eval",), type=bool,
                            record=True, api_default=False,
                            doc="also measure perplexity (and, with ``kl``, KL/top-1 against the dense model) into "
                                "the record.")
    kl: bool = option(True, "skip the data-free KL/top-1 against the dense model (held-out self-generated text)",
                      type=bool, doc="with ``evaluate``, KL(dense ‖ pruned) and top-1 agreement on held-out "
                                     "self-generated sequences (``record['divergence_self']``), no data needed.")
    eval_datasets: Any = option(None, "comma-separated evaluation texts: wikitext2, ptb, c4 (default from --protocol)",
                                flags=("--eval",), annotation="names")
    eval_seqlen: Optional[int] = option(None, "evaluation window (default from --protocol)", type=int,
                                        range="[2, inf)")
    eval_windows: Optional[int] = option(None, "evaluate only the first K windows, 0 = all (default from --protocol)",
                                         type=int, range="[0, inf)")
    reference: Optional[str] = option(None, "dense model to compare next-token distributions with (KL divergence, "
                                            "top-1 agreement; default: none)", api=False, record=True)
    eval_dense: bool = option(False, cli=False, api=False, config=False, type=bool,
                              doc="also evaluate the dense model first.")


@dataclass(frozen=True)
class ExecutionOptions:
    """Where and how the run executes."""
    device: Optional[str] = option(None, "cpu or cuda (default: cuda when available)", record=True, replay=False,
                                   key=True)
    nproc: int = option(1, "processes for block-parallel pruning (--mode dense-input; also runs under torchrun); at "
                           "most the CPU cores unless --force-nproc", type=int, range="[1, inf)", record=True)
    force_nproc: bool = option(False, "allow --nproc above the number of CPU cores (oversubscribed ranks)", type=bool)
    low_memory: bool = option(False, "read one block at a time from the safetensors shards and write the output "
                                     "shard by shard", type=bool, api=False)
    activation_dtype: Optional[str] = option(None, "dtype of the held calibration activations (the block "
                                                   "inputs; default: the model's)", choices=("float32", "float16", "bfloat16"),
                                             check=False, api=False)
    batch_size: Optional[int] = option(None, cli=False, config=True, type=int, range="[1, inf)", key=True,
                                       label="--batch-size",
                                       doc="calibration samples per forward (default: automatic).")
    progress: bool = option(True, cli=False, config=False, type=bool, doc="progress bars.")
    verbose: Optional[bool] = option(None, cli=False, api=False, config=False, type=bool,
                                     doc="print the header and the summary (default: when called from the CLI).")


#: group name → its class, in the order of the record and the docs
GROUPS = {"model": ModelOptions, "calibration": CalibrationOptions, "method": MethodOptions, "output": OutputOptions,
          "evaluation": EvaluationOptions, "execution": ExecutionOptions}


def options() -> dict:
    """Every run option: name → its :class:`dataclasses.Field` (metadata in ``.metadata``), groups in order."""
    return {f.name: f for cls in GROUPS.values() for f in dataclasses.fields(cls)}


def option_group(name: str) -> str:
    """The group that holds option ``name``."""
    return next(g for g, cls in GROUPS.items() if name in {f.name for f in dataclasses.fields(cls)})


def cli_flags(f) -> tuple:
    """The CLI spellings of an option (its declared flags, else `--name`, or `--no-name` for a boolean that is
    on by default)."""
    m = f.metadata
    if m["flags"]:
        return tuple(m["flags"])
    stem = f.name.replace("_", "-")
    return (f"--no-{stem}",) if m["type"] is bool and f.default is True else (f"--{stem}",)


def _label(f) -> str:
    """How an option is named in messages: its flag, ``name (--no-x)`` where the flag reads otherwise, or its
    Python name when it has no flag."""
    if f.metadata["label"] or not f.metadata["cli"]:
        return f.metadata["label"] or f.name
    flag = cli_flags(f)[0]
    return flag if flag == "--" + f.name.replace("_", "-") else f"{f.name} ({flag})"


# ============================================================================================ derived: checks
def run_options() -> dict:
    """The typed run options of ``prune`` and ``evaluate``: name → (type, range) (``task_limit`` is evaluate's)."""
    return {**{n: (f.metadata["type"], f.metadata["range"]) for n, f in options().items() if f.metadata["check"]},
            "task_limit": (int, "[1, inf)")}


def check_run_options(values: dict) -> dict:
    """The typed options among ``values`` checked and normalised (:func:`run_options`, through the registry's
    :func:`check_value`, as method options are: booleans parsed, ``"false"`` is False, integers written as
    strings read); returns those present and not None. Raises :class:`RunError`, one line naming the option."""
    from ..solvers.registry import check_value
    from .settings import RunError
    fields, out = options(), {}
    for k, (t, rng) in run_options().items():
        if k in values and values[k] is not None:
            label = _label(fields[k]) if k in fields else "--" + k.replace("_", "-")
            try:
                out[k] = check_value(label, values[k], type=t, range=rng)
            except ValueError as e:
                raise RunError(str(e)) from None
    return out


def config_keys() -> tuple:
    """The keys a ``--config`` file may set (the Python names of :func:`optprune.prune`: ``dataset`` for the
    calibration), the required ones first."""
    keys = [(not f.metadata["required"], f.metadata["api_name"] or n) for n, f in options().items()
            if f.metadata["config"]]
    return tuple(k for _, k in sorted(keys, key=lambda x: x[0]))


def replay_keys() -> tuple:
    """The recorded settings a ``--replay`` takes over as they are."""
    return tuple(n for n, f in options().items() if f.metadata["record"] and f.metadata["replay"])


# ============================================================================================ derived: signature
def _annotation(f):
    """The parameter annotation: declared (a type, or ``"path"``/``"model"``/``"names"`` for values of several
    types), else the option's type (Optional where its default is None)."""
    a = f.metadata["annotation"]
    if isinstance(a, str):
        return Any
    if a is not None:
        return a
    t = f.metadata["type"] or str
    return t if f.default is not None else Optional[t]


def signature(*, api: bool = False, extra=()) -> inspect.Signature:
    """The signature of :func:`optprune.llm_adapters.run.prune` (every option; ``model`` and ``method``
    positional, without defaults) or, with ``api``, of :func:`optprune.prune` (``model`` and ``tokenizer``
    positional, the others keyword-only, under their Python names such as ``dataset``). ``extra``: parameters
    appended (e.g. ``_cli``)."""
    P = inspect.Parameter
    first, rest = [], []
    for n, f in options().items():
        m = f.metadata
        if api and not m["api"]:
            continue
        default = m["api_default"] if api and m["api_default"] is not _REQUIRED else f.default
        if m["required"]:
            default = P.empty
        positional = n in (("model", "tokenizer") if api else ("model", "method"))
        kind = P.POSITIONAL_OR_KEYWORD if positional else P.KEYWORD_ONLY
        param = P((m["api_name"] or n) if api else n, kind, default=default, annotation=_annotation(f))
        (first if positional else rest).append(param)
    rest = [q for q in rest if q.default is P.empty] + [q for q in rest if q.default is not P.empty]
    return inspect.Signature(first + rest + list(extra))


def parameter_docs(*, api: bool = False, indent: str = "    ", width: int = 116) -> str:
    """The ``Args:`` entries of the options (``doc``, else the CLI help and flag), in the description's groups."""
    import textwrap
    lines = []
    for cls in GROUPS.values():
        for f in dataclasses.fields(cls):
            m = f.metadata
            if api and not m["api"]:
                continue
            name = (m["api_name"] or f.name) if api else f.name
            text = m["doc"] or (m["help"] + (f" (CLI ``{', '.join(cli_flags(f))}``)" if m["cli"] else ""))
            lines += textwrap.wrap(f"{name}: {text}", width=width, initial_indent=indent,
                                   subsequent_indent=indent + "    ", break_on_hyphens=False)
    return "\n".join(lines)


def with_signature(fn, *, api: bool = False, extra=()):
    """``fn`` given the derived signature and, in its docstring, the parameter docs (an ``Args:`` section, before
    its ``Returns:`` section if it has one)."""
    if not any(s[0] is fn for s in _SIGNED):
        _SIGNED.append((fn, api, extra, fn.__doc__ or ""))
    fn.__signature__ = signature(api=api, extra=extra)
    doc = inspect.cleandoc(next(s[3] for s in _SIGNED if s[0] is fn))
    args = "Args:\n" + parameter_docs(api=api)
    head, sep, tail = doc.partition("\nReturns:")
    fn.__doc__ = f"{head.rstrip()}\n\n{args}\n" + (f"\nReturns:{tail}" if sep else "")
    return fn


#: the functions whose signature and docs come from the description (re-derived when an option is added)
_SIGNED: list = []


def from_api(given: dict) -> dict:
    """Arguments of :func:`optprune.prune` under the option names (``dataset`` → ``calibration``)."""
    names = {f.metadata["api_name"]: n for n, f in options().items() if f.metadata["api_name"]}
    return {names.get(k, k): v for k, v in given.items()}


def bind(sig: inspect.Signature, args: tuple, kwargs: dict, what: str) -> dict:
    """The arguments of a call by ``sig`` as a dict of every parameter (defaults applied); a wrong or missing
    name is the ``TypeError`` Python gives for a real function."""
    try:
        b = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{what}(): {e}") from None
    b.apply_defaults()
    return dict(b.arguments)


# ============================================================================================ derived: CLI
def add_cli_options(parser, names=None) -> None:
    """The ``optprune prune`` options (``names``: only these, e.g. the ones ``optprune eval`` shares), one argparse
    group per description group, with the declared flags, help, defaults, types and choices."""
    wanted = None if names is None else set(names)
    for g, cls in GROUPS.items():
        fields = [f for f in dataclasses.fields(cls) if f.metadata["cli"] and (wanted is None or f.name in wanted)]
        if not fields:
            continue
        grp = parser.add_argument_group(f"{g} options") if wanted is None else parser
        for f in fields:
            m = f.metadata
            kw = dict(dest=m["dest"] or f.name, help=m["help"])
            if m["type"] is bool:
                kw["action"] = "store_false" if f.default is True else "store_true"
            else:
                kw["default"] = f.default
                if m["action"]:
                    kw["action"] = m["action"]
                if m["type"] in (int, float):
                    kw["type"] = m["type"]
                if m["choices"]:
                    kw["choices"] = list(m["choices"])
                if m["metavar"]:
                    kw["metavar"] = m["metavar"]
            grp.add_argument(*cli_flags(f), **kw)


def cli_destinations() -> dict:
    """CLI destination → option name, where they differ (``dataset`` → ``calibration``)."""
    return {f.metadata["dest"]: n for n, f in options().items() if f.metadata["cli"] and f.metadata["dest"]}


# ============================================================================================ the description
@dataclass(frozen=True)
class RunDescription:
    """A resolved prune run: the options as given (typed, in their groups) and what :func:`resolve` derived from
    them before any weight is read. Built only by :func:`resolve`."""
    model: ModelOptions
    calibration: CalibrationOptions
    method: MethodOptions
    output: OutputOptions
    evaluation: EvaluationOptions
    execution: ExecutionOptions
    spec: Any                       # the method's registry entry (or the depth rule)
    method_options: dict            # the method's options, normalised by its registration
    sparsity: float                 # the resolved sparsity (N:M: 1 − N/M; --quant alone: 0)
    pattern: Any                    # the parsed pattern object (None for structured / hidden / depth runs)
    structure: str                  # the resolved structure (mlp by default; --equal-widths: heads → heads:kv)
    allocation: str                 # the normalised allocation spec
    depth: bool                     # --structure depth: whole blocks
    hidden: bool                    # --structure hidden: the residual stream
    nproc: int
    world: int                      # block-parallel processes (--nproc, or the ranks of a torchrun)
    device: str                     # the resolved compute device
    out_dir: Optional[Path]
    targets: Optional[list]
    ignore: Optional[list]
    model_label: str                # the model as named in records (a loaded model: its name_or_path)
    model_info: Optional[dict]      # config, bytes and path of a model on disk (None for a loaded model)
    calib_given: Any                # in-memory calibration (texts, Dataset, token ids), else None
    data_free: bool                 # a method that needs no calibration statistics
    packing: Optional[str]          # rows / windows for texts, None otherwise
    file_rows: Optional[list]       # a text file's lines, when packed as rows
    protocol: dict                  # the effective calibration/evaluation settings (settings.resolve_settings)
    verbose: bool

    def get(self, name: str):
        """The value of option ``name`` as given (after its type check)."""
        return getattr(getattr(self, option_group(name)), name)

    def value(self, name: str):
        """Option ``name`` as the run uses it (resolved where :func:`resolve` resolved it)."""
        resolved = {
            "model": str(self.model_label), "method": self.spec.name, "sparsity": self.sparsity,
            "structure": self.structure, "allocation": self.allocation, "method_options": self.method_options,
            "device": self.device, "nproc": self.nproc, "seed": self.protocol["seed"],
            "output": str(self.out_dir) if self.out_dir else None, "targets": self.targets, "ignore": self.ignore,
            "calibration_packing": self.packing, "evaluate": bool(self.get("evaluate")),
            "error_correction": bool(self.get("error_correction")), "refit": bool(self.get("refit")),
            "certify": bool(self.get("certify"))}
        if name in resolved:
            return resolved[name]
        if name == "data_dir":
            from . import data as D
            return str(D.resolve_data_dir(self.get("data_dir")))
        return self.get(name)

    def options_namespace(self) -> types.SimpleNamespace:
        """Every option as given, by name (for checks written against option names)."""
        return types.SimpleNamespace(**{n: self.get(n) for n in options()})

    def record(self, **resolved) -> dict:
        """run.json's ``config``: every recorded option as the run used it; ``resolved`` overrides values the run
        settled later (e.g. the sparsity a speed budget chose, the pipeline's damping). An option that does not
        apply to the run (a pattern for a structured method, a structure for an unstructured one, a sparsity under
        a depth budget) is recorded as None."""
        structured = bool(self.spec.structured)
        budget = self.depth and (self.get("speedup") is not None or self.get("flops") is not None)
        not_applicable = {"pattern": structured or self.hidden, "structure": not (structured or self.hidden),
                          "equal_widths": not structured, "sparsity": budget}
        rec = {}
        for n, f in options().items():
            if f.metadata["record"]:
                v = resolved[n] if n in resolved else self.value(n)
                rec[n] = None if not_applicable.get(n) else (bool(v) if f.metadata["type"] is bool else v)
        return rec

    def resume_key(self, **resolved) -> dict:
        """The settings a checkpoint belongs to: the options marked ``key`` as the run uses them, and the effective
        calibration (source, file, size, seed); ``--resume`` refuses a checkpoint made with others."""
        key = {n: (resolved[n] if n in resolved else self.value(n)) for n, f in options().items() if f.metadata["key"]}
        key.update({k: self.protocol.get(k) for k in ("calibration", "calibration_path", "nsamples", "seqlen", "seed")})
        return key


# ============================================================================================ resolve
def resolve(*args, **kwargs) -> RunDescription:
    """The :class:`RunDescription` of a prune run from the options of :func:`optprune.llm_adapters.run.prune`
    (same names, same positions): every value type-checked, every combination, file and folder checked, the
    protocol resolved and the pattern parsed — all before any weight is read. Bad input raises a one-line
    ``ValueError`` (mostly :class:`RunError`) or ``FileNotFoundError``, and nothing is written."""
    from .resolution import derive
    given = bind(signature(extra=RESOLVE_EXTRA), args, kwargs, "prune")
    cli = bool(given.pop("_cli", False))
    given.update(check_run_options(given))  # typed options parsed (booleans never by truthiness)
    groups = {g: cls(**{f.name: given[f.name] for f in dataclasses.fields(cls)}) for g, cls in GROUPS.items()}
    derived = derive(types.SimpleNamespace(**given))
    verbose = cli if given["verbose"] is None else bool(given["verbose"])
    return RunDescription(**groups, **derived, verbose=verbose)


RESOLVE_EXTRA = (inspect.Parameter("_cli", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool),)


# ============================================================================================ extending
def add_option(group: str, name: str, spec: dataclasses.Field, annotation=Any) -> None:
    """Add option ``name`` (made with :func:`option`) to ``group`` at run time — what one more field line in the
    group's class above amounts to — and re-derive the signatures of the functions built from the description.
    An existing name or an unknown group is an error."""
    if group not in GROUPS:
        raise ValueError(f"unknown option group {group!r}; groups: {', '.join(GROUPS)}")
    if name in options() or name in {s.name for s in signature(extra=RESOLVE_EXTRA).parameters.values()}:
        raise ValueError(f"run option {name!r} exists already")
    cls = GROUPS[group]
    fields = [(f.name, f.type, field(default=f.default, metadata=f.metadata)) for f in dataclasses.fields(cls)]
    new = dataclasses.make_dataclass(cls.__name__, fields + [(name, annotation, spec)], frozen=True,
                                     namespace={"__doc__": cls.__doc__, "__module__": cls.__module__})
    GROUPS[group] = new
    _resign()


def _resign() -> None:
    for fn, api, extra, _ in _SIGNED:
        with_signature(fn, api=api, extra=extra)


@contextlib.contextmanager
def isolated():
    """Options added inside are removed on leaving (tests, the executed docs)."""
    before = dict(GROUPS)
    try:
        yield
    finally:
        GROUPS.clear()
        GROUPS.update(before)
        _resign()
