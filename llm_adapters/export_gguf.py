"""``--save-format gguf``: one GGUF file (weights, tokenizer, chat template, metadata) for llama.cpp and Ollama.

The file is written with the ``gguf`` package's own :class:`gguf.GGUFWriter`, and its tensors are quantized by
``gguf.quants`` (the reference implementation of the format's types):

* **tensor names**: ``gguf.get_tensor_name_map`` of the llama.cpp architecture (``model.layers.3.mlp.down_proj``
  → ``blk.3.ffn_down``); a tied ``lm_head`` is not written (``output.weight`` absent means tied, for llama.cpp
  and transformers alike);
* **Q/K order** (architecture ``llama``): llama.cpp applies rotary embeddings to adjacent pairs of a head's
  dimensions, Hugging Face to its two halves; the rows of ``q_proj`` (and ``k_proj``, with the key/value head
  count) are permuted per head from half order to pair order — the permutation llama.cpp's converter applies and
  transformers' GGUF loader inverts (``docs/methods.md §10``). Qwen2 uses half order in llama.cpp too: no
  permutation;
* **types** (``gguf_type``): ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0`` or ``q5_1`` for
  the matrices; norms and biases (1-D) stay ``F32``, as llama.cpp's converter keeps them. The ``q*`` types store
  blocks of 32 values as integer codes times one f16 scale (``_1``: plus an f16 offset), so zeros stay exactly
  zero: a pruned mask survives. A matrix quantized by ``--quant`` on the grid its type represents
  (:data:`GRID_TYPES`: same bits and symmetry, groups a multiple of 32) is written with **our** codes and scales
  (:func:`pack_grid_blocks`; only the scale's f16 rounding); any other matrix is rounded by ``gguf.quants``
  (``q8_0``: ``d = max|x|/127``), recorded in ``run.json`` as ``requantized``. A matrix whose rows are not a
  multiple of 32 long falls back to ``f16`` (recorded too);
* **per-block widths**: a structurally pruned model whose blocks differ gets ``feed_forward_length``,
  ``attention.head_count`` and ``attention.head_count_kv`` as per-layer arrays, which llama.cpp reads; stock
  transformers' GGUF loader reads only one value per key, so such a file loads in llama.cpp but not in
  transformers (equal widths — ``--equal-widths`` — give scalars that both read);
* **tokenizer**: byte-level BPE tokenizers (GPT-2 style: SmolLM2, Qwen2, Llama 3) as ``tokenizer.ggml.model =
  gpt2`` with tokens, token types, merges, special token ids, ``add_bos_token`` and the chat template
  (``gguf.SpecialVocab`` reads them from the saved tokenizer files). ``tokenizer.ggml.pre`` (llama.cpp's
  pre-tokenizer name) is the source GGUF's own when the model was read from one (``loading.py`` keeps it as
  ``tokenizer.gguf_pre``), else ``gpt2`` for a plain byte-level pre-tokenizer, ``smollm`` for digits + byte-level,
  ``default`` otherwise.

What the writer cannot express is refused before pruning (:meth:`GGUFFormat.check` from ``config.json``,
:meth:`GGUFFormat.check_loaded` for tensor names and the tokenizer): another architecture, rotary scaling,
sliding-window attention, another kind of tokenizer.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .save_formats import ExportError, SaveFormat, register_format

__all__ = ["GGUF_TYPES", "GGUF_ARCHS", "GRID_TYPES", "gguf_file_name", "gguf_widths", "GGUFFormat", "grid_is_exact",
           "pack_grid_blocks"]

#: ``gguf_type`` → (GGMLQuantizationType name, LlamaFileType name)
GGUF_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
              "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
              "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1")}
#: the block types and the grid each one represents exactly: blocks of 32 values with one f16 scale ``d`` —
#: symmetric ``b`` bits ``d·(q − 2^(b−1))`` (q8_0: ``d·q``, q a signed byte), asymmetric ``d·q + m`` with an f16
#: offset ``m`` — i.e. ``w<b>`` / ``w<b>g<G>`` (``a``: asymmetric) with ``G`` a multiple of 32
GRID_TYPES = {"q4_0": (4, True), "q4_1": (4, False), "q5_0": (5, True), "q5_1": (5, False), "q8_0": (8, True)}
QK = 32  # values per block of every type above
_FROM_DTYPE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
#: Hugging Face model_type → (llama.cpp architecture, Q/K rows permuted to pair order)
GGUF_ARCHS = {"llama": ("llama", True), "qwen2": ("qwen2", False)}
_INSTALL = "pip install gguf (the llm extra)"


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ExportError(f"--save-format gguf needs the gguf package ({_INSTALL}; {e})") from None
    return gguf


def gguf_file_name(gguf_type: str) -> str:
    return f"model.{GGUF_TYPES[gguf_type][0]}.gguf"


def _rope_type(config: dict) -> Optional[str]:
    rp = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        return None
    kind = rp.get("rope_type") or rp.get("type")
    return None if kind in (None, "default") else str(kind)


def _rope_theta(config: dict) -> float:
    rp = config.get("rope_parameters")
    if isinstance(rp, dict) and rp.get("rope_theta") is not None:
        return float(rp["rope_theta"])
    return float(config.get("rope_theta", 10000.0))


def _check_config(config: dict, model_type: Optional[str]) -> None:
    mt = model_type or config.get("model_type")
    if mt not in GGUF_ARCHS:
        raise ExportError(f"--save-format gguf writes the {', '.join(GGUF_ARCHS)} architectures; this model is "
                          f"{mt!r}, whose GGUF layout the writer does not know (use --save-format dense)")
    kind = _rope_type(config)
    if kind:
        raise ExportError(f"--save-format gguf: rotary scaling {kind!r} is not written (only plain RoPE); use "
                          f"--save-format dense")
    if config.get("use_sliding_window") or (mt == "llama" and config.get("sliding_window")):
        raise ExportError("--save-format gguf: sliding-window attention is not written; use --save-format dense")


def _widths(model: nn.Module) -> list:
    from .surgery import layer_widths
    return layer_widths(model)


def gguf_widths(model: nn.Module) -> dict:
    """Per block: the MLP width, query and key/value head counts, as written (scalars when all blocks agree)."""
    w = _widths(model)
    out = {}
    for key, gkey in (("mlp", "feed_forward_length"), ("heads", "head_count"), ("kv_heads", "head_count_kv")):
        vals = [int(r[key]) for r in w]
        out[gkey] = vals[0] if len(set(vals)) == 1 else vals
    out["head_dim"] = int(w[0]["head_dim"])
    return out


def grid_is_exact(quantizer, gguf_type: str, n: int) -> bool:
    """Whether a layer quantized on ``quantizer``'s grid (width ``n``) is a ``gguf_type`` tensor without further
    rounding: same bits and symmetry, and every block of 32 inside one scale group."""
    want = GRID_TYPES.get(gguf_type)
    return (quantizer is not None and want == (quantizer.spec.bits, quantizer.spec.symmetric) and n % QK == 0
            and quantizer.gs % QK == 0)


def pack_grid_blocks(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, gguf_type: str):
    """The bytes of ``gguf_type`` blocks holding ``x`` (m, n), whose entries are on the grid with per-entry
    ``scale``/``zero`` (m, n; constant on each block of 32): our codes and scales, the scale (and offset
    ``−s·z``) rounded to f16 — the only rounding. Same layout as ``gguf.quants.quantize``'s output."""
    import numpy as np
    bits, sym = GRID_TYPES[gguf_type]
    m, n = x.shape
    s = scale.to(torch.float64).reshape(-1, QK)
    c = (torch.round(x.to(torch.float64).reshape(-1, QK) / s) + zero.to(torch.float64).reshape(-1, QK))
    d = s[:, :1].numpy().astype(np.float16).view(np.uint8)
    if gguf_type == "q8_0":
        return np.concatenate([d, c.numpy().astype(np.int8).view(np.uint8)], axis=1).reshape(m, -1)
    q = (c + (1 << (bits - 1)) if sym else c).numpy().astype(np.uint8)  # unsigned codes 0 .. 2^b − 1
    parts = [d]
    if not sym:
        parts.append((-(s[:, :1] * zero.to(torch.float64).reshape(-1, QK)[:, :1])).numpy().astype(np.float16)
                     .view(np.uint8))
    if bits == 5:  # the fifth bits, one per value, little-endian in 4 bytes
        parts.append(np.packbits((q >> 4).reshape(-1, 1, QK), axis=-1, bitorder="little").reshape(-1, 4))
    lo = q.reshape(-1, 2, QK // 2) & np.uint8(0x0F)
    parts.append(lo[:, 0, :] | (lo[:, 1, :] << np.uint8(4)))
    return np.concatenate(parts, axis=1).reshape(m, -1)


def _permute(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from half order (HF) to pair order (llama.cpp): row (h, s, i) → (h, i, s)."""
    return W.reshape(n_head, 2, W.shape[0] // n_head // 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def _pre_tokenizer(tj: dict) -> str:
    """llama.cpp's pre-tokenizer name for two common byte-level set-ups; ``default`` otherwise."""
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        return "gpt2"
    if pre.get("type") == "Sequence":
        kinds = [p.get("type") for p in pre.get("pretokenizers", [])]
        if kinds == ["Digits", "ByteLevel"] and pre["pretokenizers"][0].get("individual_digits"):
            return "smollm"
    return "default"


class _Vocab:
    """The tokenizer as GGUF keys: read from the files ``save_pretrained`` writes."""

    def __init__(self, tokenizer, n_vocab: int):
        gguf = _gguf()
        if tokenizer is None:
            raise ExportError("--save-format gguf needs the tokenizer (pass tokenizer=)")
        self.tmp = tempfile.TemporaryDirectory(prefix="optprune-gguf-tok-")
        d = Path(self.tmp.name)
        tokenizer.save_pretrained(str(d))
        tj_path = d / "tokenizer.json"
        tj = json.loads(tj_path.read_text()) if tj_path.is_file() else {}
        model = tj.get("model") or {}
        if model.get("type") != "BPE" or model.get("byte_fallback") or \
                (tj.get("decoder") or {}).get("type") != "ByteLevel":
            self.tmp.cleanup()
            raise ExportError("--save-format gguf writes byte-level BPE tokenizers (GPT-2 style); this tokenizer "
                              f"is {model.get('type') or type(tokenizer).__name__}"
                              f"{' with byte fallback' if model.get('byte_fallback') else ''}")
        # ids past the embedding (e.g. a default special token a tokenizer class adds) have no row to point at:
        # they are left out, unless the model's own bos/eos is among them
        self.dropped = [t for t, i in tokenizer.get_vocab().items() if i >= n_vocab]
        if any(i is not None and i >= n_vocab for i in (tokenizer.bos_token_id, tokenizer.eos_token_id)):
            self.tmp.cleanup()
            raise ExportError(f"--save-format gguf: the tokenizer's bos/eos id lies past the embedding's {n_vocab} "
                              f"rows")
        vocab = {i: t for t, i in tokenizer.get_vocab().items()}
        added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
        self.tokens, self.types = [], []
        for i in range(n_vocab):
            if i in added:
                self.tokens.append(added[i].content)
                self.types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
            elif i in vocab:
                self.tokens.append(vocab[i])
                self.types.append(gguf.TokenType.NORMAL)
            else:  # embedding rows beyond the tokenizer (padding), as llama.cpp's converter names them
                self.tokens.append(f"[PAD{i}]")
                self.types.append(gguf.TokenType.UNUSED)
        self.pre = getattr(tokenizer, "gguf_pre", None) or _pre_tokenizer(tj)  # a GGUF source's own name first
        self.special = gguf.SpecialVocab(d, load_merges=True, n_vocab=n_vocab)
        if not self.special.merges:
            self.tmp.cleanup()
            raise ExportError("--save-format gguf: the BPE tokenizer has no merges to write")

    def add_to(self, w) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        self.special.add_to_gguf(w, quiet=True)

    def close(self):
        self.tmp.cleanup()


def _tensor_plan(model: nn.Module) -> list:
    """``(HF name, GGUF name, tensor)`` for every tensor written, in state-dict order; a tied ``lm_head`` left out.
    An unmapped tensor → :class:`ExportError` naming it."""
    gguf = _gguf()
    cfg = model.config
    arch_name = GGUF_ARCHS[cfg.model_type][0]
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
    tmap = gguf.get_tensor_name_map(arch, int(cfg.num_hidden_layers))
    sd = model.state_dict()
    emb = model.get_input_embeddings().weight
    out_emb = getattr(model.get_output_embeddings(), "weight", None)
    tied = out_emb is not None and out_emb.data_ptr() == emb.data_ptr()
    plan = []
    for name, t in sd.items():
        if not t.is_floating_point():
            continue
        base, _, suffix = name.rpartition(".")
        if tied and base == "lm_head":
            continue
        g = tmap.get_name(base)
        if g is None:
            raise ExportError(f"--save-format gguf: no {arch_name} GGUF tensor for {name!r} (the writer cannot "
                              f"express this model; use --save-format dense)")
        plan.append((name, f"{g}.{suffix}", t))
    return plan


def _tensor_data(gguf, t: torch.Tensor, gname: str, qtype, gtype: str, qz, widths):
    """One tensor's GGUF bytes and type: 1-D in F32; a matrix in ``qtype`` — our own codes where the layer's grid
    is the type's (:func:`grid_is_exact`), else ``gguf.quants``' rounding; F16 for rows not a multiple of 32 long
    (as llama.cpp's converter). ``widths``: per-block head counts when Q/K rows are permuted to pair order."""
    x = t.detach().to("cpu", torch.float32)
    exact = qz is not None and x.dim() == 2 and grid_is_exact(qz, gtype, x.shape[-1])
    S = Z = None
    if exact:
        S, Z = qz.scales_full(dtype=torch.float64), qz.zeros_full(dtype=torch.float64)
    if widths is not None and gname.split(".")[-2] in ("attn_q", "attn_k"):
        i = int(gname.split(".")[1])
        heads = widths[i]["heads"] if ".attn_q." in gname else widths[i]["kv_heads"]
        x = _permute(x, heads)
        if exact:
            S, Z = _permute(S, heads), _permute(Z, heads)
    t_here = qtype if x.dim() >= 2 else gguf.GGMLQuantizationType.F32
    if t_here.name.lower() in GRID_TYPES and x.shape[-1] % QK:
        return gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16
    if exact and t_here.name.lower() in GRID_TYPES:
        return pack_grid_blocks(x, S, Z, gtype), t_here
    return gguf.quants.quantize(x.numpy(), t_here), t_here


@register_format
class GGUFFormat(SaveFormat):
    name = "gguf"
    summary = "one GGUF file (tokenizer, chat template, metadata) for llama.cpp / Ollama; --gguf-type sets the type"
    options = ("gguf_type",)
    structured = True

    def check(self, *, dtype, structured, model_type, config, options):
        _gguf()
        t = options.get("gguf_type")
        if t is not None and t not in GGUF_TYPES:
            raise ExportError(f"unknown --gguf-type {t!r}; choose from {', '.join(GGUF_TYPES)}")
        if t is not None and isinstance(dtype, str) and dtype != "auto":
            raise ExportError("--gguf-type sets the type of a GGUF file; give it or --dtype, not both")
        _check_config(config or {}, model_type)

    def check_loaded(self, model, tokenizer, options):
        _check_config(model.config.to_dict(), model.config.model_type)
        _tensor_plan(model)
        _Vocab(tokenizer, model.get_input_embeddings().weight.shape[0]).close()

    def write(self, model, out, tokenizer, *, dtype, layers, pattern, options):
        gguf = _gguf()
        cfg = model.config
        _check_config(cfg.to_dict(), cfg.model_type)
        gtype = options.get("gguf_type") or _FROM_DTYPE.get(dtype)
        if gtype is None:
            raise ExportError(f"--save-format gguf: no GGUF type for dtype {dtype}; give --gguf-type")
        arch_name, permute = GGUF_ARCHS[cfg.model_type]
        qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[gtype][0])
        plan = _tensor_plan(model)
        widths = _widths(model)
        n_vocab = int(model.get_input_embeddings().weight.shape[0])
        vocab = _Vocab(tokenizer, n_vocab)
        path = Path(out) / gguf_file_name(gtype)
        w = gguf.GGUFWriter(str(path), arch_name)
        try:
            src = str(getattr(cfg, "name_or_path", "") or "model").rstrip("/").split("/")[-1]
            w.add_type("model")
            w.add_name(f"{src} (pruned)" if layers or pattern else src)
            w.add_file_type(getattr(gguf.LlamaFileType, GGUF_TYPES[gtype][1]))
            if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                             gguf.GGMLQuantizationType.BF16):
                w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            gw = gguf_widths(model)
            head_dim = gw["head_dim"]
            w.add_context_length(int(cfg.max_position_embeddings))
            w.add_embedding_length(int(cfg.hidden_size))
            w.add_block_count(int(cfg.num_hidden_layers))
            w.add_feed_forward_length(gw["feed_forward_length"])
            w.add_head_count(gw["head_count"])
            w.add_head_count_kv(gw["head_count_kv"])
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
            w.add_rope_dimension_count(head_dim)
            w.add_rope_freq_base(_rope_theta(cfg.to_dict()))
            w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
            w.add_vocab_size(n_vocab)
            if pattern:
                w.add_string("optprune.pattern", str(pattern))
            vocab.add_to(w)
            fallback, exact, requant = [], [], []
            mods = dict(model.named_modules())
            for name, gname, t in plan:
                base, _, suffix = name.rpartition(".")
                qz = getattr(mods.get(base), "optprune_quant", None) if suffix == "weight" else None
                data, t_here = _tensor_data(gguf, t, gname, qtype, gtype, qz, widths if permute else None)
                if t_here == gguf.GGMLQuantizationType.F16 and qtype not in (t_here, gguf.GGMLQuantizationType.F32):
                    fallback.append(gname)
                elif t_here.name.lower() in GRID_TYPES:
                    (exact if grid_is_exact(qz, gtype, t.shape[-1]) else requant).append(gname)
                w.add_tensor(gname, data, raw_dtype=t_here)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
            vocab.close()
        per_layer = [k for k in ("feed_forward_length", "head_count", "head_count_kv") if isinstance(gw[k], list)]
        return {"format": "gguf", "gguf_file": path.name, "tokens_left_out": vocab.dropped, "gguf_type": gtype,
                "gguf_arch": arch_name,
                "stock_loadable": not per_layer, "per_layer_keys": per_layer, "f16_fallback": fallback,
                "grid_exact": exact, "requantized": requant,
                "weights_bytes": path.stat().st_size}

    def loading_note(self, info):
        f = info["gguf_file"]
        lines = [f"One GGUF file, `{f}` ({info['gguf_type']}, llama.cpp architecture `{info['gguf_arch']}`): "
                 "weights, tokenizer, chat template and metadata.\n",
                 f"* llama.cpp: `llama-cli -m {f}` / `llama-server -m {f}`; Ollama: a `Modelfile` with "
                 f"`FROM ./{f}`, then `ollama create NAME -f Modelfile`.",
                 "* llama-cpp-python: `llama_cpp.Llama(model_path=\"" + f + "\")`."]
        if info.get("grid_exact"):
            lines.append(f"* {len(info['grid_exact'])} matrices were quantized on the grid `{info['gguf_type']}` "
                         "represents and are stored exactly: our integer codes, with each scale (and asymmetric "
                         "offset) rounded to f16, the type's only rounding.")
        if info.get("requantized"):
            shown = ", ".join(info["requantized"][:4]) + (" ..." if len(info["requantized"]) > 4 else "")
            lines.append(f"* {len(info['requantized'])} matrices ({shown}) were rounded again by gguf's "
                         f"`{info['gguf_type']}` quantizer (its own scale per block of 32): each weight moves by up "
                         "to half a step of that block plus the f16 rounding of its scale, on top of any "
                         "quantization of ours (to avoid it, prune with the grid of the type: q4_0 ↔ w4g32/w4g128, "
                         "q4_1 ↔ w4g32a, q5_0 ↔ w5g32, q5_1 ↔ w5g32a, q8_0 ↔ w8g32).")
        if info.get("per_layer_keys"):
            lines.append(f"* The blocks have different widths: `{', '.join(info['per_layer_keys'])}` are per-layer "
                         "arrays, which llama.cpp reads. transformers' GGUF loader reads one value per key and "
                         "cannot load this file; for transformers, save the model with `--save-format dense` "
                         "(loaded by `optprune.llm_adapters.surgery.load_shrunk`) or prune with `--equal-widths`.")
        else:
            lines.append("* transformers: `AutoModelForCausalLM.from_pretrained(\"this/folder\", gguf_file=\"" + f +
                         "\")` (dequantized to dense weights), and `optprune eval --model this/folder`.")
        return "\n".join(lines) + "\n"
