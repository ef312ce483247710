"""Structural surgery: make a structurally pruned model really smaller, save it, load it back.

Contract used by the pipeline for structured methods (per block)::

    name, pattern = structure_pattern(model, arch, block_index, kind, sparsity)   # kind: "mlp" | "heads"
    result = method(problem_of(name), pattern)                                     # a LayerResult
    info = apply_structured(model, arch, block_index, kind, result, pattern)

**MLP neurons** (``kind="mlp"``): the groups are the single input columns of ``down``/``fc2``
(``ColumnGroups(1, sparsity=s)``). Removing a neuron removes its rows of ``up``/``gate`` (or ``fc1``) and their
bias entries, and its column of ``down``/``fc2``; the kept columns of ``down`` get ``result.W`` (the method's
updated weights). GPT-2's ``Conv1D`` stores ``Wᵀ``: rows/columns are swapped accordingly and ``nf``/``nx``
updated. A ``intermediate_size`` attribute on the MLP module is updated when present.

**Attention heads** (``kind="heads"``): the groups are the *query heads* — ``head_dim`` consecutive input
columns of ``o``/``out_proj`` each. Removing a query head removes its ``q`` rows (and bias) and ``o`` columns.
Under GQA a key/value head is removed (its ``k``/``v`` rows) **only when every query head of its group is
gone**. Stock attention (``repeat_kv``) needs the same number ``r`` of query heads per key/value head; when
the kept query heads are spread unevenly over the kept key/value groups (counts ``r_j``), surgery keeps the
function exact by *replicating* key/value heads: with ``r = gcd(r_j)``, key/value head ``j`` is stored
``r_j / r`` times and ``num_key_value_groups = r``. That costs extra ``k``/``v`` rows (and KV cache) for
uneven selections — the price of choosing query heads freely; with an even selection nothing is replicated.
(``structure_pattern(..., head_groups="kv")`` instead makes each group a whole key/value group — all its query
heads' ``o`` columns — which always shrinks ``k``/``v`` and never replicates.) GPT-2's fused ``c_attn`` is
not supported for heads (``NotImplementedError``); its MLP is.

**Bias compensation** (FLAP): a result whose ``info["bias_delta"]`` (shape (m,)) is present has it added to the
``down``/``o`` bias; a layer without bias (LLaMA's ``down_proj``) gets a new bias parameter. On saving, if the
config says that family of layers has no bias (``mlp_bias=False``), the flag is set to True and every layer of
the family gets a zero bias where it had none, so that stock transformers loads the function exactly.

**Saving** (:func:`save_shrunk`): when every block has the same widths (:func:`is_uniform`), the config gets the
smaller ``intermediate_size`` (and ``num_attention_heads``/``num_key_value_heads``/``head_dim``) and stock
``AutoModelForCausalLM.from_pretrained`` loads it. With per-layer widths (or head counts a config cannot say,
e.g. OPT's ``head_dim`` is derived from the head count), the directory holds ``save_pretrained``'s files (the
config keeps the dense widths, so a stock load fails on the size mismatch instead of loading something wrong)
plus ``optprune_widths.json``; :func:`load_shrunk` builds the model from the config, shrinks each block to the
recorded widths and loads the state dict. ``optprune_widths.json`` is written in both cases.

**Whole blocks** (:func:`remove_blocks`, depth pruning): the kept blocks stay in order in a new, shorter block
list; every sub-module's ``layer_idx`` (the KV-cache slot) is renumbered, the config's layer count
(``num_hidden_layers`` / ``n_layer`` / ``num_layers``) is set and every per-layer config list (e.g.
``layer_types``) keeps the kept blocks' entries, so stock ``from_pretrained`` loads the shorter model. A
removed *sub-block* (a block's attention or MLP alone) has no standard config (every LLaMA-family layer has
both), so only whole blocks are removed.
"""
from __future__ import annotations

import json
import math
import os
from functools import reduce
from typing import Optional, Sequence

import torch
from torch import nn

from ..formulations.patterns import ColumnGroups, Pattern, PatternError, check_sparsity
from ..formulations.problem import LayerProblem
from .architectures import ArchSpec, get_arch, get_module, linear_weight
from .stats import InputStats

__all__ = ["SurgeryError", "structure_pattern", "apply_structured", "layer_widths", "is_uniform", "save_shrunk",
           "load_shrunk", "loading_note", "drop_quantization_config", "capture_problems", "remove_blocks", "WIDTHS_FILE"]

WIDTHS_FILE = "optprune_widths.json"
_FORMAT = "optprune-shrunk/1"


class SurgeryError(ValueError):
    """A structural change that cannot be made (bad kind, a mask that is not whole groups, nothing left...)."""


# --------------------------------------------------------------------------------------------- helpers
def _block(model: nn.Module, arch: ArchSpec, i: int) -> nn.Module:
    blocks = get_module(model, arch.blocks)
    if not (0 <= i < len(blocks)):
        raise SurgeryError(f"block index {i} out of range: the model has {len(blocks)} blocks")
    return blocks[i]


def _parent(root: nn.Module, path: str) -> nn.Module:
    return get_module(root, path.rsplit(".", 1)[0]) if "." in path else root


def _is_t(arch: ArchSpec, path: str) -> bool:
    return path in arch.transposed


def _set_param(module: nn.Module, name: str, value: Optional[torch.Tensor]) -> None:
    old = getattr(module, name, None)
    if value is None:
        setattr(module, name, None)
        return
    rg = old.requires_grad if isinstance(old, nn.Parameter) else False
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=rg))


def _set_dims(module: nn.Module, transposed: bool) -> None:
    W = module.weight
    if transposed:  # Conv1D: weight (nx, nf)
        module.nx, module.nf = W.shape[0], W.shape[1]
    else:
        module.out_features, module.in_features = W.shape[0], W.shape[1]


def _select_out(module: nn.Module, idx: torch.Tensor, transposed: bool) -> None:
    """Keep (or replicate) the output rows ``idx`` of a linear layer, with its bias."""
    W = module.weight.data
    idx = idx.to(W.device)
    _set_param(module, "weight", W[:, idx] if transposed else W[idx])
    if getattr(module, "bias", None) is not None:
        _set_param(module, "bias", module.bias.data[idx])
    _set_dims(module, transposed)


def _set_in(module: nn.Module, W_new: torch.Tensor, transposed: bool) -> None:
    """Replace the weight by ``W_new`` given in (out, in) layout with fewer input columns."""
    W_new = W_new.to(module.weight.dtype).to(module.weight.device)
    _set_param(module, "weight", W_new.T if transposed else W_new)
    _set_dims(module, transposed)


def _add_bias(module: nn.Module, delta: torch.Tensor) -> bool:
    """Add ``delta`` (out,) to the bias, creating one if the layer has none. Returns True if created."""
    delta = torch.as_tensor(delta).reshape(-1)
    W = module.weight
    if getattr(module, "bias", None) is None:
        _set_param(module, "bias", delta.to(W.dtype).to(W.device).clone())
        return True
    module.bias.data.add_(delta.to(module.bias.dtype).to(module.bias.device))
    return False


def _resize(module: nn.Module, out_f: int, in_f: int, transposed: bool) -> None:
    """Give a linear layer uninitialised parameters of a new shape (used before loading a state dict)."""
    W = module.weight
    shape = (in_f, out_f) if transposed else (out_f, in_f)
    if tuple(W.shape) != shape:
        _set_param(module, "weight", torch.empty(shape, dtype=W.dtype, device=W.device))
        if getattr(module, "bias", None) is not None:
            _set_param(module, "bias", torch.empty(out_f, dtype=W.dtype, device=W.device))
    _set_dims(module, transposed)


def _shape_oi(module: nn.Module, transposed: bool) -> tuple[int, int]:
    return tuple(linear_weight(module, transposed).shape)


def _check_kind(arch: ArchSpec, kind: str) -> None:
    if kind == "mlp":
        if arch.mlp is None:
            raise SurgeryError(f"architecture {arch.name!r} has no MLP group table")
    elif kind == "heads":
        if arch.heads is None:
            raise SurgeryError(f"architecture {arch.name!r} has no attention-head table")
        if arch.heads.fused_qkv:
            raise NotImplementedError(
                f"head pruning is not supported for {arch.name!r}: q, k and v live in one fused layer "
                f"({arch.heads.q}); prune MLP neurons (kind='mlp') instead")
    else:
        raise SurgeryError(f"unknown structure kind {kind!r}; use 'mlp' or 'heads'")


def _head_state(block: nn.Module, arch: ArchSpec) -> dict:
    h = arch.heads
    attn = _parent(block, h.q)
    q, k = get_module(block, h.q), get_module(block, h.k)
    d = getattr(attn, "head_dim", None)
    if d is None:
        raise SurgeryError(f"attention module {type(attn).__name__} has no head_dim attribute")
    nq = _shape_oi(q, _is_t(arch, h.q))[0] // d
    nkv = _shape_oi(k, _is_t(arch, h.k))[0] // d
    if nkv == 0 or nq % nkv:
        raise SurgeryError(f"inconsistent attention shapes: {nq} query heads, {nkv} key/value heads")
    return {"attn": attn, "head_dim": d, "heads": nq, "kv_heads": nkv, "rep": nq // nkv}


# --------------------------------------------------------------------------------------------- pattern
def structure_pattern(model: nn.Module, arch: Optional[ArchSpec], block_index: int, kind: str, sparsity: float,
                      *, head_groups: str = "query") -> tuple[str, Pattern]:
    """The sub-layer to solve and its column-group pattern for one block.

    ``kind="mlp"`` → ``(arch.mlp.down, ColumnGroups(1, sparsity=s))``; ``kind="heads"`` →
    ``(arch.heads.o, ColumnGroups([columns of each query head], sparsity=s))``, or with ``head_groups="kv"``
    one group per key/value group (all its query heads' columns).
    """
    arch = arch or get_arch(model)
    _check_kind(arch, kind)
    s = check_sparsity(sparsity)
    block = _block(model, arch, block_index)
    if kind == "mlp":
        n = _shape_oi(get_module(block, arch.mlp.down), _is_t(arch, arch.mlp.down))[1]
        pat = ColumnGroups(1, sparsity=s, n=n)
        return arch.mlp.down, pat
    hs = _head_state(block, arch)
    d, nq, rep = hs["head_dim"], hs["heads"], hs["rep"]
    if head_groups == "query":
        groups = [list(range(h * d, (h + 1) * d)) for h in range(nq)]
    elif head_groups == "kv":
        groups = [list(range(j * rep * d, (j + 1) * rep * d)) for j in range(hs["kv_heads"])]
    else:
        raise SurgeryError(f"head_groups must be 'query' or 'kv', got {head_groups!r}")
    n = _shape_oi(get_module(block, arch.heads.o), _is_t(arch, arch.heads.o))[1]
    return arch.heads.o, ColumnGroups(groups, sparsity=s, n=n)


# --------------------------------------------------------------------------------------------- surgery
def _kept_groups(result, pattern: ColumnGroups, n: int, m: int) -> tuple[list[int], torch.Tensor]:
    if not isinstance(pattern, ColumnGroups):
        raise SurgeryError(f"structural surgery needs a ColumnGroups pattern, got {pattern!r}")
    mask = torch.as_tensor(result.mask).bool().cpu()
    if tuple(mask.shape) != (m, n) or tuple(result.W.shape) != (m, n):
        raise SurgeryError(f"result shapes W {tuple(result.W.shape)} / mask {tuple(mask.shape)} do not match the "
                           f"layer ({m}, {n})")
    cols = mask.any(0)
    if not bool((mask == cols.unsqueeze(0)).all()):
        raise SurgeryError("the mask is not structured: some columns are kept in some rows only")
    kept = []
    for gid, gr in enumerate(pattern.group_list(n)):
        c = cols[gr]
        if bool(c.all()):
            kept.append(gid)
        elif bool(c.any()):
            raise SurgeryError(f"group {gid} is partly kept: a group is removed or kept whole")
    if not kept:
        raise SurgeryError("the result removes every group of the layer; at least one must stay")
    removed_cols = ~cols
    if bool(removed_cols.any()) and bool((result.W.detach().cpu()[:, removed_cols] != 0).any()):
        raise SurgeryError("the result has nonzero weights on removed columns; removing them would change outputs")
    return kept, cols


def apply_structured(model: nn.Module, arch: Optional[ArchSpec], block_index: int, kind: str, result,
                     pattern: Pattern) -> dict:
    """Remove the groups that ``result`` drops from block ``block_index`` and write its weights.

    Returns ``{"kind", "kept", "removed", "shape": {...new (out, in) shapes...}, "bias_created", ...}``.
    Nothing is changed when the input is rejected (``SurgeryError``).
    """
    arch = arch or get_arch(model)
    _check_kind(arch, kind)
    block = _block(model, arch, block_index)
    if kind == "mlp":
        return _apply_mlp(block, arch, result, pattern)
    return _apply_heads(block, arch, result, pattern)


def _apply_mlp(block, arch, result, pattern) -> dict:
    spec = arch.mlp
    down = get_module(block, spec.down)
    m, n = _shape_oi(down, _is_t(arch, spec.down))
    kept, cols = _kept_groups(result, pattern, n, m)
    idx = cols.nonzero().squeeze(1)
    for up in spec.ups:
        mod = get_module(block, up)
        if _shape_oi(mod, _is_t(arch, up))[0] != n:
            raise SurgeryError(f"{up} has {_shape_oi(mod, _is_t(arch, up))[0]} outputs, {spec.down} {n} inputs")
    for up in spec.ups:
        _select_out(get_module(block, up), idx, _is_t(arch, up))
    _set_in(down, result.W.detach()[:, idx.to(result.W.device)], _is_t(arch, spec.down))
    created = False
    bd = (result.info or {}).get("bias_delta")
    if bd is not None and bool(torch.as_tensor(bd).abs().sum() > 0):
        created = _add_bias(down, bd)
    parent = _parent(block, spec.down)
    if hasattr(parent, "intermediate_size"):
        parent.intermediate_size = int(idx.numel())
    return {"kind": "mlp", "kept": int(idx.numel()), "removed": int(n - idx.numel()), "bias_created": created,
            "shape": {spec.down: list(_shape_oi(down, _is_t(arch, spec.down))),
                      **{u: list(_shape_oi(get_module(block, u), _is_t(arch, u))) for u in spec.ups}}}


def _apply_heads(block, arch, result, pattern) -> dict:
    spec = arch.heads
    hs = _head_state(block, arch)
    d, nq, rep = hs["head_dim"], hs["heads"], hs["rep"]
    o = get_module(block, spec.o)
    m, n = _shape_oi(o, _is_t(arch, spec.o))
    if n != nq * d:
        raise SurgeryError(f"{spec.o} has {n} inputs, expected {nq} heads × {d}")
    _, cols = _kept_groups(result, pattern, n, m)
    head_kept = cols.reshape(nq, d)
    if not bool((head_kept.all(1) | ~head_kept.any(1)).all()):
        raise SurgeryError("the pattern's groups do not align with whole attention heads")
    heads = head_kept.all(1).nonzero().squeeze(1)            # kept query heads, in order
    counts = torch.bincount(heads // rep, minlength=hs["kv_heads"])
    kv_kept = (counts > 0).nonzero().squeeze(1)
    r = reduce(math.gcd, counts[kv_kept].tolist())
    kv_rows_heads = torch.cat([kv.repeat(int(counts[kv]) // r) for kv in kv_kept])  # kv heads, replicated
    expand = lambda hh: (hh.unsqueeze(1) * d + torch.arange(d)).reshape(-1)
    _select_out(get_module(block, spec.q), expand(heads), _is_t(arch, spec.q))
    for path in (spec.k, spec.v):
        _select_out(get_module(block, path), expand(kv_rows_heads), _is_t(arch, path))
    ocols = expand(heads)
    _set_in(o, result.W.detach()[:, ocols.to(result.W.device)], _is_t(arch, spec.o))
    created = False
    bd = (result.info or {}).get("bias_delta")
    if bd is not None and bool(torch.as_tensor(bd).abs().sum() > 0):
        created = _add_bias(o, bd)
    attn = hs["attn"]
    new_q, new_kv = int(heads.numel()), int(kv_rows_heads.numel())
    for name, val in (("num_key_value_groups", r), ("num_heads", new_q), ("num_attention_heads", new_q),
                      ("num_key_value_heads", new_kv)):
        if hasattr(attn, name):
            setattr(attn, name, val)
    return {"kind": "heads", "kept": new_q, "removed": nq - new_q, "kv_heads": new_kv,
            "kv_replicated": new_kv - int(kv_kept.numel()), "kv_removed": hs["kv_heads"] - int(kv_kept.numel()),
            "bias_created": created,
            "shape": {p: list(_shape_oi(get_module(block, p), _is_t(arch, p))) for p in (spec.q, spec.k, spec.v, spec.o)}}


# --------------------------------------------------------------------------------------------- depth
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def remove_blocks(model: nn.Module, arch: Optional[ArchSpec], removed: Sequence[int]) -> dict:
    """Remove whole blocks ``removed`` (indices into the current block list) and fix the config.

    Returns ``{"removed": [...], "kept": [...original indices...], "layers": new count, "config_lists": [keys]}``.
    Nothing is changed when the input is rejected (``SurgeryError``)."""
    arch = arch or get_arch(model)
    blocks = get_module(model, arch.blocks)
    L = len(blocks)
    rem = sorted({int(i) for i in removed})
    if any(not (0 <= i < L) for i in rem):
        raise SurgeryError(f"block indices {rem} out of range: the model has {L} blocks")
    if len(rem) >= L:
        raise SurgeryError(f"removing {len(rem)} of {L} blocks leaves none; at least one must stay")
    kept = [i for i in range(L) if i not in rem]
    cfg = model.config
    key = next((k for k in _LAYER_COUNT_KEYS if isinstance(getattr(cfg, k, None), int)), None)
    if key is None:
        raise SurgeryError(f"the config has no layer count ({', '.join(_LAYER_COUNT_KEYS)})")
    lists = [k for k, v in vars(cfg).items() if isinstance(v, (list, tuple)) and len(v) == L and not k.startswith("_")]
    new = nn.ModuleList([blocks[i] for i in kept])
    for j, blk in enumerate(new):
        for mod in blk.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = j
    setattr(_parent(model, arch.blocks), arch.blocks.rsplit(".", 1)[-1], new)
    setattr(cfg, key, len(kept))
    for k in lists:
        v = getattr(cfg, k)
        setattr(cfg, k, type(v)(v[i] for i in kept))
    return {"removed": rem, "kept": kept, "layers": len(kept), "config_lists": lists}


# --------------------------------------------------------------------------------------------- widths
def layer_widths(model: nn.Module, arch: Optional[ArchSpec] = None) -> list[dict]:
    """Per block: ``{"mlp": intermediate width, "heads", "kv_heads", "head_dim"}`` (head fields when applicable)."""
    arch = arch or get_arch(model)
    out = []
    for block in get_module(model, arch.blocks):
        rec = {}
        if arch.mlp is not None:
            rec["mlp"] = _shape_oi(get_module(block, arch.mlp.down), _is_t(arch, arch.mlp.down))[1]
        if arch.heads is not None and not arch.heads.fused_qkv:
            hs = _head_state(block, arch)
            rec.update(heads=hs["heads"], kv_heads=hs["kv_heads"], head_dim=hs["head_dim"])
        out.append(rec)
    return out


def is_uniform(model: nn.Module, arch: Optional[ArchSpec] = None) -> bool:
    """True when every block has the same MLP width and head counts (a stock config can describe it)."""
    w = layer_widths(model, arch)
    return all(r == w[0] for r in w)


def _cfg_get(cfg, key, default=None):
    return getattr(cfg, key, default) if key else default


def _dense_widths(cfg, arch: ArchSpec) -> dict:
    rec = {}
    if arch.mlp is not None:
        w = _cfg_get(cfg, arch.mlp.config_key)
        if w is None:  # GPT-2: n_inner None means 4 × hidden
            w = 4 * cfg.hidden_size
        rec["mlp"] = int(w)
    if arch.heads is not None and not arch.heads.fused_qkv:
        nq = int(_cfg_get(cfg, arch.heads.heads_key))
        nkv = _cfg_get(cfg, arch.heads.kv_heads_key) if arch.heads.kv_heads_key else None
        rec.update(heads=nq, kv_heads=int(nkv) if nkv is not None else nq)
    return rec


def _harmonize_biases(model: nn.Module, arch: ArchSpec) -> list[str]:
    """If a layer family gained a bias the config does not declare, declare it and zero-fill the others."""
    cfg = model.config
    fams = {}
    if arch.mlp is not None and arch.mlp.bias_key:
        fams.setdefault(arch.mlp.bias_key, []).extend((arch.mlp.down,) + tuple(arch.mlp.ups))
    if arch.heads is not None and arch.heads.bias_key and not arch.heads.fused_qkv:
        h = arch.heads
        fams.setdefault(h.bias_key, []).extend((h.q, h.k, h.v, h.o))
    changed = []
    blocks = list(get_module(model, arch.blocks))
    for key, paths in fams.items():
        if bool(getattr(cfg, key, True)):
            continue
        mods = [get_module(b, p) for b in blocks for p in paths]
        if not any(getattr(mm, "bias", None) is not None for mm in mods):
            continue
        for mm in mods:
            if getattr(mm, "bias", None) is None:
                _add_bias(mm, torch.zeros(_out_features(mm)))
        setattr(cfg, key, True)
        changed.append(key)
    return changed


def _out_features(module: nn.Module) -> int:
    return int(getattr(module, "out_features", None) or getattr(module, "nf"))


# --------------------------------------------------------------------------------------------- save / load
def drop_quantization_config(model: nn.Module) -> None:
    """A GGUF-dequantised model holds plain weights: its config must not announce a quantization on save."""
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None:
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None


def save_shrunk(model: nn.Module, output_dir: str, arch: Optional[ArchSpec] = None, **save_kw) -> dict:
    """Save a structurally pruned model; returns the widths record written to ``optprune_widths.json``.

    Uniform widths → the config gets the smaller sizes and stock ``from_pretrained`` loads it
    (``record["stock_loadable"] = True``). Otherwise use :func:`load_shrunk`.
    """
    arch = arch or get_arch(model)
    cfg = model.config
    widths = layer_widths(model, arch)
    dense = _dense_widths(cfg, arch)
    bias_keys = _harmonize_biases(model, arch)
    uniform = all(r == widths[0] for r in widths)
    heads_changed = bool(widths) and "heads" in widths[0] and any(
        (r["heads"], r["kv_heads"]) != (dense["heads"], dense["kv_heads"]) for r in widths)
    stock = uniform and (not heads_changed or hasattr(cfg, "head_dim"))
    drop_quantization_config(model)
    note = None
    if stock and widths:
        w0 = widths[0]
        new = {}
        if "mlp" in w0:
            new[arch.mlp.config_key] = int(w0["mlp"])
        if heads_changed:
            new[arch.heads.heads_key] = int(w0["heads"])
            if arch.heads.kv_heads_key:
                new[arch.heads.kv_heads_key] = int(w0["kv_heads"])
            new["head_dim"] = int(w0["head_dim"])
        old = {k: getattr(cfg, k, None) for k in new}
        for k, v in new.items():
            setattr(cfg, k, v)
        try:  # e.g. LlamaConfig insists on hidden_size % num_attention_heads == 0
            if callable(getattr(cfg, "validate", None)):
                cfg.validate()
        except Exception as e:  # the config cannot say it: keep the dense config, use the optprune format
            for k, v in old.items():
                setattr(cfg, k, v)
            stock = False
            note = f"a stock config cannot describe these widths ({str(e).splitlines()[-1].strip()})"
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, **save_kw)
    record = {"format": _FORMAT, "architecture": arch.name, "uniform": uniform, "stock_loadable": stock,
              "dense": dense, "layers": widths, "bias_flags_set": bias_keys}
    if note:
        record["note"] = note
    with open(os.path.join(output_dir, WIDTHS_FILE), "w") as fh:
        json.dump(record, fh, indent=1)
    return record


def loading_note(record: dict) -> str:
    """The loading instructions of a :func:`save_shrunk` output (the Markdown of its ``LOADING.md``)."""
    if record.get("stock_loadable"):
        return ("A structurally pruned model with the same widths in every block: `config.json` states them, so "
                "stock tools load it as an ordinary, smaller checkpoint:\n\n```python\n"
                "from transformers import AutoModelForCausalLM\n"
                "model = AutoModelForCausalLM.from_pretrained(\"this/folder\")\n```\n\n"
                f"`{WIDTHS_FILE}` records the widths of each block.\n")
    if record.get("uniform"):  # the same widths everywhere, but the config class refuses them
        what = f"with the same widths in every block that a stock config cannot state ({record.get('note')})"
        advice = ("For tools that read only stock configs, keep a head count that the config accepts (e.g. prune "
                  "the MLP only)")
    else:
        what = "whose blocks have **different widths** (which one config value cannot state)"
        advice = ("For tools that read only stock configs (vLLM, llama.cpp through transformers), prune with "
                  "`--equal-widths` (the same widths in every block)")
    return (f"A structurally pruned model {what}. `config.json` "
            "keeps the dense widths, so stock `from_pretrained` stops on a size mismatch instead of loading "
            f"something wrong; `{WIDTHS_FILE}` records each block's MLP width and head counts. Load it with "
            "optprune (it builds each block at its recorded width, then loads the weights):\n\n```python\n"
            "from optprune.llm_adapters.surgery import load_shrunk\n"
            "model = load_shrunk(\"this/folder\")          # a transformers PreTrainedModel\n```\n\n"
            f"or `optprune eval --model this/folder`. {advice}; for llama.cpp, `--save-format gguf` writes the "
            "per-block widths as per-layer arrays, which llama.cpp reads.\n")


def _state_dict_from_dir(path: str) -> dict:
    from safetensors.torch import load_file
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
        sd = {}
        for f in files:
            sd.update(load_file(os.path.join(path, f)))
        return sd
    raise FileNotFoundError(f"no model.safetensors (or index) in {path}")


def load_shrunk(path: str, *, dtype=None, device=None) -> nn.Module:
    """Load a model saved by :func:`save_shrunk` (any widths); a plain HF directory loads as usual."""
    from transformers import AutoConfig, AutoModelForCausalLM

    wf = os.path.join(path, WIDTHS_FILE)
    if not os.path.exists(wf):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.to(device) if device else model
    with open(wf) as fh:
        record = json.load(fh)
    if record.get("format") != _FORMAT:
        raise ValueError(f"{wf}: unknown format {record.get('format')!r} (expected {_FORMAT})")
    if record.get("stock_loadable"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model.to(device) if device else model
    cfg = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype) if dtype is not None else \
        AutoModelForCausalLM.from_config(cfg)
    arch = get_arch(model)
    blocks = get_module(model, arch.blocks)
    if len(blocks) != len(record["layers"]):
        raise ValueError(f"{wf}: {len(record['layers'])} layer records for {len(blocks)} blocks")
    for block, rec in zip(blocks, record["layers"]):
        if "mlp" in rec and arch.mlp is not None:
            w = int(rec["mlp"])
            for up in arch.mlp.ups:
                mod = get_module(block, up)
                _resize(mod, w, _shape_oi(mod, _is_t(arch, up))[1], _is_t(arch, up))
            down = get_module(block, arch.mlp.down)
            _resize(down, _shape_oi(down, _is_t(arch, arch.mlp.down))[0], w, _is_t(arch, arch.mlp.down))
            parent = _parent(block, arch.mlp.down)
            if hasattr(parent, "intermediate_size"):
                parent.intermediate_size = w
        if "heads" in rec and arch.heads is not None and not arch.heads.fused_qkv:
            h = arch.heads
            d, nq, nkv = int(rec["head_dim"]), int(rec["heads"]), int(rec["kv_heads"])
            for p, rows in ((h.q, nq * d), (h.k, nkv * d), (h.v, nkv * d)):
                mod = get_module(block, p)
                _resize(mod, rows, _shape_oi(mod, _is_t(arch, p))[1], _is_t(arch, p))
            o = get_module(block, h.o)
            _resize(o, _shape_oi(o, _is_t(arch, h.o))[0], nq * d, _is_t(arch, h.o))
            attn = _parent(block, h.q)
            for name, val in (("num_key_value_groups", nq // nkv), ("num_heads", nq), ("num_attention_heads", nq),
                              ("num_key_value_heads", nkv)):
                if hasattr(attn, name):
                    setattr(attn, name, val)
    sd = _state_dict_from_dir(path)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set()
    if getattr(cfg, "tie_word_embeddings", False) or getattr(getattr(cfg, "get_text_config", lambda: cfg)(),
                                                              "tie_word_embeddings", False):
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    bad_missing = [k for k in missing if k not in tied]
    if bad_missing or unexpected:
        raise ValueError(f"{path}: state dict does not match the recorded widths "
                         f"(missing {bad_missing[:5]}, unexpected {list(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    model.eval()
    return model.to(device) if device else model


# --------------------------------------------------------------------------------------------- problems
@torch.no_grad()
def capture_problems(model: nn.Module, input_ids: torch.Tensor, *, kind: str = "mlp",
                     arch: Optional[ArchSpec] = None, blocks: Optional[Sequence[int]] = None,
                     batch_size: int = 8, dtype=torch.float64) -> list[LayerProblem]:
    """Dense-input layer problems of the structured sub-layer (``down``/``o``) of each block.

    A forward pre-hook on the sub-layer accumulates ``H = Σ x xᵀ`` (no error correction) and the input mean
    (``problem.meta["input_mean"]``, used by FLAP's bias compensation) over the calibration ``input_ids``
    (shape (B, T)). For tests and benchmarks; the pipeline builds the sequential / error-corrected problems.
    """
    arch = arch or get_arch(model)
    _check_kind(arch, kind)
    path = arch.mlp.down if kind == "mlp" else arch.heads.o
    all_blocks = get_module(model, arch.blocks)
    idx = list(range(len(all_blocks))) if blocks is None else list(blocks)
    accs, hooks = {}, []
    for i in idx:
        mod = get_module(all_blocks[i], path)
        n = _shape_oi(mod, _is_t(arch, path))[1]
        accs[i] = InputStats(n, dtype=dtype)

        def hook(module, args, i=i):
            accs[i].add(args[0].detach())
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for b0 in range(0, input_ids.shape[0], batch_size):
            model(input_ids[b0:b0 + batch_size].to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    probs = []
    for i in idx:
        mod = get_module(all_blocks[i], path)
        W0 = linear_weight(mod, _is_t(arch, path)).detach().to(dtype).cpu().clone()
        probs.append(accs[i].problem(W0, name=f"block{i}.{path}"))  # with meta["input_mean"]
    return probs
