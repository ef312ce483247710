"""Shared test setup: the model and data folders the tests use, and one torch thread.

Nothing beside the checkout is needed. ``$OPTPRUNE_MODEL_DIR`` / ``$OPTPRUNE_DATA_DIR`` are used when they hold
the real stories260K weights / the real texts; otherwise the tests run on

* a tiny LLaMA model saved as ``<models>/stories260K`` (same shapes as stories260K: 5 blocks, width 64, 8 heads,
  4 KV heads, MLP 172, vocabulary 512): a byte-level BPE tokenizer trained on ``tests/data`` and a model
  trained on the same text for a few hundred steps, so that it is far from random (pruning methods rank as on a
  real model). Built once and cached in pytest's cache folder (``.pytest_cache``) under a hash of this file and
  the text, or in a temporary folder when the cache is disabled;
* ``tests/data``: a few KB of our own prose laid out as the data folder (WikiText-2 raw, PTB, TinyStories
  files), plus a C4-layout parquet file made from the same prose.

Both folders are exported as ``$OPTPRUNE_MODEL_DIR`` / ``$OPTPRUNE_DATA_DIR`` for the test modules and the
CLI subprocesses they start.

The CI and developer machines have 2 cores; two BLAS threads on the tiny matrices of these tests are an
order of magnitude slower than one when anything else runs, so every test runs single-threaded.
"""
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
#: the folders the tests use (set in pytest_configure)
MODEL_DIR: Path = None
DATA_DIR: Path = None
STORIES: Path = None
#: True when the real stories260K weights are used (tests that need its exact numbers check this)
REAL_STORIES = False
TINY_ROOT: Path = None

_TEXT_FILES = ("wikitext-2-raw/wiki.test.raw", "wikitext-2-raw/wiki.valid.raw", "ptb/ptb.test.txt",
               "ptb/ptb.valid.txt", "tinystories/tinystories_sample.txt")
#: the C4 layout: the first 1100 documents are the evaluation split, the rest the calibration split
_C4_EVAL_DOCS = 1100


def _real(env: str, probe: str):
    d = os.environ.get(env)
    return Path(d).expanduser() if d and (Path(d).expanduser() / probe).exists() else None


def _paragraphs() -> list:
    """Paragraphs of the test prose (WikiText paragraphs and the stories), whitespace-normalised."""
    out = []
    for f in ("wikitext-2-raw/wiki.test.raw", "wikitext-2-raw/wiki.valid.raw"):
        for line in (TEST_DATA / f).read_text(encoding="utf-8").splitlines():
            t = " ".join(line.split())
            if t and not t.startswith("="):
                out.append(t.replace(" ,", ",").replace(" .", ".").replace(" 's", "'s"))
    story = (TEST_DATA / "tinystories" / "tinystories_sample.txt").read_text(encoding="utf-8")
    out += [" ".join(s.split()) for s in story.split("<|endoftext|>") if s.strip()]
    return out


def _write_c4(path: Path) -> None:
    """C4 layout from the test prose: 2000 documents like the real sample, the first 1100 for evaluation (one
    paragraph each, cycled), 900 for calibration of 3–6 paragraphs (long enough for 256-token windows)."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    paras = _paragraphs()
    rng = random.Random(0)
    docs = [paras[i % len(paras)] for i in range(_C4_EVAL_DOCS)]
    docs += ["\n\n".join(rng.sample(paras, rng.randint(3, 6))) for _ in range(2000 - _C4_EVAL_DOCS)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": docs}), path)


def _build_data(dest: Path) -> None:
    for f in _TEXT_FILES:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TEST_DATA / f, dest / f)
    _write_c4(dest / "c4" / "c4_validation_2k.parquet")


def _build_tokenizer(dest: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_paragraphs() + [(TEST_DATA / f).read_text(encoding="utf-8") for f in _TEXT_FILES],
                           trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(dest)
    return tok


def _build_model(dest: Path, steps: int = 300) -> None:
    """A stories260K-shaped LLaMA trained briefly on the test prose (next-token loss, AdamW)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _build_tokenizer(dest)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=8, max_position_embeddings=512,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=None, hidden_act="silu")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        ids = torch.cat([tok(p, return_tensors="pt")["input_ids"][0] for p in _paragraphs()])
        L, B = 128, 16
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, ids.numel() - L - 1, (B,), generator=g)
            x = torch.stack([ids[s:s + L] for s in starts.tolist()])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(dest)
        finally:
            hf_logging.enable_progress_bar()
    finally:
        torch.set_num_threads(n)


def _fingerprint() -> str:
    import inspect   # the builders' code, not the whole file: adding a fixture here does not rebuild
    h = hashlib.sha256("".join(inspect.getsource(f) for f in (_paragraphs, _write_c4, _build_data,
                                                             _build_tokenizer, _build_model)).encode())
    for f in _TEXT_FILES:
        h.update((TEST_DATA / f).read_bytes())
    import tokenizers
    import transformers
    h.update(f"{torch.__version__}|{transformers.__version__}|{tokenizers.__version__}".encode())
    return h.hexdigest()[:16]


def _cached(root: Path, name: str, build) -> Path:
    """``root/name`` built once by ``build(tmpdir)`` and moved into place atomically (parallel runs are fine)."""
    final = root / name
    if (final / ".complete").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            os.replace(tmp, final)
        except OSError:  # another run finished first
            if not (final / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _tiny_root(config) -> Path:
    cache = getattr(config, "cache", None)
    return cache.mkdir("optprune-tiny") if cache is not None else \
        Path(tempfile.gettempdir()) / f"optprune-tests-{os.getuid() if hasattr(os, 'getuid') else 0}"


def tiny_stories() -> Path:
    """The tiny trained stories260K-shaped model (byte-level BPE tokenizer) even when the real stories260K is
    used: for the checks that need a tokenizer kind the real one (SentencePiece-style BPE) does not have."""
    if not REAL_STORIES:
        return STORIES
    return _cached(TINY_ROOT, f"models-{_fingerprint()}", lambda d: _build_model(d / "stories260K")) / "stories260K"


def pytest_configure(config):
    global MODEL_DIR, DATA_DIR, STORIES, REAL_STORIES, TINY_ROOT
    TINY_ROOT = _tiny_root(config)
    real_models = _real("OPTPRUNE_MODEL_DIR", "stories260K/config.json")
    real_data = _real("OPTPRUNE_DATA_DIR", "wikitext-2-raw/wiki.test.raw")
    if real_models is None or real_data is None:
        root = TINY_ROOT
        key = _fingerprint()
        if real_data is None:
            real_data = _cached(root, f"data-{key}", _build_data)
        if real_models is None:
            real_models = _cached(root, f"models-{key}", lambda d: _build_model(d / "stories260K"))
        else:
            REAL_STORIES = True
    else:
        REAL_STORIES = True
    MODEL_DIR, DATA_DIR = real_models, real_data
    STORIES = MODEL_DIR / "stories260K"
    os.environ["OPTPRUNE_MODEL_DIR"] = str(MODEL_DIR)
    os.environ["OPTPRUNE_DATA_DIR"] = str(DATA_DIR)


def pytest_report_header(config):
    kind = "real stories260K" if REAL_STORIES else "tiny model built by the tests"
    return f"optprune test models: {MODEL_DIR} ({kind}); data: {DATA_DIR}"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def stories_dir() -> Path:
    """The stories260K folder: the real one from ``$OPTPRUNE_MODEL_DIR`` when present, else the tiny trained
    model of the same shapes."""
    return STORIES


@pytest.fixture
def data_dir() -> Path:
    """The data folder: the real one from ``$OPTPRUNE_DATA_DIR`` when present, else the test prose."""
    return DATA_DIR


@pytest.fixture
def real_stories() -> Path:
    """For the few checks of numbers that only the real stories260K has: skips on the tiny model."""
    if not REAL_STORIES:
        pytest.skip("needs the real stories260K weights (set OPTPRUNE_MODEL_DIR to a folder holding stories260K)")
    return STORIES
