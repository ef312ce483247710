"""Checks that run before any weight is read: everything about a prune/eval run that can be known from the
command line, the file system and the model's metadata (``config.json`` / safetensors headers / GGUF header).

Each failure raises :class:`PreflightError` — one line naming the option or file and what is wrong — so the
command exits 2 with nothing written. :func:`check_prune` is the entry point of ``optprune prune``;
:func:`check_model_source` is shared with ``optprune eval`` and ``--reference``.

What is checked:

* output: not a file; an existing non-empty directory only with ``--overwrite`` (and only when it is an
  optprune output); the folder it goes into is writable; not the input model's directory nor inside it (nor
  the input inside it); enough free disk for the weights (and the checkpoints);
* model and reference: a built-in name resolves, a directory has a parseable ``config.json``, its safetensors
  shards are complete (header readable, file as long as the header says, every shard of the index present),
  tokenizer files present; a ``.gguf`` file has a readable header whose tensors lie inside the file;
* data: an explicitly given data folder (``--data-dir`` / ``$OPTPRUNE_DATA_DIR``) exists;
* combinations: options a method would silently ignore are errors (``--pattern`` with a structured method,
  ``--structure`` with an unstructured one, ``--sparsity`` other than 1−N/M with an N:M pattern,
  ``--min-degree`` without N:M, ``--allocation-eps`` without an allocation, evaluation options with
  ``--no-eval``, ``--resume`` without a checkpoint);
* shapes from metadata: every prunable width divisible by M for N:M; a structured sparsity that keeps at least
  one group (MLP channel / head / key-value group) of every block.
"""
from __future__ import annotations

import math
import os
import shutil
import struct
from pathlib import Path
from typing import Optional

from .model_files import (PreflightError, arch_of, read_json, safetensors_header, incomplete,  # noqa: F401
                          stale_widths, torch_weight_shapes)

__all__ = ["PreflightError", "check_prune", "check_output", "check_writable", "open_checkpoint", "load_checked", "check_model_source", "check_data_dir",
           "model_metadata", "RUN_FILE"]

RUN_FILE = "run.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer.txt")


# ============================================================================================ model files


def _check_hf_dir(d: Path, *, tokenizer: bool = True) -> dict:
    """config.json parsed; weight files complete; tokenizer present. Returns the config and the weight bytes."""
    cfg = read_json(d / "config.json")
    if not isinstance(cfg.get("model_type"), str):
        raise PreflightError(f"{d / 'config.json'}: no model_type (not a transformers model config)")
    arch_of(cfg)  # an unsupported family is refused from its config, before its weight files are looked at
    gen = d / "generation_config.json"
    if gen.is_file():
        read_json(gen)
    index = d / "model.safetensors.index.json"
    single = d / "model.safetensors"
    nbytes = 0
    headers: dict = {}  # tensor name -> (file, shape)
    if index.is_file():
        wm = read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise PreflightError(f"{index}: no weight_map")
        by_file: dict = {}
        for t, f in wm.items():
            by_file.setdefault(str(f), []).append(t)
        for f, names in sorted(by_file.items()):
            p = d / f
            if not p.is_file():
                raise PreflightError(f"{p}: shard listed in {index.name} is missing")
            hdr = safetensors_header(p)
            headers.update({k: (p, v["shape"]) for k, v in hdr.items() if k != "__metadata__"})
            absent = [t for t in names if t not in hdr]
            if absent:
                raise PreflightError(f"{p}: does not hold {absent[0]!r} that {index.name} places there "
                                     f"(shard from another model?)")
            nbytes += p.stat().st_size
    elif single.is_file():
        hdr = safetensors_header(single)
        headers.update({k: (single, v["shape"]) for k, v in hdr.items() if k != "__metadata__"})
        nbytes = single.stat().st_size
    else:
        bins = sorted(d.glob("*.bin")) + sorted(d.glob("*.pt"))
        if not bins:
            raise PreflightError(f"{d}: config.json but no weights (no model.safetensors, no index, no *.bin)")
        nbytes = sum(p.stat().st_size for p in bins)
        bin_index = d / "pytorch_model.bin.index.json"
        files = [d / "pytorch_model.bin"] if (d / "pytorch_model.bin").is_file() else \
            [d / f for f in sorted(set((read_json(bin_index).get("weight_map") or {}).values()))] \
            if bin_index.is_file() else []
        for p in files:  # the files transformers loads: names and shapes from the pickle, no tensor data
            if not p.is_file():
                raise PreflightError(f"{p}: shard listed in {bin_index.name} is missing")
            headers.update({k: (p, v) for k, v in torch_weight_shapes(p).items()})
    widths = d / "optprune_widths.json"
    shrunk = widths.is_file() and not read_json(widths).get("stock_loadable") and stale_widths(d) is None
    if tokenizer:
        if not any((d / t).is_file() for t in _TOKENIZER_FILES):
            raise PreflightError(f"{d}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...)")
        tc = d / "tokenizer_config.json"
        if tc.is_file():
            read_json(tc)
        if (d / "tokenizer.json").is_file():
            read_json(d / "tokenizer.json")
        elif (d / "tokenizer.model").is_file():
            _check_tokenizer_model(d / "tokenizer.model")
    if headers and not shrunk:  # quantized / compressed checkpoints store other tensors (packed, scales, masks)
        _check_tensor_shapes(d, headers, names=not cfg.get("quantization_config"))
    return {"config": cfg, "bytes": nbytes, "path": d}


def _check_tokenizer_model(f: Path) -> None:
    """A ``tokenizer.model`` (the tokenizer when there is no tokenizer.json) is a SentencePiece model, or a
    tiktoken rank file (lines ``<base64> <rank>``); anything else is refused here, naming the file."""
    import re
    try:
        head = f.read_bytes()[:4096]
    except OSError as e:
        raise PreflightError(f"{f}: cannot be read ({e.strerror or e})") from None
    lines = head.decode("ascii", "replace").splitlines()[:-1] or [""]
    if all(re.fullmatch(r"[A-Za-z0-9+/=]+ \d+", ln) for ln in lines):
        return  # tiktoken ranks
    try:
        import sentencepiece as spm
    except ImportError:  # the loader says what it needs
        return
    try:
        spm.SentencePieceProcessor(model_file=str(f))
    except Exception:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError on a damaged model
        raise PreflightError(f"{f}: not a SentencePiece tokenizer model (damaged, or another kind of file); restore "
                             f"it, or put the model's tokenizer.json beside it") from None


def _check_tensor_shapes(d: Path, headers: dict, *, names: bool = True) -> None:
    """The weight files hold exactly the tensors of the model config.json describes, each with its shape (the
    model built on the meta device: no memory). Tied weights (an output head sharing the embedding) and the
    buffers transformers itself skips may be absent; a model whose checkpoints transformers renames on load
    (conversion mappings) gets the name check at load instead (:func:`.model_files.check_loading_info`)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:  # pragma: no cover - the loader says what is missing
        return
    try:
        config = AutoConfig.from_pretrained(str(d))
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - a config transformers cannot build a model from
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        raise PreflightError(f"{d / 'config.json'}: {lines[0] if lines else type(e).__name__}") from None
    expected = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    for name, (f, shape) in headers.items():
        if name in expected and tuple(shape) != expected[name]:
            raise PreflightError(f"{f}: tensor {name!r} has shape {tuple(shape)}, config.json gives "
                                 f"{expected[name]} (weights of another model?)")
    if not names:
        return
    missing, surplus = _missing_and_surplus(m, set(expected), set(headers))
    if missing or surplus:
        files = sorted({str(f.name) for f, _ in headers.values()})
        where = d / files[0] if len(files) == 1 else d
        raise incomplete(where, missing, surplus)


def _missing_and_surplus(model, expected: set, stored: set) -> tuple[set, set]:
    """The names a model's state dict has that the files lack, and the files' names the model has no place for,
    by transformers' own rules: tied weights may be absent; its ignore patterns (and the old per-layer
    ``rotary_emb.inv_freq`` / ``position_ids`` buffers) are not surplus; a checkpoint of the base model (no
    ``model.`` prefix) is the same model. Empty sets when the model's checkpoints are renamed on load."""
    import re
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        if get_model_conversion_mapping(model, add_legacy=False):
            return set(), set()
    except Exception:  # noqa: BLE001 - another transformers version: the load-time check remains
        pass
    if any(re.search(r"(LayerNorm\.(gamma|beta)|\.weight_[gv])$", k) for k in stored):
        return set(), set()  # legacy names transformers renames on load
    pre = (getattr(model, "base_model_prefix", "") or "") + "."

    def norm(k):
        return k[len(pre):] if pre != "." and k.startswith(pre) else k

    tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ())

    def patterns(attr, extra=()):
        pats = list(getattr(model, attr, None) or ()) + list(extra)
        return re.compile("|".join(f"({p})" for p in pats)) if pats else None

    skip_missing = patterns("_keys_to_ignore_on_load_missing")
    skip_surplus = patterns("_keys_to_ignore_on_load_unexpected", (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"))
    have = {norm(k) for k in stored}
    want = {norm(k) for k in expected}
    missing = {k for k in expected if norm(k) not in have and k not in tied
               and not (skip_missing and skip_missing.search(k))}
    surplus = {k for k in stored if norm(k) not in want and not (skip_surplus and skip_surplus.search(k))}
    return missing, surplus


_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_header(buf, size: int) -> tuple[dict, list, int]:
    """(metadata, tensor infos [(name, dims, type, offset)], data start) of a GGUF file in ``buf`` (a memory
    map); raises ``ValueError`` on anything out of bounds. Arrays other than numbers are skipped."""
    pos = 4

    def take(fmt):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise ValueError(f"header runs past the end of the file at byte {pos}")
        v = struct.unpack_from(fmt, buf, pos)[0]
        pos += n
        return v

    def string():
        nonlocal pos
        n = take("<Q")
        if pos + n > size:
            raise ValueError(f"a string of {n} bytes runs past the end of the file")
        v = bytes(buf[pos:pos + n])
        pos += n
        return v

    def value(t):
        nonlocal pos
        if t in _GGUF_SCALAR:
            return take(_GGUF_SCALAR[t])
        if t == 8:
            return string().decode("utf-8", "replace")
        if t == 9:
            et, n = take("<I"), take("<Q")
            if et in _GGUF_SCALAR:
                w = struct.calcsize(_GGUF_SCALAR[et])
                if pos + n * w > size:
                    raise ValueError("an array runs past the end of the file")
                pos += n * w
            else:
                for _ in range(n):
                    value(et)
            return None
        raise ValueError(f"unknown metadata type {t}")

    version = take("<I")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = take("<Q"), take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = string().decode("utf-8", "replace")
        meta[key] = value(take("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = string().decode("utf-8", "replace")
        nd = take("<I")
        dims = [take("<Q") for _ in range(nd)]
        tensors.append((name, dims, take("<I"), take("<Q")))
    align = int(meta.get("general.alignment") or 32)
    return meta, tensors, (pos + align - 1) // align * align


def _check_gguf(f: Path) -> dict:
    """The GGUF header readable and every tensor inside the file; the model config keys from its metadata."""
    import mmap
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise PreflightError(f"{f}: not a GGUF file (bad magic number)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                meta, tensors, start = _gguf_header(buf, size)
    except OSError as e:
        raise PreflightError(f"{f}: cannot be read ({e.strerror or e})") from None
    except (ValueError, struct.error) as e:
        raise PreflightError(f"{f}: damaged or truncated GGUF file ({e})") from None
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:  # the loader needs gguf anyway and says so
        GGML_QUANT_SIZES = {}
    end, nparams = start, 0
    for name, dims, qtype, off in tensors:
        n = math.prod(dims)
        nparams += n
        bs = GGML_QUANT_SIZES.get(qtype)
        if bs is not None:
            end = max(end, start + off + n // bs[0] * bs[1])
    if end > size:
        raise PreflightError(f"{f}: truncated GGUF file ({size} bytes, its tensors need {end})")
    arch = meta.get("general.architecture")
    _check_gguf_blocks(f, [t[0] for t in tensors], meta.get(f"{arch}.block_count") if arch else None)
    cfg = None
    if arch:
        cfg = {"model_type": arch, "hidden_size": meta.get(f"{arch}.embedding_length"),
               "max_position_embeddings": meta.get(f"{arch}.context_length"),
               "intermediate_size": meta.get(f"{arch}.feed_forward_length"),
               "num_attention_heads": meta.get(f"{arch}.attention.head_count"),
               "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv"),
               "num_hidden_layers": meta.get(f"{arch}.block_count"),
               "max_position_embeddings": meta.get(f"{arch}.context_length")}
        cfg = {k: v for k, v in cfg.items() if v is not None}
    return {"config": cfg, "bytes": max(size, 4 * nparams), "path": f}  # dequantized to float32 on load


def _check_gguf_blocks(f: Path, names: list, block_count) -> None:
    """The blocks a GGUF file stores are the ``block_count`` its header gives, and none lacks a tensor that
    every other block has while holding nothing of its own (a block of another kind — a dense first block
    among mixture-of-experts ones — holds tensors the others lack and is left alone). The full name check
    against the model is made at load (:func:`.model_files.check_loading_info`)."""
    import re
    blocks: dict = {}
    for n in names:
        mt = re.match(r"blk\.(\d+)\.(.+)$", n)
        if mt:
            blocks.setdefault(int(mt.group(1)), set()).add(mt.group(2))
    if not blocks or not isinstance(block_count, int):
        return
    surplus = [f"blk.{i}.{s}" for i in sorted(blocks) if i >= block_count for s in sorted(blocks[i])]
    missing = [f"blk.{i}.*" for i in range(block_count) if i not in blocks]
    inside = [blocks[i] for i in range(block_count) if i in blocks]
    if len(inside) >= 3:
        for i in range(block_count):
            others = [blocks[j] for j in range(block_count) if j != i and j in blocks]
            common = set.intersection(*others)
            if i in blocks and blocks[i] < common:
                missing += [f"blk.{i}.{s}" for s in sorted(common - blocks[i])]
    if missing or surplus:
        raise incomplete(f, missing, surplus, f"its header (block_count {block_count})")


def check_model_source(model, model_dir=None, *, what: str = "--model", tokenizer: bool = True) -> Optional[dict]:
    """Resolve a model name/path without loading it and check its files (see module doc).

    Returns ``{"config": dict or None, "bytes": int, "path": Path}``, or ``None`` for a hub id (checked by the
    loader). Missing or damaged files raise :class:`PreflightError` naming the file."""
    from .loading import ModelNotFoundError, locate_model as _locate
    p = Path(str(model)).expanduser()
    if p.is_dir() and (p / "config.json").exists() and not (p / "config.json").is_file():
        raise PreflightError(f"{p / 'config.json'}: not a readable file")
    try:  # the loader's own resolution (built-in name, directory, .gguf file, hub id), without reading weights
        kind, where, gguf, _ = _locate(str(model), model_dir)
    except ModelNotFoundError as e:
        raise PreflightError(f"{what}: {e}") from None
    if kind == "hub":
        return None  # a hub id: the loader looks it up (cache first, then online)
    return _check_gguf(Path(where) / gguf) if kind == "gguf" else _check_hf_dir(Path(where), tokenizer=tokenizer)


def context_length(cfg: Optional[dict]) -> Optional[int]:
    """The context length (tokens) a model's config.json or GGUF header gives, or None."""
    for k in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = (cfg or {}).get(k)
        if isinstance(v, int) and v > 0:
            return v
    return None


def model_metadata(model, model_dir=None) -> Optional[dict]:
    """The model's config as a dict from its files (no weights read), or None when unknown (hub id)."""
    info = check_model_source(model, model_dir)
    return info and info.get("config")


# ============================================================================================ output, data
def _local_dir(model, model_dir=None) -> Optional[Path]:
    from .loading import MODEL_ALIASES as _ALIASES, builtin_path
    name = str(model)
    key = _ALIASES.get(name.strip().lower())
    try:
        if key is not None:
            d, _ = builtin_path(key, model_dir)
            return d.resolve()
    except Exception:  # noqa: BLE001 - reported by check_model_source
        return None
    p = Path(name).expanduser()
    if p.is_file():
        return p.parent.resolve() if p.suffix.lower() != ".gguf" else p.resolve()
    return p.resolve() if p.is_dir() else None


def _inside(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check_output(output, *, model=None, model_dir=None, overwrite: bool = False, need_bytes: int = 0,
                 allow_existing_run: bool = False) -> Optional[Path]:
    """The output directory of a run (see module doc); returns it as a Path (not created)."""
    if output is None:
        if overwrite:
            raise PreflightError("--overwrite needs --output")
        return None
    check_path_name(output, "--output", extra=len(".optprune-checkpoint") + 16)
    out = Path(str(output)).expanduser()
    if out.exists() and not out.is_dir():
        raise PreflightError(f"--output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / RUN_FILE).is_file():
            raise PreflightError(f"--output {out} is a non-empty directory that is not an optprune output; "
                                 f"choose a new or empty directory")
        if not overwrite and not allow_existing_run:
            raise PreflightError(f"--output {out} already holds an optprune output; pass --overwrite to replace it "
                                 f"(the old one is kept until the new one is complete) or choose another directory")
    elif overwrite and not allow_existing_run:
        pass  # nothing to overwrite: harmless
    res = out.resolve()
    src = _local_dir(model, model_dir) if model is not None else None
    if src is not None:
        src_dir = src.parent if src.is_file() else src
        if res == src_dir or _inside(res, src_dir):
            raise PreflightError(f"--output {out} is inside the input model's folder {src_dir}; choose a folder "
                                 f"outside it")
        if _inside(src_dir, res):
            raise PreflightError(f"--output {out} contains the input model {src}; choose another folder")
    anc = res.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise PreflightError(f"--output {out}: {anc} is not a directory")
    check_writable(anc, f"--output {out}")
    if need_bytes:
        free = shutil.disk_usage(anc).free
        if free < need_bytes:
            raise PreflightError(f"--output {out}: not enough disk space on {anc} ({free / 2**20:.0f} MiB free, "
                                 f"the output needs about {need_bytes / 2**20:.0f} MiB)")
    return out


def check_path_name(path, what: str, *, extra: int = 0) -> None:
    """A path the file system can hold: not empty, valid UTF-8 (it is recorded in run.json), no component
    longer than the file system allows once ``extra`` characters are added to the last one (the temporary and
    checkpoint folders beside an output are named ``.<name>.optprune-…``)."""
    s = str(path)
    if not s.strip():
        raise PreflightError(f"{what} is empty; name a folder (e.g. {what} pruned)")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise PreflightError(f"{what} {s.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8; choose a name "
                             f"in UTF-8") from None
    p = Path(s).expanduser()
    anc = p.resolve().parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    try:
        name_max = os.pathconf(anc, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    parts = [q for q in p.parts if q not in ("/", "")]
    for i, q in enumerate(parts):
        n = len(q.encode("utf-8")) + (extra if i == len(parts) - 1 else 0)
        if n > name_max:
            room = name_max - (extra if i == len(parts) - 1 else 0)
            raise PreflightError(f"{what}: the name {q[:24]}… has {len(q.encode('utf-8'))} bytes; this file system "
                                 f"allows {room} here (choose a shorter name)")


def check_writable(d: Path, what: str) -> None:
    """Create and remove a folder in ``d`` (permission bits say nothing for root or read-only mounts)."""
    import tempfile
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".optprune-probe-", dir=d))
    except OSError as e:
        raise PreflightError(f"{what}: {d} is not writable ({e.strerror or e})") from None


def check_data_dir(data_dir) -> None:
    """An explicitly chosen data folder (argument or ``$OPTPRUNE_DATA_DIR``) must exist."""
    if data_dir is not None:
        p, what = Path(str(data_dir)).expanduser(), "--data-dir"
    elif os.environ.get("OPTPRUNE_DATA_DIR"):
        p, what = Path(os.environ["OPTPRUNE_DATA_DIR"]).expanduser(), "$OPTPRUNE_DATA_DIR"
    else:
        return
    if not p.is_dir():
        raise PreflightError(f"{what} {p} is not a directory (it must hold wikitext-2-raw/, ptb/ or c4/; leave it "
                             f"out to calibrate on self-generated text)")
    misplaced = _misplaced_data(p)
    if misplaced:
        found, want = misplaced
        raise PreflightError(f"{what} {p}: {found} is not where optprune looks for it ({want}); lay the folder out "
                             f"as wikitext-2-raw/, ptb/, c4/, tinystories/ (docs/protocols.md)")


def _misplaced_data(root: Path) -> Optional[tuple]:
    """(found, expected) for a known data file that sits at another level of the folder than its layout says
    (e.g. ``wiki.test.raw`` directly in it, or one folder too deep), while its expected place is empty."""
    from .data import DATASETS
    wanted = {Path(rel).name: root / rel for splits in DATASETS.values() for rel in splits.values()}
    for depth in ("*", "*/*", "*/*/*"):
        for f in sorted(root.glob(depth)):
            want = wanted.get(f.name)
            if want is not None and f.is_file() and not want.is_file():
                return str(f), str(want)
    return None


# ============================================================================================ shapes
def _cfg_get(cfg: dict, *keys, default=None):
    for k in keys:
        v = cfg.get(k)
        if v is not None:
            return v
    return default


def _widths(cfg: dict, arch) -> dict:
    """{'hidden', 'attn_out' (input width of o), 'mlp' (input width of down), 'heads', 'kv_heads'} from config."""
    hidden = _cfg_get(cfg, "hidden_size", "n_embd", "d_model", "dim")
    out = {"hidden": hidden}
    if arch.mlp is not None:
        mlp = _cfg_get(cfg, arch.mlp.config_key, "intermediate_size", "ffn_dim")
        if mlp is None and hidden is not None and arch.mlp.config_key == "n_inner":
            mlp = 4 * int(hidden)  # GPT-2's default
        out["mlp"] = mlp
    if arch.heads is not None:
        nq = _cfg_get(cfg, arch.heads.heads_key, "num_attention_heads")
        nkv = _cfg_get(cfg, arch.heads.kv_heads_key, default=nq) if arch.heads.kv_heads_key else nq
        hd = cfg.get("head_dim") or (int(hidden) // int(nq) if hidden and nq else None)
        out.update(heads=nq, kv_heads=nkv, attn_out=int(nq) * int(hd) if nq and hd else None)
    return {k: int(v) for k, v in out.items() if v is not None}


def check_shapes(cfg: Optional[dict], *, structured: bool, nm_M: Optional[int], structure: str,
                 sparsity: float, pattern: str, quant_group: Optional[int] = None) -> None:
    """N:M divisibility of every prunable input width; a structured sparsity keeping ≥ 1 group; a ``--quant``
    group size dividing every prunable input width."""
    if not cfg:
        return
    from .architectures import UnknownArchitectureError
    try:
        arch = arch_of(cfg)
    except UnknownArchitectureError as e:
        raise PreflightError(str(e)) from None
    w = _widths(cfg, arch)
    if nm_M:
        for key, layer in (("hidden", "q/k/v/up/gate"), ("attn_out", "attention output"), ("mlp", "MLP down")):
            if key in w and w[key] % nm_M:
                raise PreflightError(f"--pattern {pattern} needs every prunable layer width divisible by M={nm_M}; "
                                     f"the {layer} projection has input width {w[key]}")
    if quant_group:
        for key, layer in (("hidden", "q/k/v/up/gate"), ("attn_out", "attention output"), ("mlp", "MLP down")):
            if key in w and w[key] % quant_group:
                raise PreflightError(f"--quant group {quant_group} does not divide the input width {w[key]} of the "
                                     f"{layer} projection; choose a group dividing every width, or per-channel "
                                     f"scales (no g)")
    if structured:
        for kind in [k.strip().lower() for k in str(structure).split(",") if k.strip()]:
            g, what = {"mlp": (w.get("mlp"), "MLP channels"), "heads": (w.get("heads"), "attention heads"),
                       "heads:kv": (w.get("kv_heads"), "key/value groups")}.get(kind, (None, ""))
            if not g:
                continue
            if sparsity * g > g - 1 + 1e-9:
                raise PreflightError(f"--sparsity {sparsity} would remove all {g} {what} of a block; structured "
                                     f"{kind} sparsity must be ≤ {g - 1}/{g} = {(g - 1) / g:.4f} (one group kept)")


def check_hidden(spec, *, pattern_given: bool, min_degree, allocation, low_memory: bool) -> None:
    """``--structure hidden`` (llm_adapters/hidden.py): a rotation method (the subspace pattern) or a structured
    method, one width for the whole stream, the whole model in memory."""
    if not (spec.structured or "subspace" in spec.patterns):
        raise PreflightError(f"--structure hidden takes a rotation method (slicegpt) or a structured method "
                             f"(spap, group_obs, flap, group_magnitude); {spec.name} prunes single weights")
    if pattern_given:
        raise PreflightError("--structure hidden chooses what to keep by itself; drop --pattern")
    if min_degree is not None:
        raise PreflightError("--min-degree applies to N:M patterns, not to --structure hidden")
    if (allocation or "uniform").strip().lower() != "uniform":
        raise PreflightError("--structure hidden keeps one width for the whole residual stream; drop --allocation")
    if low_memory:
        raise PreflightError("--structure hidden needs the whole model in memory; drop --low-memory")


# ============================================================================================ prune
def check_prune(*, model, model_dir, spec, sparsity, sparsity_given: bool, pattern, pattern_given: bool,
                structure_given: bool, structure, min_degree, allocation, allocation_eps, evaluate: bool,
                eval_options: dict, data_dir, output, overwrite: bool, reference, resume: bool,
                checkpoint_dir, low_memory: bool, quant: Optional[str] = None) -> dict:
    """Everything ``optprune prune`` can check before loading (module doc). Returns
    ``{"out_dir": Path or None, "model": {config, bytes, path} or None}``."""
    from ..formulations.grid import parse_grid
    from ..formulations.patterns import NM, parse_pattern
    # combinations: options the method would ignore
    if spec.structured:
        if pattern_given and str(pattern).strip().lower() not in ("unstructured", "groups", "structured"):
            raise PreflightError(f"--pattern {pattern}: {spec.name} is a structured method (it removes whole "
                                 f"groups chosen by --structure); drop --pattern")
        if min_degree is not None:
            raise PreflightError(f"--min-degree applies to N:M patterns; {spec.name} is a structured method")
    else:
        if structure_given and str(structure).strip().lower() != "hidden":
            raise PreflightError(f"--structure {structure} applies to structured methods; {spec.name} prunes "
                                 f"individual weights (--pattern)")
    if str(structure).strip().lower() == "hidden":
        check_hidden(spec, pattern_given=pattern_given, min_degree=min_degree, allocation=allocation,
                     low_memory=low_memory)
    elif set(spec.patterns) == {"subspace"}:
        raise PreflightError(f"{spec.name} keeps a subspace of the residual stream: use it with --structure hidden")
    nm = None
    if not spec.structured:
        pat = parse_pattern(pattern, sparsity if sparsity is not None else 0.5, min_degree=min_degree)
        if isinstance(pat, NM):
            nm = pat
            if sparsity_given and abs(float(sparsity) - (1 - pat.N / pat.M)) > 1e-9:
                raise PreflightError(f"--sparsity {sparsity} contradicts --pattern {pattern} (N:M fixes the "
                                     f"sparsity at {1 - pat.N / pat.M:g}); drop --sparsity")
    if allocation_eps is not None and (allocation or "uniform").strip().lower() == "uniform":
        raise PreflightError("--allocation-eps applies to --allocation alpha/owl, not uniform")
    if not evaluate:
        given = [k for k, v in eval_options.items() if v is not None]
        if given:
            raise PreflightError(f"{given[0]} applies to the evaluation, which --no-eval turns off")
    if resume and low_memory:
        raise PreflightError("--resume is not available with --low-memory")
    if checkpoint_dir is not None and low_memory:
        raise PreflightError("--checkpoint-dir is not available with --low-memory")
    if checkpoint_dir is None and output is None and resume:
        raise PreflightError("--resume needs --output (or --checkpoint-dir) to find the checkpoint")
    # files
    check_data_dir(data_dir)
    import torch
    in_memory = isinstance(model, torch.nn.Module)  # a loaded model: nothing on disk to check
    info = None if in_memory else check_model_source(model, model_dir)
    if reference:
        check_model_source(reference, model_dir, what="--reference")
    cfg = info and info.get("config")
    check_shapes(cfg, structured=spec.structured, nm_M=nm.M if nm is not None else None, structure=structure,
                 sparsity=float(sparsity if sparsity is not None else 0.5), pattern=pattern,
                 quant_group=parse_grid(quant).group if quant is not None else None)
    need = 0
    if info:  # the saved weights (model dtype) + the block checkpoints, with a margin
        need = int(info["bytes"] * (2 if checkpoint_dir is None else 1) * 1.1)
    out_dir = check_output(output, model=None if in_memory else model, model_dir=model_dir, overwrite=overwrite, need_bytes=need,
                           allow_existing_run=False)
    if sparsity is None:
        sparsity = (1 - nm.N / nm.M) if nm is not None else 0.5
    return {"out_dir": out_dir, "model": info, "sparsity": sparsity}


def open_checkpoint(out_dir: Optional[Path], checkpoint_dir, resume: bool, *, single: bool, settings: dict):
    """The run's :class:`~optprune.llm_adapters.checkpoint.Checkpoint` (``--checkpoint-dir``, default beside
    the output), or None when the run keeps none (no output; several processes; ``--low-memory``)."""
    from .checkpoint import Checkpoint, CheckpointError, default_checkpoint_dir
    if checkpoint_dir is None and out_dir is None:
        return None
    if not single:
        if checkpoint_dir is not None or resume:
            raise PreflightError("--checkpoint-dir/--resume need a single process without --low-memory")
        return None
    explicit = checkpoint_dir is not None
    path = Path(str(checkpoint_dir)).expanduser() if explicit else default_checkpoint_dir(out_dir)
    if path.exists() and not path.is_dir():
        raise PreflightError(f"--checkpoint-dir {path} exists and is not a directory")
    if out_dir is not None and (path.resolve() == out_dir.resolve() or _inside(path.resolve(), out_dir.resolve())):
        raise PreflightError(f"--checkpoint-dir {path} must not be inside --output {out_dir} (the output is "
                             f"replaced as a whole)")
    anc = path.resolve()
    while not anc.exists():
        anc = anc.parent
    check_writable(anc, f"--checkpoint-dir {path}")
    try:
        return Checkpoint(path, settings, resume=resume, explicit=explicit)
    except CheckpointError as e:
        raise PreflightError(str(e)) from None


def load_checked(load_model, model, **kw):
    """``load_model(model, **kw)``; whatever goes wrong reading files the preflight could not see (e.g. a
    shard whose tensor shapes do not fit the config) becomes one line naming the model."""
    try:
        return load_model(model, **kw)
    except (PreflightError, FileNotFoundError, ImportError):
        raise
    except (OSError, ValueError, RuntimeError, KeyError, EOFError) as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "mismatch" in ln.lower()), lines[0] if lines else type(e).__name__)
        raise PreflightError(f"{model}: the model files cannot be loaded ({detail[:300]})") from None
