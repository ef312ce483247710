"""Calibration handed over in memory (Python API): a list of strings, a 🤗 ``datasets.Dataset`` with a text
column, or token ids; and a text file of documents read as rows. (Named data sets go through
:func:`optprune.llm_adapters.data.calibration_tokens`.)

``calibration_from(tokenizer, source, nsamples=..., seqlen=..., seed=..., packing=...) -> (LongTensor, info)``

* texts (a list/tuple of strings, the ``text_column`` of a ``Dataset``, or the non-empty lines of a text file —
  :func:`file_rows`, as 🤗 datasets' ``text`` loader reads them), packed one of two ways:

  - ``packing="rows"`` (the default for texts; llm-compressor's convention): each text is one sample, tokenized
    on its own and truncated at ``seqlen`` tokens; short texts are kept whole. With more texts than ``nsamples``,
    ``nsamples`` of them are drawn with ``random.Random(seed)``. The rows are sorted by length (longest first)
    and right-padded into one ``(rows, longest)`` tensor; ``info["lengths"]`` gives each row's real tokens, and
    the pipeline batches rows of one length and cuts them to it (:func:`~.pipeline.row_batches`), so every block
    gets exactly what the model's forward gives it on that text alone and no pad token reaches a Gram matrix;
  - ``packing="windows"``: joined with blank lines into one token stream; ``nsamples`` windows of ``seqlen``
    tokens start at positions drawn with ``random.Random(seed)`` (a window may span several texts);

  ``info["tokens"]`` is the number of calibration tokens used either way;
* a 2-D LongTensor ``(n, L)``: used as given — rows ``[:nsamples]`` and columns ``[:seqlen]`` when those are
  asked for explicitly (asking for more than there is is an error); a 1-D LongTensor is a token stream (as texts).
"""
from __future__ import annotations

import hashlib
import random
from typing import Optional

import torch

__all__ = ["CalibrationInputError", "CalibrationTypeError", "PACKINGS", "ACCEPTED", "is_in_memory",
           "calibration_kind", "calibration_from", "check_calibration_type", "file_rows"]

#: how texts become calibration samples (module doc)
PACKINGS = ("rows", "windows")
#: what ``dataset=`` / ``calibration=`` takes
ACCEPTED = ("a name (c4, wikitext2, ptb, self) or a text-file path (str / os.PathLike), a list or tuple of strings, "
            "a datasets.Dataset, or an integer torch tensor of token ids")


class CalibrationInputError(ValueError):
    """In-memory calibration that cannot be used (one line)."""


class CalibrationTypeError(TypeError, CalibrationInputError):
    """A calibration source of a type optprune does not take (a TypeError; one line on the command line)."""


def check_calibration_type(source) -> None:
    """``None``, a name/path, a list/tuple, a ``datasets.Dataset`` or a tensor; anything else (a number, a dict,
    a generator, bytes, ...) is a :class:`CalibrationTypeError` listing the accepted types — never a file name."""
    import os
    if source is None or isinstance(source, (str, os.PathLike)) or is_in_memory(source):
        return
    raise CalibrationTypeError(f"calibration (dataset=) of type {type(source).__name__} is not accepted; give "
                               f"{ACCEPTED}")


def file_rows(path) -> list:
    """The non-empty lines of a UTF-8 text file: one calibration row each."""
    from pathlib import Path
    p = Path(str(path)).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationInputError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 "
                                    f"(e.g. iconv -t UTF-8)") from None
    return [ln for ln in text.splitlines() if ln.strip()]


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
        raise CalibrationTypeError(f"calibration texts must be strings, found a {bad}; give {ACCEPTED}")
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


def _rows(tokenizer, texts: list, nsamples: int, seqlen: int, seed: int, pad_id: int = 0):
    """Rows as samples (module doc): (right-padded ids, lengths, number of truncated rows)."""
    from .data import tokenize
    if len(texts) > nsamples:
        texts = [texts[i] for i in random.Random(seed).sample(range(len(texts)), nsamples)]
    rows, truncated = [], 0
    for t in texts:
        ids = tokenize(tokenizer, t)
        truncated += int(ids.numel() > seqlen)
        if ids.numel():
            rows.append(ids[:seqlen])
    if not rows:
        raise CalibrationInputError("the calibration texts tokenize to nothing")
    rows.sort(key=lambda r: -r.numel())  # stable: equal lengths keep their order and share batches
    lengths = [int(r.numel()) for r in rows]
    X = torch.full((len(rows), lengths[0]), int(pad_id), dtype=torch.long)
    for i, r in enumerate(rows):
        X[i, :r.numel()] = r
    return X, lengths, truncated


def calibration_from(tokenizer, source, *, nsamples: int, seqlen: int, seed: int = 0,
                     explicit_nsamples: Optional[int] = None, explicit_seqlen: Optional[int] = None,
                     text_column: str = "text", vocab_size: Optional[int] = None, packing: str = "rows",
                     kind: Optional[str] = None):
    """(ids, info) from an in-memory calibration source or a list of file rows (module doc). With
    ``packing="rows"`` and texts, ``info["lengths"]`` holds the real tokens of each row (the caller hands them to
    the pipeline as ``PruneConfig.calib_lengths`` and keeps them out of the record)."""
    if packing not in PACKINGS:
        raise CalibrationInputError(f"calibration packing {packing!r}; choose one of {', '.join(PACKINGS)}")
    kind = kind or calibration_kind(source)
    lengths = truncated = None
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
        texts = _texts(source, text_column)
        if packing == "rows":
            X, lengths, truncated = _rows(tokenizer, texts, nsamples, seqlen, seed)
        else:
            stream = tokenize(tokenizer, "\n\n".join(texts))
            X = _windows(stream, nsamples, seqlen, seed, "texts")
    if vocab_size is not None and X.numel() and (int(X.max()) >= vocab_size or int(X.min()) < 0):
        raise CalibrationInputError(f"calibration token ids outside the vocabulary [0, {vocab_size})")
    info = {"source": kind, "nsamples": int(X.shape[0]), "seqlen": int(X.shape[1]), "seed": seed,
            "tokens": int(sum(lengths)) if lengths is not None else int(X.numel()),
            "sha256": hashlib.sha256(X.numpy().tobytes()).hexdigest()[:16]}
    if lengths is not None:
        info.update(packing="rows", rows=len(lengths), shortest_row=min(lengths), longest_row=max(lengths),
                    truncated_rows=truncated, lengths=lengths)
    elif not torch.is_tensor(source) or source.dim() == 1:
        info.update(packing="windows", stream_windows=True)
    return X, info
