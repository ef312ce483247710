"""The save-format registry and what the format modules share (no format lives here; see export.py).

A format is a :class:`SaveFormat` subclass in a module of its own that registers itself with
:func:`register_format`: ``export.py`` (``dense``), ``export_gguf.py`` (``gguf``), ``export_legacy_sparse.py``
(``compressed-sparse-legacy``), ``export_quant.py`` (``pack-quantized``). This module imports none of them, so they can all import it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

__all__ = ["ExportError", "SaveFormat", "finish_hf_dir", "register_format", "save_formats", "get_format", "format_options",
           "detect_structure", "cast_state_dict", "set_config_dtype", "module_names", "write_loading_note",
           "LOADING_FILE"]

#: the loading note every output carries (how to load it, with which tools)
LOADING_FILE = "LOADING.md"


class ExportError(ValueError):
    """Bad save options (one line; raised before anything is written)."""


class SaveFormat:
    """One on-disk format. Subclasses set ``name``, ``summary`` (one line, for ``--help``), ``options`` (the
    format options they read), ``structured`` (can hold a shrunk model) and implement :meth:`write`."""
    name: str = ""
    summary: str = ""
    options: tuple = ()
    structured: bool = True

    #: the error a refusal raises (a subclass of :class:`ExportError`)
    error: type = ExportError

    def unavailable(self) -> Optional[str]:
        """Why the installed libraries cannot write or load this format (one line), or None."""
        return None

    def check(self, *, dtype, structured: bool, model_type: Optional[str], config: Optional[dict],
              options: dict) -> None:
        """Refuse (one line, :attr:`error`) what this format cannot write; no weights are read. The base refuses
        a format whose libraries are missing (:meth:`unavailable`)."""
        why = self.unavailable()
        if why:
            raise self.error(why)

    def check_quant(self, quant: Optional[str]) -> None:
        """Refuse a run's ``--quant`` grid (None: no grid) this format cannot store (before pruning)."""

    def check_loaded(self, model: nn.Module, tokenizer, options: dict) -> None:
        """Checks that need the loaded model (before pruning)."""

    def write(self, model: nn.Module, out: Path, tokenizer, *, dtype: torch.dtype, layers, pattern,
              options: dict) -> dict:
        raise NotImplementedError

    def loading_note(self, info: dict) -> str:
        """Markdown for :data:`LOADING_FILE`: how to load the output and which tools do."""
        return ""


_FORMATS: dict = {}


def register_format(cls):
    """Class decorator: register a :class:`SaveFormat` under its ``name`` (two formats with one name: error)."""
    fmt = cls()
    if not fmt.name or fmt.name in _FORMATS:
        raise ValueError(f"save format {fmt.name!r}: {'no name' if not fmt.name else 'registered twice'}")
    _FORMATS[fmt.name] = fmt
    return cls


def save_formats() -> tuple:
    return tuple(_FORMATS)


def get_format(name: str) -> SaveFormat:
    if name not in _FORMATS:
        raise ExportError(f"unknown save format {name!r}; choose from {', '.join(_FORMATS)}")
    return _FORMATS[name]


def format_options(fmt: SaveFormat, options: dict) -> dict:
    given = {k: v for k, v in options.items() if v is not None}
    unused = sorted(set(given) - set(fmt.options))
    if unused:
        owners = {k: f.name for f in _FORMATS.values() for k in f.options}
        k = unused[0]
        where = f"it applies to --save-format {owners[k]}" if k in owners else "no save format reads it"
        raise ExportError(f"--{k.replace('_', '-')} is not an option of --save-format {fmt.name} ({where})")
    return given


def detect_structure(weights: Iterable[torch.Tensor]) -> str:
    """``"2:4"`` when every matrix keeps at most 2 of each 4 consecutive inputs (rows of ``W`` (out, in)),
    ``"unstructured"`` otherwise."""
    seen = False
    for W in weights:
        seen = True
        if W.dim() != 2 or W.shape[1] % 4:
            return "unstructured"
        if int((W.reshape(-1, 4) != 0).sum(1).max()) > 2:
            return "unstructured"
    return "2:4" if seen else "unstructured"


def cast_state_dict(model: nn.Module, dtype: torch.dtype) -> dict:
    """The state dict in ``dtype``; tensors that share storage (tied embeddings) stay shared, so that
    ``save_pretrained`` writes them once."""
    out, done = {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if key not in done:
            done[key] = v.detach().to(dtype) if v.is_floating_point() else v.detach()
        out[k] = done[key]
    return out


def set_config_dtype(out: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` names the dtype of the model in memory; the file holds ``dtype``."""
    f = out / "config.json"
    d = json.loads(f.read_text())
    d["dtype"] = str(dtype).replace("torch.", "")
    f.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


def finish_hf_dir(out: Path, tokenizer, dtype: torch.dtype) -> int:
    """The parts every Hugging Face directory format ends with: the config's dtype and the tokenizer; returns
    the bytes of the weight files."""
    set_config_dtype(out, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def module_names(model: nn.Module, layers: Optional[Iterable[str]]) -> list[str]:
    """The pruned module names: ``layers``, checked against the model, or (None) every ``nn.Linear`` with zeros."""
    mods = dict(model.named_modules())
    if layers is None:  # every nn.Linear with at least one zero weight
        return [n for n, m in mods.items() if isinstance(m, nn.Linear) and bool((m.weight == 0).any())]
    names = list(dict.fromkeys(layers))
    bad = [n for n in names if n not in mods]
    if bad:
        raise ExportError(f"save: no module named {bad[0]!r} in the model")
    return names


def write_loading_note(out: Path, text: str) -> None:
    if text:
        (Path(out) / LOADING_FILE).write_text("# How to load this model\n\n" + text)
