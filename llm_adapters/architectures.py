"""Architecture adapters as small declarative tables.

Each :class:`ArchSpec` says where the decoder blocks are, the linear sub-layers of a block in pruning order
(groups pruned together share inputs: ``q,k,v → o → up,gate/fc1 → down/fc2``), which sub-layers store the
transposed weight (GPT-2's ``Conv1D``), and the structure groups used by structured pruning: MLP neurons
(columns of ``down``, rows of ``up/gate``) and attention heads (``head_dim`` columns of ``o``; rows of ``q``;
rows of ``k/v`` when a whole key/value group goes under GQA), with the config keys to rewrite when they shrink.

Adding an architecture = one table entry. No architecture name appears outside this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

__all__ = ["ArchSpec", "MLPGroups", "HeadGroups", "ARCHITECTURES", "UnknownArchitectureError", "get_arch",
           "get_module", "linear_weight", "set_linear_weight"]


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


def get_arch(model_or_config) -> ArchSpec:
    cfg = getattr(model_or_config, "config", model_or_config)
    mt = getattr(cfg, "model_type", None)
    for a in ARCHITECTURES.values():
        if mt in a.model_types:
            return a
    known = sorted(t for a in ARCHITECTURES.values() for t in a.model_types)
    raise UnknownArchitectureError(f"unknown architecture {mt!r}; supported model types: {', '.join(known)}")


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
