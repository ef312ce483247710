"""Saving a pruned model: the weights in the chosen format and dtype, the tokenizer, and for a structured
method's shrunk model the widths file and a loading note.

The run record (``run.json``) is written by the run beside these files; the formats themselves live in
:mod:`.export` (and its ``export_*`` modules) and the shrunk-model files in :mod:`.surgery`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import export, surgery

__all__ = ["save_pruned_model"]


def save_pruned_model(model, tok, out_dir: Path, arch, spec, *, save_format="dense", dtype=None, layers=None,
                      pattern=None, format_options=None) -> dict:
    """Write the model (+ tokenizer) through ``export.save_model`` (format, dtype, format options). A structured
    method's shrunk model in the dense format goes through ``surgery.save_shrunk`` (which writes
    ``optprune_widths.json`` and, when the widths are uniform, a stock-loadable config) and gets a loading note."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu")
    info = {"path": str(out_dir.resolve())}
    opts = {k: v for k, v in (format_options or {}).items() if v is not None}
    if not spec.structured or save_format != "dense":
        info.update(export.save_model(model, out_dir, tok, format=save_format, dtype=dtype or torch.float32,
                                      layers=layers, pattern=pattern, structured=spec.structured, **opts))
        return info
    if dtype is not None:
        model.to(dtype)  # (structured: the shrunk model is written in the output dtype)
        info["dtype"] = str(dtype).replace("torch.", "")
    # SURGERY CALL SITE (llm_adapters/surgery.py): shrunk models, possibly with per-layer widths
    widths = surgery.save_shrunk(model, str(out_dir), arch)
    info.update(save_format="dense", format="optprune-shrunk", stock_loadable=bool(widths.get("stock_loadable")),
                uniform=bool(widths.get("uniform")))
    tok.save_pretrained(str(out_dir))
    export.write_loading_note(out_dir, surgery.loading_note(widths))
    return info
