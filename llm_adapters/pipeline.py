"""The sequential pruning pipeline (docs/methods.md §0).

``prune_model(model, calib_ids, config)`` prunes a transformers causal LM block by block:

1. **Capture** what every block receives, from the model's own forward: each block is replaced by a recorder
   that keeps its arguments (attention mask, position ids, ``position_embeddings``, cache position ... — each
   block its own: alternating sliding-window/global masks and per-layer-type rotary tables included) and passes
   the hidden state through; the last one stops the forward. Block 0's hidden states start the stream. Cache
   objects are replaced by ``None``. Calibration runs one batch of samples at a time; identical arguments
   (across blocks and batches) are stored once.
2. For each block, for each group of sub-layers in ``arch.sublayers`` order (``q,k,v → o → up,gate → down``),
   **accumulate the Gram matrices** of the group's input with forward pre-hooks (float32, streaming over the
   batches, never holding all tokens). Sub-layers of one group share their input and their Grams.

   * ``error_correction=True`` (FISTAPruner's intra-block order): per group and batch the block runs twice,
     up to the group's input only (the hook stops the forward): a deep copy of the *dense* block gives ``X``,
     the pruned-so-far block gives ``X̂``; both see the same block input. ``H, Ĥ, C`` →
     ``f(W) = ½‖W X̂ − W0 X‖²``.
   * ``error_correction=False`` (the SparseGPT/Wanda reference order): one pass of the still-dense block
     collects ``H = X Xᵀ`` of every group at once; every sub-layer is solved on ``X̂ = X`` (dense within the
     block; the block input itself comes from the stream chosen by ``mode``).
3. **Solve** each sub-layer: ``LayerProblem`` from the Grams, ``get_method(config.method)(problem, pattern,
   **method_options)``, optionally ``refit_result``; NaN/Inf → :class:`NumericalError` naming the layer.
   **Write back** in the model's dtype and device.
4. **Propagate**: the next block's inputs are this block's outputs — of the pruned block (``mode=
   "sequential"``) or of the dense block (``mode="dense-input"``: blocks are independent, so ``blocks=[i]``
   prunes block ``i`` exactly as a full run would: the basis for parallel pruning).

Statistics per sub-layer: full Grams whenever the method needs them (``needs_for(options) == "gram"``), a refit is asked for,
or the width ``n ≤ DIAG_ONLY_ABOVE`` (cheap: the reconstruction error is then reported for every method,
magnitude and Wanda included). Above that width, ``needs in ("none", "diag")`` methods get only
``Σ x̂_j²`` (Wanda's ``‖X_j‖²``); ``H`` is then the diagonal matrix of it and the error fields are ``None``.

With full Grams the problem also carries ``meta["input_mean"]`` (mean of X) and, error-corrected,
``meta["input_mean_hat"]`` (mean of X̂): FLAP-style bias compensation reads them.

Structured methods (``spec.structured``) prune the structure sub-layers (``down``/``fc2`` for ``"mlp"``,
``o``/``out_proj`` for ``"heads"``) named by ``llm_adapters.surgery.structure_pattern``, in block order (heads
before MLP), and let ``surgery.apply_structured`` shrink the block. Their ``error`` is ``f(W)`` of the method's
``W`` (a bias compensation the method adds is not part of ``f``).

Record per sub-layer: ``name, block, shape [m, n], pattern, sparsity_target, sparsity`` (zeros of the written
weight; structured: ``1 − nnz/(m·n)`` of the shrunk layer, plus ``shape_after``), ``error_before = f(W0)``
(0 unless error-corrected), ``error = f(W)`` (of the weights as written, i.e. after the cast to the model
dtype), ``rel_error = error/f(0)``, ``time_s`` (method + refit), ``stats``, ``nsamples`` (tokens), ``feasible``,
and the method's scalar ``info`` items (its own ``time_s`` as ``method_time_s``).

Memory: one block (plus its dense copy with error correction), one activation buffer (``nsamples × seqlen ×
hidden``, in ``activation_dtype`` — default the model's — on the compute device: each forward writes a batch's outputs over that batch's inputs)
and the Grams of one group (uncorrected: of every group of the block, each freed once its layers are solved).
A model on the CPU with ``device="cuda"`` stays on the CPU; each block visits the GPU while it is pruned.
"""
from __future__ import annotations

import copy
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..formulations import NumericalError, PatternError, parse_pattern
from ..formulations.patterns import NM, Pattern, Unstructured, check_sparsity
from ..solvers.serialization import to_json
from .architectures import ArchSpec, get_arch, get_module, linear_weight, set_linear_weight
from .devices import parameter_devices, resolve_device
from .stats import InputStats

__all__ = ["PruneConfig", "PipelineError", "prune_model", "validate_config", "capture_block_inputs",
           "BlockInputs", "forward_block", "pattern_kind", "DIAG_ONLY_ABOVE", "TOKENS_PER_BATCH",
           "peak_rss_mb", "forward_batch_size", "call_block"]

#: above this input width, methods that need no Gram get only the diagonal Σ x̂_j² (no error reported)
DIAG_ONLY_ABOVE = 4096
#: default calibration batch: this many tokens per forward (seqlen 2048 → one sample at a time)
TOKENS_PER_BATCH = 2048

_STRUCTURE_KINDS = ("mlp", "heads", "heads:kv")  # heads:kv = whole key/value groups (GQA), see surgery
_MODES = ("sequential", "dense-input")


class PipelineError(ValueError):
    """Bad input to the pipeline (one line; raised before the model is touched)."""


@dataclass
class PruneConfig:
    method: str
    sparsity: float = 0.5
    pattern: str = "unstructured"          # parse_pattern(pattern, sparsity, min_degree=...)
    min_degree: Optional[int] = None       # expander N:M (EGGS)
    quant: Optional[str] = None            # quantization grid of the kept weights (formulations/grid.py)
    layer_sparsity: Optional[dict] = None  # full sub-layer module name -> sparsity (allocation)
    layer_quant: Optional[dict] = None     # full sub-layer module name -> grid (mixed precision; others: quant)
    structure: str = "mlp"                 # structured methods: "mlp", "heads", "heads:kv", "mlp,heads", …
    mode: str = "sequential"               # "sequential" | "dense-input"
    error_correction: bool = True          # within a block: X̂ from pruned upstream, target dense W0 X
    refit: bool = False                    # finish each layer with solvers.methods.baselines.refit_result
    method_options: dict = field(default_factory=dict)
    damp: float = 0.01
    device: Optional[str] = None           # default cuda if available else cpu
    blocks: Optional[list] = None          # only prune these block indices; others untouched
    gram_dtype: torch.dtype = torch.float32
    batch_size: Optional[int] = None       # calibration samples per forward (default: TOKENS_PER_BATCH tokens)
    targets: Optional[list] = None         # sub-layers to prune: names, class names, re:REGEX (llm_adapters.targets)
    ignore: Optional[list] = None          # sub-layers left dense (same patterns)
    certify: bool = False                  # per layer: lower bound on the L0 optimum (solvers.verification.certificates), ℓ1 gap
    calib_lengths: Optional[tuple] = None  # tokens of each calibration row (rows as samples); None: all full
    activation_dtype: Optional[torch.dtype] = None  # dtype of the held block inputs (default: the model's)


# ============================================================================================ helpers
class _Stop(Exception):
    """Raised by hooks to end a forward early (once the needed input has been seen)."""


def pattern_kind(p: Pattern) -> str:
    """The registry's pattern kind of a pattern object (each pattern class declares its own)."""
    return p.kind


def _is_cache(obj) -> bool:
    try:
        from transformers.cache_utils import Cache
    except Exception:  # pragma: no cover - transformers missing
        return False
    return isinstance(obj, Cache)


def _same(a, b) -> bool:
    """Structural equality of captured block arguments (tensors compared by value)."""
    if a is b:
        return True
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _single_device(model: nn.Module) -> torch.device:
    """The one device holding all of the model's parameters; :class:`PipelineError` when they are spread."""
    devs = parameter_devices(model)
    if len(devs) != 1:
        raise PipelineError(f"the model is spread over several devices ({', '.join(map(str, sorted(devs, key=str)))}); "
                            f"load it on one device (the pipeline moves one block at a time to the compute device)")
    return devs.pop()


def _check_target(name: str, method: str, pat: Pattern, shape, nonzero: int) -> None:
    """A layer keeps at most what its pattern allows (``kept_count``: the target with the pattern's own rounding
    — N of every M, whole groups; for unstructured sparsity per matrix also the per-row rounding, since Wanda
    and RIA compare within rows); more means the method missed its target (e.g. an option that made it skip its
    mask), and the run stops before anything is saved."""
    kept = pat.kept_count(shape)
    if isinstance(pat, Unstructured) and pat.scope == "matrix":
        kept = max(kept, Unstructured(pat.sparsity, "row").kept_count(shape))
    if nonzero > kept:
        from .settings import RunError
        m, n = shape
        raise RunError(f"layer {name!r}: {method} kept {nonzero} of {m * n} weights (sparsity "
                       f"{1 - nonzero / (m * n):.4f}); its pattern {pat.name} allows at most {kept} (sparsity "
                       f"{1 - kept / (m * n):.4f}) — the method missed its target, nothing was saved; check its "
                       f"options (-O)")


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A float32 contiguous copy that never aliases the module's storage."""
    return t.detach().to(dtype=torch.float32, copy=True).contiguous()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ============================================================================================ capture / replay
class _Recorder(nn.Module):
    """Stands in for block ``index`` during the capture: records the arguments the model hands it and returns the
    hidden state unchanged (the model's masks and positional tables do not depend on block outputs); the last
    block's recorder stops the forward, so the head never runs."""

    def __init__(self, layer: nn.Module, index: int, store, last: bool):
        super().__init__()
        object.__setattr__(self, "_wrapped", layer)  # not registered: model.to() does not move it
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_store", store)
        object.__setattr__(self, "_last", last)

    def __getattr__(self, name):  # attributes the model reads off its layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)

    def forward(self, *args, **kwargs):
        if args:
            h, rest = args[0], tuple(None if _is_cache(a) else a for a in args[1:])
        else:
            h, rest = kwargs.pop("hidden_states"), ()
        kw = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
        self._store(self._index, h, rest, kw)
        if self._last:
            raise _Stop
        return h


@dataclass
class BlockInputs:
    """Block inputs for the whole calibration set, batch by batch.

    ``hidden``: (nsamples, seqlen, d) on the compute device in the model dtype — the hidden states entering the
    block being processed (block 0's after the capture); ``batches``: that block's list of ``(slice, args,
    kwargs)`` — the extra positional/keyword arguments the model passes it for that batch; ``per_block[i]``:
    the same list for block ``i`` (``None``: every block gets ``batches``). Identical tensors (one mask or
    rotary table for many blocks and batches) are stored once and shared.
    """
    hidden: torch.Tensor
    batches: list
    per_block: Optional[list] = None

    def at(self, i: int, hidden: Optional[torch.Tensor] = None) -> "BlockInputs":
        """The inputs of block ``i``: its own arguments, with ``hidden`` (default: the current hidden states)."""
        batches = self.batches if self.per_block is None else self.per_block[i]
        return BlockInputs(self.hidden if hidden is None else hidden, batches, self.per_block)


def forward_batch_size(config_bs: Optional[int], nsamples: int, seqlen: int) -> int:
    """Calibration sequences per forward: the configured batch size, else about TOKENS_PER_BATCH tokens."""
    if config_bs is not None:
        return int(config_bs)
    return max(1, min(nsamples, TOKENS_PER_BATCH // max(1, seqlen)))


def row_batches(n: int, L: int, bs: int, lengths=None) -> list:
    """The batches of a capture: slices of at most ``bs`` consecutive rows; with ``lengths`` (tokens per row of a
    right-padded ``(n, L)`` calibration), only rows of one length share a batch, and the batch is
    ``(rows, slice(0, length))`` — the model and every block see the real tokens only, never a pad."""
    if lengths is None:
        return [slice(b0, min(n, b0 + bs)) for b0 in range(0, n, bs)]
    if len(lengths) != n or any(not 1 <= int(x) <= L for x in lengths):
        raise PipelineError(f"calib_lengths must give 1..{L} tokens for each of the {n} calibration rows")
    out, i = [], 0
    while i < n:
        j = i
        while j < n and j - i < bs and int(lengths[j]) == int(lengths[i]):
            j += 1
        out.append(slice(i, j) if int(lengths[i]) == L else (slice(i, j), slice(0, int(lengths[i]))))
        i = j
    return out


class _Interner:
    """Moves captured arguments to the compute device and shares identical ones: the same object handed to
    several blocks is moved once; a tensor equal to one already stored (an earlier batch's mask or rotary
    table) is replaced by it; containers of shared items are shared too."""

    def __init__(self, dev):
        self.dev = dev
        self.memo = {}        # id(source object) -> (source, stored) — the source kept alive while its id is used
        self.recent = []      # stored tensors of the previous and current batch, to compare new ones against
        self.boxes = {}       # (type, key, ids of stored items) -> stored container

    def new_batch(self):
        self.memo = {}
        self.recent = self.recent[-64:]

    def __call__(self, obj):
        if id(obj) in self.memo:
            return self.memo[id(obj)][1]
        if torch.is_tensor(obj):
            t = obj.detach().to(self.dev)
            out = next((r for r in self.recent if _same(t, r)), None)
            if out is None:
                out = t
                self.recent.append(t)
        elif isinstance(obj, (tuple, list)):
            items = [self(o) for o in obj]
            key = (type(obj), None, tuple(id(x) for x in items))
            out = self.boxes.setdefault(key, type(obj)(items) if isinstance(obj, list) else tuple(items))
        elif isinstance(obj, dict):
            items = {k: self(v) for k, v in obj.items()}
            key = (dict, tuple(items), tuple(id(x) for x in items.values()))
            out = self.boxes.setdefault(key, items)
        else:
            return obj
        self.memo[id(obj)] = (obj, out)
        return out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib_ids: torch.Tensor, *, device=None, batch_size: Optional[int] = None,
                         arch: Optional[ArchSpec] = None, lengths=None, dtype=None) -> BlockInputs:
    """Block 0's hidden states and every block's own arguments, from the model's own forward (module doc).

    Every block is replaced by a recorder that keeps its arguments and passes the hidden state through; the
    forward stops after the last block. What the model computes per layer (sliding-window or global masks,
    per-layer-type rotary tables, per-layer scalings) is thus what each block gets later. An argument that a
    model derives from earlier blocks' *outputs* (rather than from the token ids) would be recorded from the
    pass-through and is not supported.

    ``lengths`` (rows as samples): the real tokens of each row of a right-padded ``calib_ids``; rows of one length
    are batched together and cut to it (:func:`row_batches`), so no pad token enters a forward, a mask or a Gram;
    the hidden states beyond a row's length stay zero and are never read. ``dtype``: the hidden states are held in
    it (default: the model's; each batch is cast back to the block's dtype as it enters a block)."""
    arch = arch or get_arch(model)
    blocks = get_module(model, arch.blocks)
    saved = list(blocks)
    nb = len(saved)
    n, L = calib_ids.shape
    bs = forward_batch_size(batch_size, n, L)
    batches = row_batches(n, L, bs, lengths)
    state = {"hidden": None, "cur": None, "seen": None}
    per_block = [[] for _ in range(nb)]
    intern = None

    def store(i, h, args, kw):
        sl = state["cur"]
        if i == 0:
            if state["hidden"] is None:
                state["hidden"] = (torch.empty if lengths is None else torch.zeros)(
                    (n, L) + tuple(h.shape[2:]), dtype=dtype or h.dtype, device=dev)
            state["hidden"][sl] = h.to(dev)
        if i in state["seen"]:
            raise RuntimeError(f"block {i} was called twice in one forward of the model; the architecture's blocks "
                               f"path {arch.blocks!r} does not name the decoder blocks")
        state["seen"].add(i)
        per_block[i].append((sl, tuple(intern(a) for a in args), {k: intern(v) for k, v in kw.items()}))

    try:
        for i, b in enumerate(saved):
            blocks[i] = _Recorder(b, i, store, last=i == nb - 1)
        # the blocks aside: embeddings, positional tables, norms (and the head); a one-block view has none
        orig = _single_device(model) if any(True for _ in model.parameters()) else _single_device(saved[0])
        dev = torch.device(device) if device is not None else orig
        intern = _Interner(dev)
        moved = dev != orig
        if moved:
            model.to(dev)
        try:
            for sl in batches:
                state["cur"], state["seen"] = sl, set()
                intern.new_batch()
                try:
                    model(calib_ids[state["cur"]].to(dev), use_cache=False)
                except _Stop:
                    pass
                missing = [i for i in range(nb) if i not in state["seen"]]
                if missing:
                    raise RuntimeError(f"block(s) {', '.join(map(str, missing[:5]))} were never called by the "
                                       f"model's forward; check the architecture (blocks path {arch.blocks!r})")
        finally:
            if moved:
                model.to(orig)
    finally:
        for i, b in enumerate(saved):
            blocks[i] = b
    return BlockInputs(state["hidden"], per_block[0], per_block)


def call_block(block: nn.Module, h: torch.Tensor, args, kw) -> torch.Tensor:
    """The block's output hidden states for ``h`` (moved to the block's dtype and device first)."""
    p = next(block.parameters(), None)  # activations may be stored in another dtype/device (--low-memory)
    if p is not None and (h.dtype != p.dtype or h.device != p.device):
        h = h.to(p.device, p.dtype)
    y = block(h, *args, **kw)
    return y[0] if isinstance(y, (tuple, list)) else y  # transformers <5 returned tuples


@torch.no_grad()
def forward_block(block: nn.Module, inputs: BlockInputs, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The block's outputs for every batch (into ``out`` if given; may be ``inputs.hidden``'s twin)."""
    if out is None:
        out = torch.empty_like(inputs.hidden)
    for sl, args, kw in inputs.batches:
        out[sl] = call_block(block, inputs.hidden[sl], args, kw)
    return out


def _input_until(block: nn.Module, path: str, h, args, kw, *, stop: bool = True):
    """The input of sub-module ``path`` when ``block`` runs on ``h``; the forward stops there. ``stop=False``: the
    forward runs to its end and ``(input, block output)`` is returned (one pass gives both)."""
    box = {}

    def pre(mod, a, k):
        box["x"] = a[0] if a else next(iter(k.values()))
        if stop:
            raise _Stop

    handle = get_module(block, path).register_forward_pre_hook(pre, with_kwargs=True)
    y = None
    try:
        y = call_block(block, h, args, kw)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "x" not in box:
        raise RuntimeError(f"sub-layer {path!r} was not called by its block's forward")
    return box["x"] if stop else (box["x"], y)


# ============================================================================================ validation
@dataclass
class _Plan:
    arch: ArchSpec
    spec: object
    blocks: list            # sorted block indices to prune
    units: dict             # block -> list of groups; group = list of (sub, full name, pattern, kind|None)
    n_blocks: int
    device: torch.device


def _layer_sparsity(config: PruneConfig, name: str) -> Optional[float]:
    ls = config.layer_sparsity or {}
    return ls.get(name, config.sparsity)


def _layer_quant(config: PruneConfig, name: str) -> Optional[str]:
    return (config.layer_quant or {}).get(name, config.quant)


def validate_config(model: nn.Module, config: PruneConfig, calib_ids: Optional[torch.Tensor] = None) -> _Plan:
    """Check everything that can be checked before touching the model; one-line errors."""
    from ..solvers import get_method
    arch = get_arch(model)
    spec = get_method(config.method)  # UnknownMethodError (a ValueError) names the available methods
    _check_options(config)
    if calib_ids is not None:
        _check_calibration_ids(model, calib_ids)
    blocks_mod = get_module(model, arch.blocks)
    nb = len(blocks_mod)
    sel = _selected_blocks(config, nb)
    _check_layer_sparsities(config, arch, nb)
    _check_layer_quant(config, arch, nb)
    if spec.structured:
        kinds = _structure_kinds(spec, config)
        units = {bi: _structured_groups(model, arch, spec, config, kinds, bi, blocks_mod[bi]) for bi in sel}
    else:
        units = {bi: _pattern_groups(arch, spec, config, bi, blocks_mod[bi]) for bi in sel}
    if config.targets or config.ignore:  # keep only the chosen sub-layers; blocks left with none are skipped
        from .targets import select_layers
        layers = {e[1]: type(get_module(model, e[1])).__name__ for bi in sel for g in units[bi] for e in g}
        keep = select_layers(layers, config.targets, config.ignore, other_modules=dict(model.named_modules()))
        units = {bi: [g2 for g2 in ([e for e in g if e[1] in keep] for g in units[bi]) if g2] for bi in sel}
        sel = [bi for bi in sel if units[bi]]
        units = {bi: units[bi] for bi in sel}
    dev = resolve_device(config.device, PipelineError)
    _single_device(model)
    return _Plan(arch, spec, sel, units, nb, dev)


def _check_options(config: PruneConfig) -> None:
    if config.mode not in _MODES:
        raise PipelineError(f"mode must be one of {', '.join(_MODES)}, got {config.mode!r}")
    if config.sparsity is not None:  # (None is fine for N:M patterns, which fix their own sparsity)
        check_sparsity(config.sparsity)
    if config.damp is None or not (float(config.damp) >= 0) or math.isinf(float(config.damp)):
        raise PipelineError(f"damp must be a finite number ≥ 0, got {config.damp!r}")
    if config.batch_size is not None and int(config.batch_size) < 1:
        raise PipelineError(f"batch_size must be ≥ 1, got {config.batch_size}")
    if not isinstance(config.method_options, dict):
        raise PipelineError(f"method_options must be a dict, got {type(config.method_options).__name__}")


def _check_calibration_ids(model: nn.Module, calib_ids) -> None:
    if not torch.is_tensor(calib_ids) or calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise PipelineError("calib_ids must be a non-empty (nsamples, seqlen) tensor of token ids")
    if calib_ids.dtype not in (torch.int64, torch.int32):
        raise PipelineError(f"calib_ids must hold integer token ids, got dtype {calib_ids.dtype}")
    emb = model.get_input_embeddings()
    vocab = getattr(emb, "num_embeddings", None)
    if vocab is not None and (int(calib_ids.max()) >= vocab or int(calib_ids.min()) < 0):
        raise PipelineError(f"calib_ids contain token ids outside the vocabulary [0, {vocab})")


def _selected_blocks(config: PruneConfig, nb: int) -> list:
    """The sorted block indices to prune (all of them without ``config.blocks``)."""
    if config.blocks is None:
        return list(range(nb))
    try:
        sel = sorted({int(b) for b in config.blocks})
    except (TypeError, ValueError):
        raise PipelineError(f"blocks must be a list of block indices, got {config.blocks!r}") from None
    bad = [b for b in sel if not 0 <= b < nb]
    if bad or not sel:
        raise PipelineError(f"blocks must be indices in [0, {nb}), got {config.blocks!r}")
    return sel


def _check_layer_names(per_layer: dict, what: str, arch: ArchSpec, nb: int) -> None:
    """Every key of a per-layer option (``layer_sparsity``, ``layer_quant``) names a prunable sub-layer."""
    all_names = {f"{arch.blocks}.{i}.{s}" for i in range(nb) for s in arch.sublayer_names()}
    unknown = sorted(set(per_layer) - all_names)
    if unknown:
        raise PipelineError(f"{what} names unknown sub-layers: {', '.join(unknown[:3])}"
                            f"{' ...' if len(unknown) > 3 else ''} (expected names such as "
                            f"{arch.blocks}.0.{arch.sublayer_names()[0]})")


def _check_layer_sparsities(config: PruneConfig, arch: ArchSpec, nb: int) -> None:
    if not config.layer_sparsity:
        return
    _check_layer_names(config.layer_sparsity, "layer_sparsity", arch, nb)
    for k, v in config.layer_sparsity.items():
        check_sparsity(v, f"sparsity of {k}")


def _check_layer_quant(config: PruneConfig, arch: ArchSpec, nb: int) -> None:
    """Per-layer grids (mixed precision): known sub-layer names, valid grids, and a ``quant`` for the rest."""
    if not config.layer_quant:
        return
    from ..formulations.grid import parse_grid
    if config.quant is None:
        raise PipelineError("layer_quant gives per-layer grids: set quant too (the grid of the other layers)")
    _check_layer_names(config.layer_quant, "layer_quant", arch, nb)
    for v in config.layer_quant.values():
        parse_grid(v)


def _structure_kinds(spec, config: PruneConfig) -> list:
    """The structure kinds of ``config.structure`` ('mlp', 'heads', 'heads:kv'), checked."""
    if "groups" not in spec.patterns:
        raise PipelineError(f"structured method {spec.name!r} does not declare the 'groups' pattern")
    kinds = [k.strip().lower() for k in str(config.structure).split(",") if k.strip()]
    if not kinds or any(k not in _STRUCTURE_KINDS for k in kinds):
        raise PipelineError(f"structure must be a comma list of 'mlp', 'heads' (query heads) and 'heads:kv' "
                            f"(whole key/value groups), e.g. 'mlp,heads'; got {config.structure!r}")
    if "heads" in kinds and "heads:kv" in kinds:
        raise PipelineError("structure: give 'heads' (query heads) or 'heads:kv' (key/value groups), not both")
    return kinds


def _structured_groups(model: nn.Module, arch: ArchSpec, spec, config: PruneConfig, kinds: list, bi: int,
                       block) -> list:
    """Block ``bi``'s groups for a structured method: one single-layer group per structure kind, in the
    architecture's sub-layer order."""
    from . import surgery
    order = arch.sublayer_names()
    groups = []
    for token in dict.fromkeys(kinds):
        kind, _, head_groups = token.partition(":")
        table = arch.mlp if kind == "mlp" else arch.heads
        if table is None:
            raise PipelineError(f"architecture {arch.name!r} has no {kind} structure table")
        sub0 = table.down if kind == "mlp" else table.o
        sparsity = _layer_sparsity(config, f"{arch.blocks}.{bi}.{sub0}")
        try:
            kw = {"head_groups": head_groups} if head_groups else {}  # "heads:kv"
            sub, pat = surgery.structure_pattern(model, arch, bi, kind, sparsity, **kw)
        except NotImplementedError as e:  # e.g. heads of GPT-2's fused c_attn
            raise PipelineError(f"{kind} structure on block {bi}: {e}") from None
        name = f"{arch.blocks}.{bi}.{sub}"
        shape = tuple(linear_weight(get_module(block, sub), sub in arch.transposed).shape)
        _check_layer(spec, pat, name, shape)
        groups.append([(sub, name, pat, kind)])
    groups.sort(key=lambda g: order.index(g[0][0]) if g[0][0] in order else len(order))
    return groups


def _pattern_groups(arch: ArchSpec, spec, config: PruneConfig, bi: int, block) -> list:
    """Block ``bi``'s groups of sub-layers (the architecture's, e.g. q/k/v together), each with its pattern."""
    groups = []
    for grp in arch.sublayers:
        group = []
        for sub in grp:
            name = f"{arch.blocks}.{bi}.{sub}"
            pat = parse_pattern(config.pattern, _layer_sparsity(config, name), min_degree=config.min_degree,
                                quant=_layer_quant(config, name))
            shape = tuple(linear_weight(get_module(block, sub), sub in arch.transposed).shape)
            _check_layer(spec, pat, name, shape)
            group.append((sub, name, pat, None))
        groups.append(group)
    return groups


def _check_layer(spec, pat: Pattern, name: str, shape) -> None:
    kind = pattern_kind(pat)
    if kind not in spec.patterns:
        raise PipelineError(f"method {spec.name!r} does not handle the {pat.name} pattern "
                            f"(it takes: {', '.join(sorted(spec.patterns))})")
    try:
        pat.validate(shape)
    except PatternError as e:
        raise PatternError(f"{e}; layer {name} has shape {shape[0]}x{shape[1]}") from None


# ============================================================================================ the pipeline
def _needs_full(spec, config: PruneConfig, n: int) -> bool:
    return spec.needs_for(config.method_options) == "gram" or config.refit or n <= DIAG_ONLY_ABOVE


@torch.no_grad()
def prune_model(model: nn.Module, calib_ids: torch.LongTensor, config: PruneConfig, *, progress: bool = True,
                on_block=None, inputs: Optional[BlockInputs] = None) -> dict:
    """Prune ``model`` in place, block by block; returns the per-layer and per-block record (module doc).

    ``on_block(i, block, layer_records, block_record)``, when given, is called once block ``i`` is pruned
    (checkpoints: :mod:`optprune.llm_adapters.checkpoint`). ``inputs``: the first block's inputs, already
    captured (the low-memory walk hands over its own buffer, so the activations are held once); their hidden
    states are overwritten as the blocks are walked."""
    from ..solvers.methods.baselines import refit_result
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    plan = validate_config(model, config, calib_ids)  # nothing is touched before this passes
    arch, spec, dev = plan.arch, plan.spec, plan.device
    surgery = None
    if spec.structured:
        from . import surgery
    orig_dev = _single_device(model)
    was_training = model.training
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    blocks_mod = get_module(model, arch.blocks)
    selected = set(plan.blocks)
    last = plan.blocks[-1]
    layers_rec, blocks_rec = [], []

    model.eval()
    try:
        if inputs is None:
            inputs = capture_block_inputs(model, calib_ids, device=dev, batch_size=config.batch_size, arch=arch,
                                          lengths=config.calib_lengths, dtype=config.activation_dtype)
        # one activation buffer: every forward writes a batch's outputs over that batch's inputs (batches are
        # independent, and a batch's inputs are read whole before its outputs are written)
        hidden = inputs.hidden
        bar = tqdm(range(last + 1), desc=f"prune {spec.name}", unit="block", disable=not progress)
        for bi in bar:
            block = blocks_mod[bi]
            block.to(dev)
            cur = inputs.at(bi)  # this block's own masks / positional tables, the current hidden states
            tb = time.perf_counter()
            if bi not in selected:  # untouched: just propagate
                forward_block(block, cur, hidden)
                block.to(orig_dev)
                continue
            timings = _prune_block(model, block, bi, cur, hidden, plan, config, layers_rec, refit_result, surgery)
            block.to(orig_dev)
            blocks_rec.append({"block": bi, "time_s": time.perf_counter() - tb, **timings})
            if on_block is not None:
                on_block(bi, block, [r for r in layers_rec if r.get("block") == bi], blocks_rec[-1])
        bar.close()
    finally:
        for b in blocks_mod:  # on error, leave every block where it was
            b.to(orig_dev)
        model.train(was_training)

    tot = sum(math.prod(r["shape"]) for r in layers_rec)
    zeros = sum(r["sparsity"] * math.prod(r["shape"]) for r in layers_rec)
    res = {"layers": layers_rec, "blocks": blocks_rec, "time_s": time.perf_counter() - t_start,
           "peak_rss_mb": peak_rss_mb(), "sparsity": zeros / tot if tot else 0.0,
           "device": str(dev), "nsamples": int(calib_ids.shape[0]), "seqlen": int(calib_ids.shape[1]),
           "batch_size": forward_batch_size(config.batch_size, *calib_ids.shape),
           "tokens": int(sum(config.calib_lengths)) if config.calib_lengths is not None else int(calib_ids.numel())}
    if dev.type == "cuda":
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return res


def _prune_block(model, block, bi: int, cur: BlockInputs, hidden: torch.Tensor, plan: _Plan, config: PruneConfig,
                 layers_rec: list, refit_result, surgery) -> dict:
    """Prune block ``bi``'s groups in order (statistics, then one solve per layer; records appended to
    ``layers_rec``) and write the next block's inputs into ``hidden`` as the mode says; returns the timings."""
    arch, spec, dev, last = plan.arch, plan.spec, plan.device, plan.blocks[-1]
    gdt = config.gram_dtype
    t_stats = t_solve = t_fwd = 0.0
    clock = {"stats_forward_time_s": 0.0, "report_time_s": 0.0}  # parts of the statistics and of the solves
    groups = plan.units[bi]
    need_out_dense = config.mode == "dense-input" and bi != last
    # the dense copy: X of the later groups (error correction) and the dense outputs (dense-input mode,
    # computed after the statistics so that the inputs are not overwritten before they are read)
    dense = copy.deepcopy(block) if config.error_correction and (len(groups) > 1 or need_out_dense) \
        else None

    def solve_group(group, acc):
        nonlocal t_solve
        for sub, name, pat, kind in group:
            ts = time.perf_counter()
            rec = _solve_layer(block, bi, sub, name, pat, kind, acc, spec, config, arch, refit_result,
                               surgery, model, clock)
            t_solve += time.perf_counter() - ts
            layers_rec.append(rec)

    if config.error_correction:
        wrote = False
        for gi, group in enumerate(groups):
            t0 = time.perf_counter()
            # the first group has nothing pruned upstream in this block: X̂ = X exactly, no dense pass; the
            # last group's dense pass runs on to the block's end and gives the dense outputs (dense-input mode)
            out = hidden if need_out_dense and gi == len(groups) - 1 else None
            acc, wrote = _accumulate_corrected(block, dense if gi else None, group[0][0], cur, arch, spec,
                                               config, gdt, dev, clock, out)
            t_stats += time.perf_counter() - t0
            solve_group(group, acc)
            del acc
        if need_out_dense and not wrote:  # dense stream: the dense copy's outputs
            t0 = time.perf_counter()
            forward_block(dense, cur, hidden)
            t_fwd += time.perf_counter() - t0
    else:
        t0 = time.perf_counter()
        accs = _accumulate_dense(block, [g[0][0] for g in groups], cur, arch, spec, config, gdt, dev,
                                 hidden if need_out_dense else None, clock)
        t_stats += time.perf_counter() - t0
        for gi, group in enumerate(groups):
            solve_group(group, accs[gi])
            accs[gi] = None  # a group's Grams are freed once its layers are solved
        del accs
    del dense
    if config.mode == "sequential" and bi != last:
        t0 = time.perf_counter()
        forward_block(block, cur, hidden)
        t_fwd += time.perf_counter() - t0
    return {"stats_time_s": t_stats, "solve_time_s": t_solve, "forward_time_s": t_fwd, **clock}


def _new_acc(n, full, corrected, gdt, dev):
    return InputStats(n, full=full, corrected=corrected, dtype=gdt, device=dev)


def _width(block, sub, arch) -> int:
    return linear_weight(get_module(block, sub), sub in arch.transposed).shape[1]


def _accumulate_corrected(block, dense, sub, inputs: BlockInputs, arch, spec, config, gdt, dev, clock,
                          out=None) -> tuple:
    """Error-corrected statistics of ``sub``'s input: X from the dense copy, X̂ from the pruned-so-far block;
    returns ``(statistics, wrote)``.

    ``dense=None``: nothing upstream is pruned yet, so X̂ = X and a plain (uncorrected) accumulator is exact.
    ``out``: the dense copy's pass runs to the block's end and writes the dense outputs there, batch by batch
    after the batch's inputs are read (``wrote``: it did; not when the statistics need no dense pass).
    ``clock["stats_forward_time_s"]`` gains the time of the forward passes that produce the inputs.
    """
    n = _width(block, sub, arch)
    full = _needs_full(spec, config, n)
    corrected = dense is not None and full  # diag-only statistics need X̂ alone: no dense pass
    wrote = corrected and out is not None
    acc = _new_acc(n, full, corrected, gdt, dev)
    for sl, args, kw in inputs.batches:
        h = inputs.hidden[sl]
        t0 = time.perf_counter()
        xhat = _input_until(block, sub, h, args, kw)
        x = y = None
        if wrote:
            x, y = _input_until(dense, sub, h, args, kw, stop=False)
        elif corrected:
            x = _input_until(dense, sub, h, args, kw)
        clock["stats_forward_time_s"] += time.perf_counter() - t0
        acc.add(x, xhat) if corrected else acc.add(xhat)
        if y is not None:  # after the statistics: an input may be a view of the batch's hidden states
            out[sl] = y
    return acc, wrote


def _accumulate_dense(block, subs, inputs: BlockInputs, arch, spec, config, gdt, dev, out, clock):
    """One pass of the (still dense) block: H of every group's input; outputs into ``out`` when given.
    ``clock["stats_forward_time_s"]`` gains the time of the pass less that of the accumulation."""
    accs = [_new_acc(_width(block, s, arch), _needs_full(spec, config, _width(block, s, arch)), False, gdt, dev)
            for s in subs]
    stop_at = None if out is not None else len(subs) - 1
    handles = []
    t_start, t_add = time.perf_counter(), [0.0]

    def make(i):
        def pre(mod, a, k):
            t0 = time.perf_counter()
            accs[i].add(a[0] if a else next(iter(k.values())))
            t_add[0] += time.perf_counter() - t0
            if i == stop_at:
                raise _Stop
        return pre

    try:
        for i, s in enumerate(subs):
            handles.append(get_module(block, s).register_forward_pre_hook(make(i), with_kwargs=True))
        for sl, args, kw in inputs.batches:
            try:
                y = call_block(block, inputs.hidden[sl], args, kw)
            except _Stop:
                continue
            if out is not None:
                out[sl] = y
    finally:
        for h in handles:
            h.remove()
    clock["stats_forward_time_s"] += time.perf_counter() - t_start - t_add[0]
    return accs


def _method_info_record(res, pat: Pattern) -> dict:
    """What a layer's record keeps of the method's ``info``: its small JSON values (``time_s`` renamed
    ``method_time_s``; the layer's error and sparsity are measured again by the caller), and for an N:M mask its
    graph metrics."""
    rec = {}
    for k, v in (res.info or {}).items():
        j = to_json(v, compact=True)
        if j is not None:
            rec[k] = j
    if "time_s" in rec:
        rec["method_time_s"] = rec.pop("time_s")
    rec.pop("error", None)
    rec.pop("sparsity", None)
    if isinstance(pat, NM) and "graph" not in rec and res.mask is not None:
        # connectivity of every N:M mask (degrees, components, spectral gap vs Ramanujan)
        from ..solvers.methods.graph_metrics import graph_metrics
        rec["graph"] = graph_metrics(res.mask, M=pat.M)
    return rec


def _solve_layer(block, bi, sub, name, pat, kind, acc, spec, config, arch, refit_result, surgery, model,
                 clock=None) -> dict:
    tr = sub in arch.transposed
    mod = get_module(block, sub)
    W_model = linear_weight(mod, tr)
    model_dtype = W_model.dtype
    W0 = _fresh(W_model)
    m, n = W0.shape
    problem = acc.problem(W0, name=name, damp=config.damp)
    problem.meta["weight_dtype"] = model_dtype  # grid scales are rounded to it, so saved scales reproduce them
    full = problem.meta.get("stats") != "diag"
    t0 = time.perf_counter()
    res = spec(problem, pat, **config.method_options)
    if config.refit:
        res = refit_result(problem, res)
    t_solve = time.perf_counter() - t0
    W = res.W
    certificate = None
    if getattr(config, "certify", False) and full and W is not None and tuple(W.shape) == (m, n):
        from ..solvers.verification.certificates import certify_layer
        certificate = certify_layer(problem, pat, res)
    if W is None or tuple(W.shape) != (m, n):
        raise NumericalError(f"layer {name!r}: method {spec.name!r} returned weights of shape "
                             f"{None if W is None else tuple(W.shape)}, expected ({m}, {n})")
    if not torch.isfinite(W).all():
        raise NumericalError(f"layer {name!r}: method {spec.name!r} returned NaN/Inf weights")

    qparams = (res.info or {}).pop("qparams", None)  # a grid's scales: kept on the module for the exporter
    rec = _method_info_record(res, pat)

    if kind is None:  # unstructured / N:M / expander: write the weights in place
        set_linear_weight(mod, W, tr)
        written = linear_weight(mod, tr)
        if not torch.isfinite(written).all():  # e.g. overflow in a half-precision model
            raise NumericalError(f"layer {name!r}: the written weights contain NaN/Inf (model dtype {model_dtype})")
        sparsity = float((written == 0).sum()) / (m * n)
        # a sparse + low-rank result is written folded (dense): its sparse part's support is what the pattern bounds
        folded = bool((res.info or {}).get("folded_lowrank")) and res.mask is not None
        _check_target(name, spec.name, pat, (m, n), int(res.mask.sum()) if folded else int((written != 0).sum()))
        W_eval = written.float() if model_dtype != torch.float32 else W
        if qparams is not None:
            mod.optprune_quant = qparams.to(torch.float32, torch.device("cpu"))
            rec["on_grid"] = bool(qparams.on_grid(W.to(torch.float64)))
            rec["bits"] = int(qparams.spec.bits)
        try:
            rec["feasible"] = bool(pat.is_feasible(res.mask.to(W.device)))
        except Exception:  # pragma: no cover - a pattern without a feasibility test
            pass
    else:  # structured: surgery removes the groups and writes the refitted weights into the shrunk layer
        info = surgery.apply_structured(model, arch, bi, kind, res, pat) or {}
        for k, v in info.items():
            j = to_json(v, compact=True)
            if j is not None:
                rec.setdefault(f"surgery_{k}" if k in rec else k, j)
        written = linear_weight(get_module(block, sub), tr)
        if not torch.isfinite(written).all():
            raise NumericalError(f"layer {name!r}: the shrunk layer contains NaN/Inf")
        sparsity = 1.0 - float((written != 0).sum()) / (m * n)
        _check_target(name, spec.name, pat, (m, n), int((written != 0).sum()))
        rec["shape_after"] = list(written.shape)
        W_eval = W

    t_report = time.perf_counter()
    if full:
        err_before, err, f0 = problem.report(W_eval.to(problem.H.device))
        rel = err / f0 if f0 > 0 else 0.0
    else:
        err_before = err = rel = None
    if clock is not None:
        clock["report_time_s"] += time.perf_counter() - t_report
    rec.update(name=name, block=bi, shape=[m, n], pattern=pat.name, sparsity_target=pat.target_sparsity((m, n)),
               sparsity=sparsity, error_before=err_before, error=err, rel_error=rel, time_s=t_solve,
               stats="gram" if full else "diag", nsamples=problem.nsamples)
    if certificate is not None:
        rec["certificate"] = to_json(certificate, compact=True)
    return rec
