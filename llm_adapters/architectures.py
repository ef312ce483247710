"""Architectures: inferred from the model's modules, with a small declarative table for families that need it.

An :class:`ArchSpec` says where the decoder blocks are, the linear sub-layers of a block in pruning order
(groups pruned together share inputs: ``q,k,v → o → up,gate/fc1 → down/fc2``), which sub-layers store the
transposed weight (GPT-2's ``Conv1D``), and the structure groups used by structured pruning: MLP neurons
(columns of ``down``, rows of ``up/gate``) and attention heads (``head_dim`` columns of ``o``; rows of ``q``;
rows of ``k/v`` when a whole key/value group goes under GQA), with the config keys to rewrite when they shrink.

:func:`get_arch` looks the model type up in :data:`ARCHITECTURES` (the table: overrides, and families whose
layout inference cannot read); otherwise :func:`infer_arch` reads the layout off the modules — the
``ModuleList`` of decoder blocks, the usual projection names in a block (``q_proj/k_proj/v_proj`` +
``o_proj``/``out_proj``, ``gate_proj/up_proj/down_proj`` or ``fc1/fc2``, GPT-2 ``Conv1D``
``c_attn/c_proj/c_fc``) and the config keys transformers uses (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size`` ...). From a config alone (:func:`arch_from_config`) the model is
built on the ``meta`` device (no weight read, no memory), so an unsupported model is refused before loading,
with one line naming what was not found.

Adding an architecture that inference cannot read = one table entry (:func:`register_arch`). No architecture
name appears outside this module.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["ArchSpec", "MLPGroups", "HeadGroups", "ARCHITECTURES", "UnknownArchitectureError", "get_arch",
           "infer_arch", "arch_from_config", "register_arch", "get_module", "linear_weight", "set_linear_weight",
           "table_entry"]


class UnknownArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class MLPGroups:
    down: str                     # input columns of `down` are the neurons
    ups: tuple                    # output rows of these are the neurons
    config_key: str               # config field holding the intermediate width
    bias_key: Optional[str] = None  # config flag that gives these layers a bias (None: always / never settable)


@dataclass(frozen=True)
class HeadGroups:
    q: str
    k: str
    v: str
    o: str
    heads_key: str                # config field: number of query heads
    kv_heads_key: Optional[str]   # config field: number of key/value heads (None: same as heads)
    fused_qkv: bool = False       # GPT-2 stores q,k,v in one Conv1D: head surgery not offered
    bias_key: Optional[str] = None  # config flag that gives q/k/v/o a bias


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple
    blocks: str                   # dotted path from the *ForCausalLM to the ModuleList of blocks
    sublayers: tuple              # tuple of tuples: groups in pruning order, paths relative to a block
    transposed: tuple = ()        # sub-layers whose weight is stored (in, out) — Conv1D
    mlp: Optional[MLPGroups] = None
    heads: Optional[HeadGroups] = None
    embed: str = ""
    final_norm: str = ""
    rotary: Optional[str] = None  # module computing position_embeddings for the blocks (LLaMA family)

    def sublayer_names(self) -> list[str]:
        return [s for grp in self.sublayers for s in grp]


_LLAMA = ArchSpec(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
    blocks="model.layers",
    sublayers=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
               ("mlp.up_proj", "mlp.gate_proj"), ("mlp.down_proj",)),
    mlp=MLPGroups("mlp.down_proj", ("mlp.up_proj", "mlp.gate_proj"), "intermediate_size", bias_key="mlp_bias"),
    heads=HeadGroups("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "num_attention_heads", "num_key_value_heads", bias_key="attention_bias"),
    embed="model.embed_tokens", final_norm="model.norm", rotary="model.rotary_emb",
)

_OPT = ArchSpec(
    name="opt",
    model_types=("opt",),
    blocks="model.decoder.layers",
    sublayers=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",),
               ("fc1",), ("fc2",)),
    mlp=MLPGroups("fc2", ("fc1",), "ffn_dim", bias_key="enable_bias"),
    heads=HeadGroups("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "num_attention_heads", None, bias_key="enable_bias"),
    embed="model.decoder.embed_tokens", final_norm="model.decoder.final_layer_norm",
)

_GPT2 = ArchSpec(
    name="gpt2",
    model_types=("gpt2",),
    blocks="transformer.h",
    sublayers=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    transposed=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    mlp=MLPGroups("mlp.c_proj", ("mlp.c_fc",), "n_inner"),
    heads=HeadGroups("attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj", "n_head", None, fused_qkv=True),
    embed="transformer.wte", final_norm="transformer.ln_f",
)

ARCHITECTURES = {a.name: a for a in (_LLAMA, _OPT, _GPT2)}


def register_arch(spec: ArchSpec, *, replace: bool = False) -> ArchSpec:
    """Add a table entry (it overrides inference for its model types). A model type already in another entry
    is an error unless ``replace``."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"register_arch takes an ArchSpec, got {type(spec).__name__}")
    for a in list(ARCHITECTURES.values()):
        clash = set(a.model_types) & set(spec.model_types)
        if a.name != spec.name and clash and not replace:
            raise ValueError(f"model type(s) {', '.join(sorted(clash))} already belong to the {a.name!r} entry; "
                             f"pass replace=True to override it")
        if replace and clash and a.name != spec.name:
            ARCHITECTURES[a.name] = dataclasses.replace(
                a, model_types=tuple(t for t in a.model_types if t not in clash))
    if spec.name in ARCHITECTURES and not replace:
        raise ValueError(f"architecture {spec.name!r} is already registered; pass replace=True to override it")
    ARCHITECTURES[spec.name] = spec
    return spec


def table_entry(model_type) -> Optional[ArchSpec]:
    """The table's entry whose model types include ``model_type``; None when the table has none."""
    for a in ARCHITECTURES.values():
        if model_type in a.model_types:
            return a
    return None


def get_arch(model_or_config) -> ArchSpec:
    """The architecture of a model (table entry, else inferred from its modules) or of a config (table entry,
    else inferred from a ``meta``-device model built from it: no weight is read).
    Raises :class:`UnknownArchitectureError` (one line, naming what was not found)."""
    explicit = getattr(model_or_config, "optprune_arch", None)  # a one-block view carries its model's
    if isinstance(explicit, ArchSpec):
        return explicit
    cfg = getattr(model_or_config, "config", model_or_config)
    entry = table_entry(getattr(cfg, "model_type", None))
    if entry is not None:
        return entry
    if isinstance(model_or_config, nn.Module):
        return infer_arch(model_or_config)
    return arch_from_config(cfg)


def arch_from_config(config) -> ArchSpec:
    """The architecture of the model a config describes, before any weight exists: the table entry of its model
    type, else :func:`infer_arch` on the model built on the ``meta`` device."""
    mt = getattr(config, "model_type", None)
    entry = table_entry(mt)
    if entry is not None:
        return entry
    from transformers import AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UnknownArchitectureError(f"model type {mt!r}: transformers has no causal-LM class for it ({first}); "
                                       f"{_supported()}") from None
    return infer_arch(model)


_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_HEADS_KEYS = ("num_attention_heads", "n_head", "num_heads")
_MLP_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size")
_NORM_NAMES = ("norm", "final_layer_norm", "final_layernorm", "ln_f", "final_norm")
_O_NAMES = ("o_proj", "out_proj")


def _supported() -> str:
    known = sorted(t for a in ARCHITECTURES.values() for t in a.model_types)
    return ("supported: any decoder whose blocks have q_proj/k_proj/v_proj + o_proj/out_proj and gate_proj/up_proj/"
            "down_proj or fc1/fc2 (or GPT-2 Conv1D c_attn/c_proj/c_fc) linear layers, and the table's model types "
            f"{', '.join(known)}")


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def _is_conv1d(m: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(m, Conv1D)


def _find_blocks(model: nn.Module, n_layers: Optional[int]):
    """(path, ModuleList) of the decoder blocks: a ModuleList of same-type modules holding linear layers;
    the one with ``n_layers`` entries (config) first, then the one with most parameters."""
    best = None
    for path, ml in model.named_modules():
        if not isinstance(ml, nn.ModuleList) or len(ml) == 0 or not path:
            continue
        if len({type(b) for b in ml}) != 1 or not any(_is_linear(m) for m in ml[0].modules()):
            continue
        key = (len(ml) == n_layers, sum(p.numel() for p in ml.parameters()))
        if best is None or key > best[0]:
            best = (key, path, ml)
    return (best[1], best[2]) if best else (None, None)


def infer_arch(model: nn.Module) -> ArchSpec:
    """Read an :class:`ArchSpec` off a causal LM's modules (see the module doc); one-line
    :class:`UnknownArchitectureError` naming what was not found."""
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    d = cfg.to_dict()
    what = f"model type {mt!r} ({type(model).__name__}) has no entry in the architecture table, and"
    n_layers = next((d[k] for k in _LAYERS_KEYS if isinstance(d.get(k), int)), None)
    path, blocks = _find_blocks(model, n_layers)
    if blocks is None:
        raise UnknownArchitectureError(f"{what} no ModuleList of decoder blocks with linear layers was found; "
                                       f"{_supported()}")
    block = blocks[0]
    lin = {p: m for p, m in block.named_modules() if p and _is_linear(m)}
    by_parent = {}
    for p in lin:
        parent, _, leaf = p.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = p
    attn, mlp = [], []
    for parent, leaves in by_parent.items():
        if {"q_proj", "k_proj", "v_proj"} <= leaves.keys() and any(o in leaves for o in _O_NAMES):
            o = next(leaves[o] for o in _O_NAMES if o in leaves)
            attn.append(((leaves["q_proj"], leaves["k_proj"], leaves["v_proj"]), o, False))
        elif {"c_attn", "c_proj"} <= leaves.keys():
            attn.append(((leaves["c_attn"],), leaves["c_proj"], True))
        if {"gate_proj", "up_proj", "down_proj"} <= leaves.keys():
            mlp.append(((leaves["up_proj"], leaves["gate_proj"]), leaves["down_proj"]))
        elif {"fc1", "fc2"} <= leaves.keys():
            mlp.append(((leaves["fc1"],), leaves["fc2"]))
        elif {"c_fc", "c_proj"} <= leaves.keys():
            mlp.append(((leaves["c_fc"],), leaves["c_proj"]))
    found = ", ".join(sorted(lin)) or "none"
    where = f"block {path}.0 ({type(block).__name__}; linear layers: {found})"
    if len(attn) != 1:
        raise UnknownArchitectureError(
            f"{what} {'no' if not attn else 'more than one set of'} attention projections (q_proj/k_proj/v_proj + "
            f"o_proj/out_proj, or c_attn + c_proj) in {where}; {_supported()}")
    if len(mlp) != 1:
        raise UnknownArchitectureError(
            f"{what} {'no' if not mlp else 'more than one'} MLP (gate_proj/up_proj/down_proj, fc1/fc2 or c_fc/c_proj) "
            f"in {where}; {_supported()}")
    (qkv, o, fused), (ups, down) = attn[0], mlp[0]
    used = set(qkv) | {o} | set(ups) | {down}
    extra = sorted(set(lin) - used)
    if extra:
        raise UnknownArchitectureError(f"{what} linear layers {', '.join(extra[:4])} of {where} are neither attention "
                                       f"nor MLP projections; add a table entry (register_arch) for this family")
    order = tuple(qkv) + (o,) + tuple(ups) + (down,)
    transposed = tuple(p for p in order if _is_conv1d(lin[p]))

    def key_of(keys):
        return next((k for k in keys if d.get(k) is not None), None)

    heads_key = key_of(_HEADS_KEYS)
    kv_key = "num_key_value_heads" if d.get("num_key_value_heads") is not None else None
    heads = None
    if heads_key is not None:
        heads = HeadGroups(qkv[0], qkv[-2] if not fused else qkv[0], qkv[-1], o, heads_key, kv_key, fused_qkv=fused,
                           bias_key=next((k for k in ("attention_bias", "enable_bias", "bias") if k in d), None))
    width = linear_weight(lin[down], down in transposed).shape[1]
    mlp_key = next((k for k in _MLP_KEYS if d.get(k) == width), None)  # the key holding block 0's width,
    if mlp_key is None:  # else (per-layer widths of a shrunk model) the first the config carries
        mlp_key = next((k for k in _MLP_KEYS if isinstance(d.get(k), int)), None)
    if mlp_key is None and "n_inner" in d and d["n_inner"] is None:  # GPT-2 style: None means 4·hidden
        mlp_key = "n_inner"
    mlp_groups = None if mlp_key is None else MLPGroups(
        down, ups, mlp_key, bias_key=next((k for k in ("mlp_bias", "enable_bias", "bias") if k in d), None))
    parent_path = path.rpartition(".")[0]
    parent = get_module(model, parent_path) if parent_path else model
    norm = next((n for n in _NORM_NAMES if isinstance(getattr(parent, n, None), nn.Module)), None)
    emb = model.get_input_embeddings()
    embed = next((p for p, m in model.named_modules() if m is emb), "")
    rotary = f"{parent_path}.rotary_emb" if isinstance(getattr(parent, "rotary_emb", None), nn.Module) else None
    return ArchSpec(name=f"{mt} (inferred)", model_types=(mt,), blocks=path,
                    sublayers=(tuple(qkv), (o,), tuple(ups), (down,)), transposed=transposed,
                    mlp=mlp_groups, heads=heads, embed=embed,
                    final_norm=f"{parent_path}.{norm}" if norm and parent_path else (norm or ""), rotary=rotary)


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def linear_weight(module: nn.Module, transposed: bool) -> torch.Tensor:
    """The weight in (out, in) layout, whatever the storage (GPT-2 Conv1D stores (in, out))."""
    return module.weight.data.T if transposed else module.weight.data


def set_linear_weight(module: nn.Module, W: torch.Tensor, transposed: bool) -> None:
    W = W.T if transposed else W
    module.weight.data.copy_(W.to(module.weight.dtype).to(module.weight.device))
