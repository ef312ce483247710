"""Calibration and evaluation text: where it lives, how it is read, how it is sampled.

Data directory (first that is set): the ``data_dir`` argument (``--data-dir``) > ``$OPTPRUNE_DATA_DIR`` >
a development fallback beside the checkout (need not exist). Its layout (docs/protocols.md)::

    wikitext-2-raw/wiki.test.raw  wiki.valid.raw      WikiText-2 (raw) test / validation
    ptb/ptb.test.txt  ptb.valid.txt                   Penn Treebank (Mikolov split)
    c4/c4_validation_2k.parquet                       2000 documents of C4-en validation
    tinystories/tinystories_sample.txt                a few TinyStories stories

Reading follows the published perplexity code (SparseGPT / Wanda ``datautils``):

* WikiText-2: rebuild the Hugging Face rows (``row if row.strip() else ""`` per line), join with ``"\\n\\n"``,
  tokenize once.
* PTB: join the stripped lines with ``" "``.
* C4: evaluation = the first :data:`C4_EVAL_DOCS` (1100) documents joined with ``" "``, cut to
  ``256 × seqlen`` tokens (the published C4 evaluation); calibration = the remaining documents, so that the
  calibration and evaluation texts never overlap (the published code calibrates on C4 *train*, which is not
  available offline).
* TinyStories sample and any local text file: the whole file as it is, one document (this reproduces the
  published stories260K value 6.36 on the sample; the ``<|endoftext|>`` separators stay in the text).

Calibration sampling (docs/protocols.md, the published convention): with ``random.Random(seed)``, draw a random
document whose tokenization is longer than the window, take one random window from it; repeat ``nsamples``
times. WikiText-2 / PTB / text files are one document each (the published loaders sample windows from the
concatenated split). Same seed ⇒ same tokens.

Online users can ask for the Hugging Face hub copy explicitly: ``hub:wikitext2``, ``hub:ptb``, ``hub:c4`` or
``hub:<dataset id>[:<config>]`` (the ``datasets`` package is imported only then).
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

__all__ = ["DataError", "DataNotFoundError", "Protocol", "PROTOCOLS", "get_protocol", "resolve_data_dir",
           "dataset_path", "read_text", "read_documents", "calibration_tokens", "eval_tokens", "tokenize",
           "DATASETS", "C4_EVAL_DOCS", "known_dataset", "check_dataset"]

#: the published C4 evaluation joins the first 1100 validation documents; calibration uses the others
C4_EVAL_DOCS = 1100



def optprune_home() -> Path:
    """optprune's own folder: ``$OPTPRUNE_CACHE_DIR``, else ``~/.cache/optprune`` (self-generated calibration
    cache; default ``data/`` and ``models/`` folders)."""
    d = os.environ.get("OPTPRUNE_CACHE_DIR")
    return Path(d).expanduser() if d else Path.home() / ".cache" / "optprune"

#: short name -> split -> path relative to the data directory
DATASETS = {
    "wikitext2": {"test": "wikitext-2-raw/wiki.test.raw", "validation": "wikitext-2-raw/wiki.valid.raw"},
    "ptb": {"test": "ptb/ptb.test.txt", "validation": "ptb/ptb.valid.txt"},
    "c4": {"test": "c4/c4_validation_2k.parquet", "validation": "c4/c4_validation_2k.parquet"},
    "tinystories": {"test": "tinystories/tinystories_sample.txt",
                    "validation": "tinystories/tinystories_sample.txt"},
}
_ALIASES = {"wikitext": "wikitext2", "wikitext-2": "wikitext2", "wikitext2": "wikitext2", "wiki": "wikitext2",
            "ptb": "ptb", "penn": "ptb", "c4": "c4", "tinystories": "tinystories", "stories": "tinystories"}

# the Hugging Face hub copies used by the published code
_HUB = {
    "wikitext2": dict(path="wikitext", name="wikitext-2-raw-v1", field="text",
                      splits={"test": "test", "validation": "validation"}),
    "ptb": dict(path="ptb_text_only", name="penn_treebank", field="sentence",
                splits={"test": "test", "validation": "validation"}),
    "c4": dict(path="allenai/c4", name=None, field="text", splits={"test": "validation", "validation": "validation"},
               data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}),
}


class DataError(ValueError):
    """A malformed data request (unknown dataset name, impossible window...)."""


class DataNotFoundError(FileNotFoundError):
    """A data file is missing; the message names the full path looked for and how to point elsewhere."""


# ---------------------------------------------------------------------------------------------- protocols
@dataclass(frozen=True)
class Protocol:
    """A measurement protocol of docs/protocols.md: model, calibration and evaluation settings."""

    name: str
    model: str
    calibration: str            # source name: wikitext2 (validation split), c4 (sample), ptb (validation)...
    nsamples: int
    seqlen: int                 # calibration window
    seed: int
    eval_datasets: tuple        # evaluation texts (test splits)
    eval_seqlen: int
    eval_windows: Optional[int]  # first K windows; None = all
    description: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eval_datasets"] = list(self.eval_datasets)
        return d


PROTOCOLS = {
    "smoke": Protocol("smoke", "stories260k", "wikitext2", 32, 128, 0, ("wikitext2",), 512, 64,
                      "unit/integration tests, CI (seconds)"),
    "cpu": Protocol("cpu", "smollm2-135m", "c4", 128, 512, 0, ("wikitext2",), 2048, 40,
                    "benchmarks on a 2-core CPU (minutes)"),
    "paper": Protocol("paper", "smollm2-135m", "c4", 128, 2048, 0, ("wikitext2", "ptb", "c4"), 2048, None,
                      "on a GPU; the published papers' setting"),
}


def get_protocol(name: Union[str, Protocol, None]) -> Optional[Protocol]:
    if name is None or isinstance(name, Protocol):
        return name
    key = str(name).strip().lower()
    if key not in PROTOCOLS:
        raise DataError(f"unknown protocol {name!r}; available: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[key]


# ---------------------------------------------------------------------------------------------- locations
def resolve_data_dir(data_dir: Union[str, os.PathLike, None] = None) -> Path:
    """``data_dir`` argument > ``$OPTPRUNE_DATA_DIR`` > ``optprune_home()/data`` (which need not exist)."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("OPTPRUNE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return optprune_home() / "data"


def _where_from(data_dir) -> str:
    if data_dir:
        return "from --data-dir / data_dir="
    if os.environ.get("OPTPRUNE_DATA_DIR"):
        return "from $OPTPRUNE_DATA_DIR"
    return "the default folder (neither --data-dir nor $OPTPRUNE_DATA_DIR set)"


def known_dataset(name: str) -> Optional[str]:
    """The canonical short name of a built-in dataset, or None."""
    return _ALIASES.get(str(name).strip().lower())


def dataset_path(name: str, split: str = "test", data_dir=None, *, must_exist: bool = True) -> Path:
    """Full path of a built-in dataset's split file; a missing file raises :class:`DataNotFoundError`."""
    key = known_dataset(name)
    if key is None:
        raise DataError(f"unknown dataset {name!r}; built-in: {', '.join(DATASETS)} (or a path to a text file)")
    if split not in DATASETS[key]:
        raise DataError(f"dataset {key!r} has no {split!r} split offline; available: {', '.join(DATASETS[key])}")
    root = resolve_data_dir(data_dir)
    path = (root / DATASETS[key][split]).resolve() if root.exists() else root / DATASETS[key][split]
    if must_exist and not path.is_file():
        raise DataNotFoundError(
            f"{key} {split} data not found: looked for {path} (data dir {root}, {_where_from(data_dir)}); "
            f"set --data-dir DIR or OPTPRUNE_DATA_DIR=DIR to a folder laid out as docs/protocols.md describes, "
            f"or use 'hub:{key}' to download it with the datasets package")
    return path


def check_dataset(name: str, split: str = "test", data_dir=None) -> str:
    """Validate a dataset request before any model is loaded (for 'bad input changes nothing'): the file exists
    and can be read — UTF-8 text, or for C4 a Parquet file with a ``text`` column; returns a label."""
    if isinstance(name, str) and name.startswith("hub:"):
        return name
    if known_dataset(name):
        path = dataset_path(name, split, data_dir)
        _check_readable(path)
        return str(path)
    p = Path(name).expanduser()
    if p.is_file():
        _check_readable(p)
        return str(p.resolve())
    raise DataNotFoundError(
        f"unknown dataset {name!r}: not a built-in name ({', '.join(DATASETS)}), 'hub:NAME', or an existing "
        f"text file (looked for {p.resolve()})")


_CHECKED: dict = {}  # (path, size, mtime) of files found readable in this process


def _check_readable(path: Path) -> None:
    """A data file that would fail to read after pruning fails now: one line naming it and the fix."""
    try:
        st = path.stat()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _CHECKED:
        return
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
            names = pq.ParquetFile(path).schema_arrow.names
        except ImportError:  # pragma: no cover - reported where it is read
            return
        except Exception as e:  # noqa: BLE001 - pyarrow's ArrowInvalid / OSError on a damaged file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise DataError(f"{path}: not a readable Parquet file ({first}); restore it (docs/protocols.md gives "
                            f"the layout: a 'text' column of documents)") from None
        if "text" not in names:
            raise DataError(f"{path}: no 'text' column (columns: {', '.join(names[:6])}); the C4 sample holds its "
                            f"documents in a 'text' column (docs/protocols.md)")
    else:
        from .model_files import read_utf8
        read_utf8(path, DataError)
    _CHECKED[key] = True


# ---------------------------------------------------------------------------------------------- readers
def _read_wikitext(path: Path) -> str:
    with open(path, encoding="utf-8") as f:
        rows = [row if row.strip() else "" for row in f]
    return "\n\n".join(rows)


def _read_ptb(path: Path) -> str:
    with open(path, encoding="utf-8") as f:
        return " ".join(line.strip() for line in f)


def _read_c4_docs(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is in the llm extra
        raise ImportError("reading the C4 sample needs pyarrow: pip install pyarrow") from e
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def _hub_documents(spec: str, split: str) -> list:
    """``hub:NAME`` — the published Hugging Face copies (needs network and the ``datasets`` package)."""
    try:
        import datasets  # noqa: F401  (lazy: online users only)
        from datasets import load_dataset
    except ImportError as e:
        raise ImportError(f"{spec!r} needs the datasets package (pip install datasets) and network access; "
                          f"offline, use the data directory (--data-dir)") from e
    key = spec[4:]
    canon = known_dataset(key)
    if canon in _HUB:
        h = _HUB[canon]
        kw = {"data_files": h["data_files"]} if h.get("data_files") else {}
        hsplit = h["splits"][split]
        ds = load_dataset(h["path"], h["name"], split=hsplit, **kw) if h["name"] else \
            load_dataset(h["path"], split=hsplit, **kw)
        rows = list(ds[h["field"]])
        if canon == "wikitext2":
            return ["\n\n".join(rows)]
        if canon == "ptb":
            return [" ".join(rows)]
        return rows
    path, _, cfg = key.partition(":")
    ds = load_dataset(path, cfg or None, split=split)
    field = "text" if "text" in ds.column_names else ds.column_names[0]
    return list(ds[field])


def read_documents(name: str, split: str = "test", data_dir=None) -> list:
    """The documents of a dataset split as strings (WikiText-2 / PTB / text files: one document)."""
    if isinstance(name, str) and name.startswith("hub:"):
        return _hub_documents(name, split)
    key = known_dataset(name)
    if key is None:
        p = Path(name).expanduser()
        if not p.is_file():
            check_dataset(name, split, data_dir)  # raises with the path
        return [p.read_text(encoding="utf-8")]
    path = dataset_path(key, split, data_dir)
    if key == "wikitext2":
        return [_read_wikitext(path)]
    if key == "ptb":
        return [_read_ptb(path)]
    if key == "tinystories":
        return [path.read_text(encoding="utf-8")]
    docs = _read_c4_docs(path)
    if split == "test":
        return docs[:C4_EVAL_DOCS]
    return docs[C4_EVAL_DOCS:]


def read_text(name: str, split: str = "test", data_dir=None) -> str:
    """One evaluation text, joined the published way (C4: documents joined with ``" "``)."""
    docs = read_documents(name, split, data_dir)
    return " ".join(docs) if len(docs) > 1 else docs[0]


# ---------------------------------------------------------------------------------------------- tokens
_TOKEN_CACHE: dict = {}


def _tok_key(tokenizer) -> tuple:
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
            getattr(tokenizer, "vocab_size", None))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once (tokenizer defaults: BOS where the tokenizer adds one) → LongTensor (N,)."""
    enc = tokenizer(text, return_tensors="pt", verbose=False)
    return enc["input_ids"][0].to(torch.long)


def _source_key(name, split, data_dir):
    if isinstance(name, str) and name.startswith("hub:"):
        return (name, split)
    key = known_dataset(name)
    p = dataset_path(key, split, data_dir) if key else Path(name).expanduser().resolve()
    st = p.stat()
    return (str(p), split, st.st_size, st.st_mtime_ns)


def _doc_cache(tokenizer, name, split, data_dir) -> dict:
    """Per (tokenizer, source file): document index -> token ids, shared by calibration and evaluation."""
    return _TOKEN_CACHE.setdefault(("docs", _tok_key(tokenizer), _source_key(name, split, data_dir)), {})


def eval_tokens(tokenizer, name: str = "wikitext2", *, seqlen: Optional[int] = None, data_dir=None,
                split: str = "test") -> torch.Tensor:
    """The evaluation token stream of a text, LongTensor (N,). C4 is cut to ``256 × seqlen`` tokens as in the
    published evaluation (when ``seqlen`` is given). Cached per (tokenizer, file)."""
    cache = _doc_cache(tokenizer, name, split, data_dir)
    ids = cache.get("joined")
    if ids is None:
        docs = read_documents(name, split, data_dir)
        if len(docs) == 1:  # the same single document calibration would tokenize
            ids = cache.get(0)
            if ids is None:
                ids = cache[0] = tokenize(tokenizer, docs[0])
        else:
            ids = tokenize(tokenizer, " ".join(docs))
        cache["joined"] = ids
    if known_dataset(name) == "c4" and seqlen:
        ids = ids[: 256 * seqlen]
    return ids


def calibration_tokens(tokenizer, name: str = "c4", *, nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                       data_dir=None, split: str = "validation", return_info: bool = False):
    """``nsamples`` random windows of ``seqlen`` tokens, LongTensor (nsamples, seqlen) — the published
    convention: a random document whose tokenization is longer than ``seqlen``, one random window from it.
    Deterministic in ``seed`` (its own ``random.Random``; global RNG untouched)."""
    nsamples, seqlen = int(nsamples), int(seqlen)
    if nsamples < 1 or seqlen < 2:
        raise DataError(f"calibration needs nsamples ≥ 1 and seqlen ≥ 2, got {nsamples} × {seqlen}")
    docs = read_documents(name, split, data_dir)
    cache = _doc_cache(tokenizer, name, split, data_dir)
    # tokenizing only the drawn documents keeps C4 cheap; cache them
    def enc(i):
        t = cache.get(i)
        if t is None:
            t = tokenize(tokenizer, docs[i])
            cache[i] = t
        return t

    rng = random.Random(seed)
    if len(docs) == 1:
        long_enough = [0] if enc(0).numel() > seqlen else []
    else:
        long_enough = None  # decided lazily (published loop); guard against an endless search below
    out, used = [], []
    tries = 0
    for _ in range(nsamples):
        while True:
            i = rng.randint(0, len(docs) - 1)
            ids = enc(i)
            if ids.numel() > seqlen:
                break
            tries += 1
            if long_enough == [] or (tries > 20 * len(docs) + 1000 and long_enough is None):
                if long_enough is None:
                    long_enough = [j for j in range(len(docs)) if enc(j).numel() > seqlen]
                if not long_enough:
                    raise DataError(f"no document of {name!r} ({split}) is longer than {seqlen} tokens; "
                                    f"use a shorter --seqlen or another --calibration source")
        j = rng.randint(0, ids.numel() - seqlen - 1)
        out.append(ids[j:j + seqlen])
        used.append(i)
    X = torch.stack(out).to(torch.long)
    if not return_info:
        return X
    info = {"source": name, "split": split, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
            "documents": len(docs), "distinct_documents_used": len(set(used)), "documents_used": used,
            "sha256": hashlib.sha256(X.numpy().tobytes()).hexdigest()[:16]}
    if not (isinstance(name, str) and name.startswith("hub:")):
        info["path"] = str(dataset_path(name, split, data_dir)) if known_dataset(name) else \
            str(Path(name).expanduser().resolve())
    return X, info
