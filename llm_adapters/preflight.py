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

from .model_files import PreflightError, _arch_of, _read_json, _safetensors_header, stale_widths  # noqa: F401

__all__ = ["PreflightError", "check_prune", "check_output", "check_writable", "open_checkpoint", "load_checked", "check_model_source", "check_data_dir",
           "model_metadata", "RUN_FILE"]

RUN_FILE = "run.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer.txt")


# ============================================================================================ model files


def _check_hf_dir(d: Path, *, tokenizer: bool = True) -> dict:
    """config.json parsed; weight files complete; tokenizer present. Returns the config and the weight bytes."""
    cfg = _read_json(d / "config.json")
    if not isinstance(cfg.get("model_type"), str):
        raise PreflightError(f"{d / 'config.json'}: no model_type (not a transformers model config)")
    _arch_of(cfg)  # an unsupported family is refused from its config, before its weight files are looked at
    gen = d / "generation_config.json"
    if gen.is_file():
        _read_json(gen)
    index = d / "model.safetensors.index.json"
    single = d / "model.safetensors"
    nbytes = 0
    headers: dict = {}  # tensor name -> (file, shape)
    if index.is_file():
        wm = _read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise PreflightError(f"{index}: no weight_map")
        by_file: dict = {}
        for t, f in wm.items():
            by_file.setdefault(str(f), []).append(t)
        for f, names in sorted(by_file.items()):
            p = d / f
            if not p.is_file():
                raise PreflightError(f"{p}: shard listed in {index.name} is missing")
            hdr = _safetensors_header(p)
            headers.update({k: (p, v["shape"]) for k, v in hdr.items() if k != "__metadata__"})
            absent = [t for t in names if t not in hdr]
            if absent:
                raise PreflightError(f"{p}: does not hold {absent[0]!r} that {index.name} places there "
                                     f"(shard from another model?)")
            nbytes += p.stat().st_size
    elif single.is_file():
        hdr = _safetensors_header(single)
        headers.update({k: (single, v["shape"]) for k, v in hdr.items() if k != "__metadata__"})
        nbytes = single.stat().st_size
    else:
        bins = sorted(d.glob("*.bin")) + sorted(d.glob("*.pt"))
        if not bins:
            raise PreflightError(f"{d}: config.json but no weights (no model.safetensors, no index, no *.bin)")
        nbytes = sum(p.stat().st_size for p in bins)
    widths = d / "optprune_widths.json"
    shrunk = widths.is_file() and not _read_json(widths).get("stock_loadable") and stale_widths(d) is None
    if tokenizer:
        if not any((d / t).is_file() for t in _TOKENIZER_FILES):
            raise PreflightError(f"{d}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...)")
        tc = d / "tokenizer_config.json"
        if tc.is_file():
            _read_json(tc)
        if (d / "tokenizer.json").is_file():
            _read_json(d / "tokenizer.json")
    if headers and not shrunk:
        _check_tensor_shapes(d, headers)
    return {"config": cfg, "bytes": nbytes, "path": d}


def _check_tensor_shapes(d: Path, headers: dict) -> None:
    """Every stored tensor has the shape the config gives it (a model built on the meta device: no memory)."""
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
    cfg = None
    if arch:
        cfg = {"model_type": arch, "hidden_size": meta.get(f"{arch}.embedding_length"),
               "intermediate_size": meta.get(f"{arch}.feed_forward_length"),
               "num_attention_heads": meta.get(f"{arch}.attention.head_count"),
               "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv"),
               "num_hidden_layers": meta.get(f"{arch}.block_count")}
        cfg = {k: v for k, v in cfg.items() if v is not None}
    return {"config": cfg, "bytes": max(size, 4 * nparams), "path": f}  # dequantized to float32 on load


def check_model_source(model, model_dir=None, *, what: str = "--model", tokenizer: bool = True) -> Optional[dict]:
    """Resolve a model name/path without loading it and check its files (see module doc).

    Returns ``{"config": dict or None, "bytes": int, "path": Path}``, or ``None`` for a hub id (checked by the
    loader). Missing or damaged files raise :class:`PreflightError` naming the file."""
    from .loading import ModelNotFoundError, _locate
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


def model_metadata(model, model_dir=None) -> Optional[dict]:
    """The model's config as a dict from its files (no weights read), or None when unknown (hub id)."""
    info = check_model_source(model, model_dir)
    return info and info.get("config")


# ============================================================================================ output, data
def _local_dir(model, model_dir=None) -> Optional[Path]:
    from .loading import _ALIASES, builtin_path
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
        arch = _arch_of(cfg)
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
        if structure_given:
            raise PreflightError(f"--structure {structure} applies to structured methods; {spec.name} prunes "
                                 f"individual weights (--pattern)")
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
