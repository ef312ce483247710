"""Calibration handed over in memory (Python API): a list of strings, a 🤗 ``datasets.Dataset`` with a text
column, or token ids. (Names and text files go through :func:`optprune.llm_adapters.data.calibration_tokens`.)

``calibration_from(tokenizer, source, nsamples=..., seqlen=..., seed=...) -> (LongTensor (nsamples, seqlen), info)``

* texts (a list/tuple of strings, or the ``text_column`` of a ``Dataset``): joined with blank lines into one
  token stream; ``nsamples`` windows of ``seqlen`` tokens start at positions drawn with ``random.Random(seed)``
  (short texts work: a window may span several of them);
* a 2-D LongTensor ``(n, L)``: used as given — rows ``[:nsamples]`` and columns ``[:seqlen]`` when those are
  asked for explicitly (asking for more than there is is an error); a 1-D LongTensor is a token stream (as texts).
"""
from __future__ import annotations

import hashlib
import random
from typing import Optional

import torch

__all__ = ["CalibrationInputError", "is_in_memory", "calibration_kind", "calibration_from"]


class CalibrationInputError(ValueError):
    """In-memory calibration that cannot be used (one line)."""


def _is_dataset(obj) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets" and hasattr(obj, "column_names")


def is_in_memory(source) -> bool:
    """True for the in-memory forms this module handles (not a name/path string, not None)."""
    return torch.is_tensor(source) or _is_dataset(source) or (
        isinstance(source, (list, tuple)) and not isinstance(source, str))


def calibration_kind(source) -> str:
    if torch.is_tensor(source):
        return "token ids"
    if _is_dataset(source):
        return "datasets.Dataset"
    return "list of strings"


def _texts(source, text_column: str) -> list:
    if _is_dataset(source):
        if text_column not in source.column_names:
            raise CalibrationInputError(f"the calibration Dataset has no {text_column!r} column (columns: "
                                        f"{', '.join(source.column_names)}); pass text_column=")
        texts = source[text_column]
    else:
        texts = list(source)
    bad = next((type(t).__name__ for t in texts if not isinstance(t, str)), None)
    if bad:
        raise CalibrationInputError(f"calibration texts must be strings, found a {bad}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationInputError("the calibration texts are empty")
    return texts


def _windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    n = stream.numel()
    if n < seqlen + 1:
        raise CalibrationInputError(f"the calibration {what} hold {n} tokens, fewer than one window of {seqlen} "
                                    f"(+1); pass more text or a smaller seqlen")
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[s:s + seqlen] for s in starts]).to(torch.long)


def calibration_from(tokenizer, source, *, nsamples: int, seqlen: int, seed: int = 0,
                     explicit_nsamples: Optional[int] = None, explicit_seqlen: Optional[int] = None,
                     text_column: str = "text", vocab_size: Optional[int] = None):
    """(ids (nsamples, seqlen), info) from an in-memory calibration source (module doc)."""
    kind = calibration_kind(source)
    if torch.is_tensor(source):
        if source.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or source.dim() not in (1, 2):
            raise CalibrationInputError(f"calibration token ids must be an integer tensor (nsamples, seqlen) or a "
                                        f"1-D stream, got {tuple(source.shape)} {source.dtype}")
        ids = source.detach().to("cpu", torch.long)
        if ids.dim() == 1:
            X = _windows(ids, nsamples, seqlen, seed, "token ids")
        else:
            n, L = ids.shape
            rows = explicit_nsamples or n
            cols = explicit_seqlen or L
            if rows > n or cols > L:
                raise CalibrationInputError(f"nsamples × seqlen = {rows} × {cols} asked for, but the calibration "
                                            f"ids are {n} × {L}")
            if cols < 2:
                raise CalibrationInputError(f"calibration windows need ≥ 2 tokens, got {cols}")
            X = ids[:rows, :cols].contiguous()
    else:
        if tokenizer is None:
            raise CalibrationInputError(f"calibration from a {kind} needs a tokenizer")
        from .data import tokenize
        stream = tokenize(tokenizer, "\n\n".join(_texts(source, text_column)))
        X = _windows(stream, nsamples, seqlen, seed, "texts")
    if vocab_size is not None and X.numel() and (int(X.max()) >= vocab_size or int(X.min()) < 0):
        raise CalibrationInputError(f"calibration token ids outside the vocabulary [0, {vocab_size})")
    info = {"source": kind, "nsamples": int(X.shape[0]), "seqlen": int(X.shape[1]), "seed": seed,
            "sha256": hashlib.sha256(X.numpy().tobytes()).hexdigest()[:16]}
    if kind != "token ids" or source.dim() == 1:
        info["stream_windows"] = True
    return X, info
