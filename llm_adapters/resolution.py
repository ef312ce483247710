"""How :func:`~optprune.llm_adapters.description.resolve` derives a run from its options, before any weight is
read: the method and its options, the combinations of options (what a method or pattern would silently ignore
is an error), the sparsity and the pattern (parsed here, once), the execution (processes, device), the files and
folders (:mod:`.preflight`), the protocol settings (:mod:`.settings`) and the calibration packing.

:func:`derive` returns the derived part of the :class:`~optprune.llm_adapters.description.RunDescription`;
every failure is one line (:class:`~optprune.llm_adapters.settings.RunError`, ``PreflightError`` or
``FileNotFoundError``) and nothing is written.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..formulations.patterns import NM, check_sparsity, parse_pattern
from . import data as D
from . import preflight
from .model_files import PreflightError
from .settings import (ALLOCATIONS_FALLBACK, RunError, check_sizes, clip_to_context, cpu_cores, default_device,
                       model_sizes, resolve_settings)

__all__ = ["derive", "check_allocation", "equal_widths_structure"]

log = logging.getLogger("optprune")


def derive(o) -> dict:
    """The derived fields of a run description from the typed options ``o`` (attributes named as the options).
    The order of the checks is the order their errors are reported in."""
    from .calib_inputs import check_calibration_type
    check_calibration_type(o.calibration)  # a number, dict, generator or bytes: a TypeError, not a file name
    depth = str(o.structure or "").strip().lower() == "depth"
    spec = _method_spec(o, depth)
    if o.method_options is not None and not isinstance(o.method_options, dict):
        raise RunError("method_options must be a dict of method option → value")
    # an option the solver does not read, or a value outside its declared type/range/choices, fails here
    method_options = spec.normalize_options(dict(o.method_options or {}))
    combos = _check_combinations(o, spec)
    files = _check_files(o, spec, combos["nm"])
    structure = o.structure or "mlp"
    hidden = str(structure).strip().lower() == "hidden"  # slice the residual stream (hidden.py)
    sparsity = _resolve_sparsity(o, spec, hidden, combos)
    pattern = _check_pattern(o, spec, hidden, sparsity)
    nproc, world = _check_execution(o)
    alloc = check_allocation(o.allocation)
    if o.quant is not None and alloc != "uniform":
        _check_bit_allocation(o, alloc, sparsity)
    device = default_device(o.device)
    in_memory = isinstance(o.model, torch.nn.Module)
    cfg = o.model.config.to_dict() if in_memory else ((files["model"] or {}).get("config") or None)
    from . import export
    export.check_save_options(o.save_format, o.dtype, structured=spec.structured, config=cfg, quant=o.quant,
                              gguf_type=o.gguf_type)
    from .targets import parse_patterns
    targets, ignore = parse_patterns(o.targets, "targets"), parse_patterns(o.ignore, "ignore")
    if o.equal_widths:
        structure = equal_widths_structure(spec, structure, alloc, targets or ignore)
    label = (getattr(o.model.config, "name_or_path", "") or type(o.model).__name__) if in_memory else o.model
    calib = _resolve_calibration(o, spec, alloc, device, label, files["model"])
    _final_checks(o, calib["protocol"], files["model"])
    return dict(spec=spec, method_options=method_options, sparsity=sparsity, pattern=pattern, structure=structure,
                allocation=alloc, depth=depth, hidden=hidden, nproc=nproc, world=world, device=device,
                out_dir=files["out_dir"], targets=targets, ignore=ignore, model_label=label,
                model_info=files["model"], **calib)


def _method_spec(o, depth: bool):
    """The method's registry entry (or, for ``--structure depth``, the block-selection rule) and the options
    only it reads (the speed and FLOP budgets)."""
    if depth:  # whole blocks: --method names a block-selection rule (llm_adapters/depth.py)
        from .depth import check_depth_options, depth_rule
        try:
            spec = depth_rule(o.method)
        except ValueError as e:
            raise RunError(str(e)) from None
        check_depth_options(o)
        return spec
    from ..solvers import get_method
    spec = get_method(o.method)
    if o.flops is not None:
        raise RunError("--flops applies to --structure depth")
    if o.speedup is not None:  # per-block widths chosen under the measured latency model
        from .widths import check_speed_widths
        try:
            check_speed_widths(o, spec)
        except ValueError as e:
            raise RunError(str(e)) from None
    return spec


def _pattern_given(o) -> bool:
    return o.pattern is not None and str(o.pattern).strip().lower() != "unstructured"


def _check_combinations(o, spec) -> dict:
    """Options the method would ignore, and the N:M pattern (it fixes the sparsity). Returns ``{"nm": NM or
    None}``."""
    structure = o.structure or "mlp"
    if spec.structured:
        if _pattern_given(o) and str(o.pattern).strip().lower() not in ("unstructured", "groups", "structured"):
            raise PreflightError(f"--pattern {o.pattern}: {spec.name} is a structured method (it removes whole "
                                 f"groups chosen by --structure); drop --pattern")
        if o.min_degree is not None:
            raise PreflightError(f"--min-degree applies to N:M patterns; {spec.name} is a structured method")
    elif o.structure is not None and str(structure).strip().lower() != "hidden":
        raise PreflightError(f"--structure {structure} applies to structured methods; {spec.name} prunes "
                             f"individual weights (--pattern)")
    if str(structure).strip().lower() == "hidden":
        preflight.check_hidden(spec, pattern_given=_pattern_given(o), min_degree=o.min_degree,
                               allocation=o.allocation, low_memory=o.low_memory)
    elif set(spec.patterns) == {"subspace"}:
        raise PreflightError(f"{spec.name} keeps a subspace of the residual stream: use it with --structure hidden")
    nm = None
    if not spec.structured:
        pat = parse_pattern(o.pattern, o.sparsity if o.sparsity is not None else 0.5, min_degree=o.min_degree)
        if isinstance(pat, NM):
            nm = pat
            if o.sparsity is not None and abs(float(o.sparsity) - (1 - pat.N / pat.M)) > 1e-9:
                raise PreflightError(f"--sparsity {o.sparsity} contradicts --pattern {o.pattern} (N:M fixes the "
                                     f"sparsity at {1 - pat.N / pat.M:g}); drop --sparsity")
    if o.allocation_eps is not None and (o.allocation or "uniform").strip().lower() == "uniform":
        raise PreflightError("--allocation-eps applies to --allocation alpha/owl, not uniform")
    if not o.evaluate:
        given = [k for k, v in (("--eval", o.eval_datasets), ("--eval-seqlen", o.eval_seqlen),
                                ("--eval-windows", o.eval_windows)) if v is not None]
        if given:
            raise PreflightError(f"{given[0]} applies to the evaluation, which --no-eval turns off")
    if o.resume and o.low_memory:
        raise PreflightError("--resume is not available with --low-memory")
    if o.checkpoint_dir is not None and o.low_memory:
        raise PreflightError("--checkpoint-dir is not available with --low-memory")
    if o.checkpoint_dir is None and o.output is None and o.resume:
        raise PreflightError("--resume needs --output (or --checkpoint-dir) to find the checkpoint")
    return {"nm": nm}


def _check_files(o, spec, nm) -> dict:
    """Data folder, model and reference files, shapes from the model's metadata, the output folder. Returns
    ``{"out_dir", "model"}`` (the model's config, bytes and path; None for a loaded model)."""
    from ..formulations.grid import parse_grid
    preflight.check_data_dir(o.data_dir)
    in_memory = isinstance(o.model, torch.nn.Module)  # a loaded model: nothing on disk to check
    info = None if in_memory else preflight.check_model_source(o.model, o.model_dir)
    if o.reference:
        preflight.check_model_source(o.reference, o.model_dir, what="--reference")
    preflight.check_shapes(info and info.get("config"), structured=spec.structured,
                           nm_M=nm.M if nm is not None else None, structure=o.structure or "mlp",
                           sparsity=float(o.sparsity if o.sparsity is not None else 0.5), pattern=o.pattern,
                           quant_group=parse_grid(o.quant).group if o.quant is not None else None)
    need = 0
    if info:  # the saved weights (model dtype) + the block checkpoints, with a margin
        need = int(info["bytes"] * (2 if o.checkpoint_dir is None else 1) * 1.1)
    out_dir = preflight.check_output(o.output, model=None if in_memory else o.model, model_dir=o.model_dir,
                                     overwrite=o.overwrite, need_bytes=need, allow_existing_run=False)
    return {"out_dir": out_dir, "model": info}


def _resolve_sparsity(o, spec, hidden: bool, combos: dict) -> float:
    """The sparsity: given, else 1 − N/M for N:M, 0 for ``--quant`` alone, 0.5 otherwise."""
    nm = combos["nm"]
    sparsity = o.sparsity if o.sparsity is not None else ((1 - nm.N / nm.M) if nm is not None else 0.5)
    if o.quant is not None:  # quantization alone prunes nothing unless asked (N:M fixes its own sparsity)
        if spec.structured or hidden:
            raise RunError(f"--quant puts kept weights on a grid; {spec.name} "
                           f"{'slices the hidden dimension' if hidden else 'is a structured method'}")
        if o.sparsity is None and nm is None:
            sparsity = 0.0
    return check_sparsity(sparsity)


def _check_pattern(o, spec, hidden: bool, sparsity: float):
    """The pattern object (parsed once, with the resolved sparsity and grid) against what the method handles;
    None for structured and hidden runs."""
    if hidden:
        if o.targets or o.ignore or o.save_format != "dense" or int(o.nproc or 1) != 1 or o.certify or o.refit:
            raise RunError("--structure hidden slices the whole residual stream on one process: it takes no "
                           "--targets/--ignore, --nproc, --certify or --refit, and saves the dense format")
        return None
    if spec.structured:
        return None
    pattern = parse_pattern(o.pattern, sparsity, min_degree=o.min_degree, quant=o.quant)
    kind = pattern.kind
    if kind == "grid" and kind not in spec.patterns:
        from ..solvers.registry import method_specs
        raise RunError(f"method {spec.name!r} does not put weights on a grid (--quant); methods that do: "
                       f"{', '.join(m.name for m in method_specs() if 'grid' in m.patterns)}")
    if spec.patterns == frozenset({"grid"}) and kind != "grid":
        raise RunError(f"method {spec.name!r} puts weights on a quantization grid: give --quant (e.g. w4g128)")
    if kind not in spec.patterns:
        raise RunError(f"method {spec.name!r} does not handle the {kind} pattern "
                       f"(it takes: {', '.join(sorted(spec.patterns))})")
    return pattern


def _check_execution(o) -> tuple:
    """``(nproc, world)``: processes and the block-parallel world they make."""
    from .distributed import world_for
    if o.mode not in ("sequential", "dense-input"):
        raise RunError(f"--mode must be sequential or dense-input, got {o.mode!r}")
    nproc = int(o.nproc or 1)
    if nproc > 1 and nproc > cpu_cores() and not o.force_nproc:
        raise RunError(f"--nproc {nproc} is more than the {cpu_cores()} CPU cores this process may use (each "
                       f"rank prunes its blocks on its own core); lower --nproc, or pass --force-nproc to "
                       f"oversubscribe")
    world = world_for(nproc)  # block-parallel pruning (--nproc N, or ranks of a torchrun)
    if o.save_format == "pack-quantized" and (o.resume or world > 1):
        # each layer's grid scales live on its module in this process (not in checkpoints or other ranks)
        raise RunError("--save-format pack-quantized needs the whole prune in one process: not with --resume "
                       "or --nproc > 1")
    if world > 1 and o.mode != "dense-input":
        raise RunError("--nproc > 1 (or a torchrun world > 1) needs --mode dense-input (independent blocks); "
                       "the sequential mode stays single-process")
    return nproc, world


def check_allocation(allocation) -> str:
    """The normalised ``--allocation`` spec; unknown names and options fail here."""
    alloc = (allocation or "uniform").strip().lower()
    if alloc == "uniform":
        return alloc
    try:
        from . import allocation as alloc_mod
    except ModuleNotFoundError as e:
        raise RunError(f"--allocation {allocation} needs optprune.llm_adapters.allocation, which is not "
                       f"available ({e})") from None
    if hasattr(alloc_mod, "parse_allocation"):  # NAME[:OPTION...], e.g. alpha:median, auto
        try:
            alloc_mod.parse_allocation(alloc)
        except ValueError as e:
            raise RunError(str(e)) from None
    else:
        known = getattr(alloc_mod, "ALLOCATIONS", ALLOCATIONS_FALLBACK)
        if alloc not in known:
            raise RunError(f"unknown allocation {allocation!r}; choose from {', '.join(known)}")
    return alloc


def _check_bit_allocation(o, alloc: str, sparsity: float) -> None:
    """``--quant`` with an allocation distributes bit widths (llm_adapters/allocation_bits.py): the sparsity stays
    uniform (none, or one given), the spec is one a bit allocation takes, and the layers are saved per width."""
    from .allocation_bits import check_bit_allocation
    if sparsity > 0:
        raise RunError(f"--allocation {alloc} with --quant distributes bit widths over the layers (mean: the --quant "
                       f"bits); it does not also allocate sparsity: drop --sparsity/--pattern or --allocation")
    try:
        check_bit_allocation(alloc)
    except ValueError as e:
        raise RunError(str(e)) from None


def equal_widths_structure(spec, structure: str, allocation: str, chosen_layers: bool) -> str:
    """``--equal-widths``: the structured program keeps the same widths in every block, so that the saved config
    states them (stock tools load it). Every block removes the same number of groups (one sparsity for all:
    uniform allocation, every block pruned), and under grouped-query attention heads are removed as whole
    key/value groups (``heads`` → ``heads:kv``): the kept query heads then share out evenly over the kept
    key/value heads, with no replicated key/value head whose count would differ from block to block
    (``docs/methods.md §4``, equal widths). Returns the structure string to prune with."""
    if not spec.structured:
        raise RunError(f"--equal-widths constrains structured methods (spap, flap, group_magnitude, ...); "
                       f"{spec.name!r} keeps every matrix's shape")
    if allocation != "uniform":
        raise RunError(f"--equal-widths gives every block the same widths; --allocation {allocation} gives blocks "
                       f"different sparsities (drop one of them)")
    if chosen_layers:
        raise RunError("--equal-widths prunes every block alike; --targets/--ignore would leave some blocks at "
                       "other widths")
    return ",".join("heads:kv" if k.strip().lower() == "heads" else k.strip() for k in structure.split(","))


def _resolve_calibration(o, spec, alloc: str, device: str, label, info: Optional[dict]) -> dict:
    """The protocol settings and the calibration: in-memory data, data-free methods, the packing and a text
    file's rows (read before any weight). Returns ``protocol``, ``calib_given``, ``data_free``, ``packing``,
    ``file_rows``."""
    from .calib_inputs import calibration_kind, is_in_memory
    in_memory = isinstance(o.model, torch.nn.Module)
    calib_given = o.calibration if is_in_memory(o.calibration) else None
    if o.low_memory and (in_memory or calib_given is not None or o.targets or o.ignore
                         or o.save_format != "dense" or o.dtype not in (None, "auto")):
        raise RunError("--low-memory takes a model path, a named/file calibration, all layers, the dense "
                       "format and --dtype auto")
    s = resolve_settings(label, protocol=o.protocol, calibration=None if calib_given is not None else o.calibration,
                         nsamples=o.nsamples, seqlen=o.seqlen, seed=o.seed, eval_datasets=o.eval_datasets,
                         eval_seqlen=o.eval_seqlen, eval_windows=o.eval_windows, data_dir=o.data_dir,
                         need_calibration=calib_given is None, need_eval=bool(o.evaluate))
    if calib_given is not None:
        s["calibration"] = s["overrides"]["calibration"] = calibration_kind(calib_given)
        s["name"] = s["base"] + "+custom"
    # a data-free method (no statistics, no refit, uniform allocation) is never calibrated
    data_free = spec.needs == "none" and not o.refit and alloc == "uniform" and not o.low_memory
    if not data_free:
        sizes = model_sizes(o.model, (info or {}).get("config"))
        check_sizes(s, device=device, **sizes)  # context length and activation memory, from metadata
    packing = _packing(o, s, calib_given, alloc)
    file_rows = None
    if data_free:
        packing = None  # never calibrated
    elif packing == "rows" and calib_given is None:  # a text file's lines, read before any weight
        from .calib_inputs import CalibrationInputError, file_rows as read_rows
        file_rows = read_rows(s["calibration_path"])
        if not file_rows:
            raise CalibrationInputError(f"{s['calibration_path']}: no calibration text (every line is empty)")
    if s["calibration"] == "self":
        try:
            from . import selfcalib  # noqa: F401
        except ModuleNotFoundError as e:
            raise RunError(f"--calibration self needs optprune.llm_adapters.selfcalib ({e})") from None
    if data_free:
        s.update(calibration="none", calibration_path=None, nsamples=0, seqlen=0)
        s.pop("calibration_note", None)
    return dict(protocol=s, calib_given=calib_given, data_free=data_free, packing=packing, file_rows=file_rows)


def _packing(o, s: dict, calib_given, alloc: str) -> Optional[str]:
    """How texts become calibration samples: ``rows`` or ``windows`` for texts (lists, Datasets, text files),
    None for the other sources (named data sets are windowed by their protocol; self / token ids as they
    come). An explicit ``calibration_packing`` that cannot apply is an error."""
    from ..solvers.registry import check_value
    from .calib_inputs import PACKINGS
    given = o.calibration_packing
    if given is not None:
        given = check_value("--calibration-packing", given, type=str, choices=PACKINGS).strip().lower()
    texts = (calib_given is not None and not torch.is_tensor(calib_given)) or (
        calib_given is None and s.get("calibration") not in (None, "self")
        and not str(s.get("calibration_path") or "").startswith("hub:")
        and D.known_dataset(str(s["calibration"])) is None)
    if not texts:
        windowed = s.get("calibration") not in (None, "self", "token ids")  # a named data set: its windows
        if given is not None and not (windowed and given == "windows"):
            raise RunError(f"--calibration-packing {given} applies to texts (a list of strings, a "
                           f"datasets.Dataset or a text file), not to calibration {s.get('calibration')!r}")
        return "windows" if windowed else None
    blocker = ("--low-memory" if o.low_memory else f"--allocation {alloc}"
               if alloc != "uniform" and not (alloc.startswith("alpha") and "bounded" not in alloc) else None)
    if blocker and given == "rows":
        raise RunError(f"--calibration-packing rows is not available with {blocker} (it measures activations "
                       f"on fixed-length windows); use --calibration-packing windows")
    if blocker and given is None:
        log.warning(f"calibration texts packed as windows of {s['seqlen']} tokens (rows as samples are not "
                    f"available with {blocker})")
    return given or ("windows" if blocker else "rows")


def _final_checks(o, s: dict, info: Optional[dict]) -> None:
    """Window lengths against the context the config / GGUF header gives (an explicit one too long is refused
    now, not after the load; the same rule runs again on the loaded model), the notes, the low-memory-only
    options."""
    clip_to_context(s, preflight.context_length((info or {}).get("config")))
    for note in (s.get("calibration_note"), s.get("eval_note") if o.evaluate else None):
        if note:
            log.warning(note)
    if o.activation_dtype is not None:
        from .offload import parse_dtype
        parse_dtype(o.activation_dtype)  # a dtype it does not know: one line naming the valid ones
    if o.certify and o.low_memory:
        raise RunError("--certify is not available with --low-memory (run it in memory)")
