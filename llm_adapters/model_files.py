"""Reading a model folder's metadata without loading it: JSON files, safetensors headers (checked against the
file's length), the architecture a ``config.json`` describes, and whether a structured output's
``optprune_widths.json`` still describes the weights beside it. Used by the preflight checks and by loading.

Every failure raises :class:`PreflightError` (one line naming the file and what is wrong).
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Optional

__all__ = ["PreflightError", "IncompleteModelError", "stale_widths", "check_loading_info", "torch_weight_shapes",
           "read_utf8", "not_utf8_text", "read_json", "safetensors_header", "arch_of"]

_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class PreflightError(ValueError):
    """A run that cannot succeed, found before any weight is read (one line; nothing written)."""


class IncompleteModelError(PreflightError):
    """The weight files do not hold exactly the tensors of the model its config describes."""


def _some(names, k: int = 3) -> str:
    names = sorted(names, key=lambda s: [int(t) if t.isdigit() else t for t in s.replace(".", " . ").split()])
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def incomplete(where, missing, surplus, described_by: str = "config.json") -> IncompleteModelError:
    """One line naming the tensors the weight files lack and hold in surplus against the model described
    (``described_by``: ``config.json``, or a GGUF file's own header)."""
    parts = ([f"missing {_some(missing)}"] if missing else []) + ([f"surplus {_some(surplus)}"] if surplus else [])
    fix = ("restore the weights, or the config.json that belongs to them" if described_by == "config.json" else
           "restore or re-convert the file")
    return IncompleteModelError(f"{where}: the weights are not those of the model {described_by} describes — "
                                f"{'; '.join(parts)} (damaged or mixed-up files: {fix})")


def check_loading_info(where, info: dict, described_by: str = "config.json") -> None:
    """Refuse a model whose load left tensors uninitialised or unused (transformers' ``output_loading_info``:
    tied weights and the buffers transformers knows to skip are already left out of it)."""
    missing, surplus = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    mism = info.get("mismatched_keys") or ()
    if missing or surplus:
        raise incomplete(where, missing, surplus, described_by)
    if mism:
        first = next(iter(mism))
        raise IncompleteModelError(f"{where}: tensor {first[0] if isinstance(first, tuple) else first!r} has a shape "
                                   f"{described_by} does not give (weights of another model?)")


def torch_weight_shapes(path: Path) -> dict:
    """tensor name -> shape of a PyTorch weight file (``pytorch_model.bin``), read with ``weights_only=True`` on
    the meta device (nothing but the pickle is read). A file that holds anything but tensors is refused: loading
    it could run code."""
    import pickle
    import zipfile

    import torch
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise PreflightError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        sd = torch.load(str(path), map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower() and "unsupported global" in str(e).lower():
            raise PreflightError(f"{path}: holds Python objects besides tensors, which could run code when "
                                 f"loaded; it is refused — convert it to safetensors where it was made") from None
        raise PreflightError(f"{path}: not a PyTorch weight file (damaged, or another kind of file)") from None
    except Exception:  # noqa: BLE001 - the unpickler fails on arbitrary bytes in many ways (IndexError, ...)
        raise PreflightError(f"{path}: not a PyTorch weight file (damaged, or another kind of file)") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PreflightError(f"{path}: not a state dict of tensors (a whole pickled model or a training state?); "
                             f"save the model's state_dict, or convert it to safetensors")
    return {str(k): list(v.shape) for k, v in sd.items()}


def not_utf8_text(data: bytes, path) -> Optional[str]:
    """Why ``data`` (the bytes of ``path``) is not UTF-8 text, as one line naming the file and the fix, or None."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return (f"{path}: UTF-16 text, optprune reads UTF-8; convert it: iconv -f UTF-16 -t UTF-8 '{path}' > "
                f"converted.txt")
    if b"\0" in data[:1 << 16]:
        return f"{path}: not a text file (it holds NUL bytes: binary data?); give a UTF-8 text file"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return (f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, Latin-1 or another "
                f"8-bit encoding?); convert it: iconv -f LATIN1 -t UTF-8 '{path}' > converted.txt")
    return None


def read_utf8(path: Path, error=None) -> str:
    """The text of a UTF-8 file; anything else raises ``error`` (default :class:`PreflightError`) with one
    line naming the file and how to convert it."""
    error = error or PreflightError
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    why = not_utf8_text(data, path)
    if why:
        raise error(why)
    return data.decode("utf-8")


def read_json(path: Path) -> dict:
    text = read_utf8(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise PreflightError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise PreflightError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, after checking that the file is as long as the header says."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PreflightError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                raise PreflightError(f"{path}: truncated or damaged safetensors file (header of {n} bytes in a "
                                     f"{size}-byte file)")
            raw = f.read(n)
    except OSError as e:
        raise PreflightError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        hdr = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PreflightError(f"{path}: damaged safetensors header (not JSON)") from None
    end = 0
    for name, t in hdr.items():
        if name == "__metadata__":
            continue
        try:
            a, b = (int(x) for x in t["data_offsets"])
            numel = math.prod(int(s) for s in t["shape"])
            isz = _ST_ITEMSIZE.get(str(t["dtype"]))
        except (KeyError, TypeError, ValueError):
            raise PreflightError(f"{path}: damaged safetensors header (entry {name!r})") from None
        if isz is not None and b - a != numel * isz:
            raise PreflightError(f"{path}: tensor {name!r} holds {b - a} bytes, its shape {t['shape']} "
                                 f"{t['dtype']} needs {numel * isz}")
        end = max(end, b)
    if 8 + n + end > size:
        raise PreflightError(f"{path}: truncated safetensors file ({size} bytes, the header needs {8 + n + end})")
    return hdr


def arch_of(cfg: dict):
    """The ArchSpec of the model a config.json describes (table entry, else inferred from the model built on the
    meta device): an unsupported model is refused here, before any weight file is read."""
    from .architectures import UnknownArchitectureError, table_entry, arch_from_config
    entry = table_entry(cfg.get("model_type"))
    if entry is not None:
        return entry
    try:
        from transformers import AutoConfig
        conf = AutoConfig.for_model(**cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise UnknownArchitectureError(f"model type {cfg.get('model_type')!r}: transformers cannot build its "
                                       f"config ({str(e).splitlines()[0][:160]})") from None
    return arch_from_config(conf)


def _stored_shapes(d: Path) -> dict:
    """tensor name -> shape, from the safetensors headers of a model folder."""
    index, single = d / "model.safetensors.index.json", d / "model.safetensors"
    files = [single] if single.is_file() else \
        [d / f for f in sorted(set((read_json(index).get("weight_map") or {}).values()))] if index.is_file() else []
    out = {}
    for f in files:
        out.update({k: v["shape"] for k, v in safetensors_header(f).items() if k != "__metadata__"})
    return out


def stale_widths(d: Path) -> Optional[str]:
    """Why the folder's ``optprune_widths.json`` does not describe its weights (left over from an earlier
    structured output), or None when it does (or there is none)."""
    from .architectures import UnknownArchitectureError
    wf = Path(d) / "optprune_widths.json"
    if not wf.is_file():
        return None
    rec, cfg = read_json(wf), read_json(Path(d) / "config.json")
    try:
        arch = arch_of(cfg)
    except UnknownArchitectureError:
        return None
    shapes = _stored_shapes(Path(d))
    for i, r in enumerate(rec.get("layers") or []):
        checks = []
        if "mlp" in r and arch.mlp is not None:
            checks.append((arch.mlp.down, int(r["mlp"]), "MLP channels"))
        if "heads" in r and arch.heads is not None and not arch.heads.fused_qkv:
            checks.append((arch.heads.o, int(r["heads"]) * int(r["head_dim"]), "attention columns"))
        for sub, width, what in checks:
            shp = shapes.get(f"{arch.blocks}.{i}.{sub}.weight")
            if shp is None or len(shp) != 2:
                continue
            n_in = shp[0] if sub in arch.transposed else shp[1]
            if n_in != width:
                return f"block {i} is recorded with {width} {what}, the stored {sub} has {n_in}"
    return None
