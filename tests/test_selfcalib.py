"""Self-generated calibration and the data-free KL / top-1 measure, on the real stories260K model."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from optprune.formulations.patterns import NM, Unstructured  # noqa: E402
from optprune.formulations.problem import GramAccumulator, LayerProblem  # noqa: E402
from optprune.llm_adapters import selfcalib  # noqa: E402
from optprune.llm_adapters.architectures import get_arch, get_module, linear_weight, set_linear_weight  # noqa: E402
from optprune.llm_adapters.divergence import DivergenceError, kl_eval  # noqa: E402
from optprune.llm_adapters.selfcalib import (SelfCalibrationError, heldout_sequences, model_fingerprint,  # noqa: E402
                                             self_calibration)
from optprune.solvers import get_method  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("OPTPRUNE_MODEL_DIR", REPO.parent / "shared" / "models"))
DATA_DIR = Path(os.environ.get("OPTPRUNE_DATA_DIR", REPO.parent / "shared" / "data"))
STORIES = MODEL_DIR / "stories260K"

pytestmark = pytest.mark.skipif(not (STORIES / "config.json").is_file(), reason=f"no stories260K in {MODEL_DIR}")


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    return model, tok


# ------------------------------------------------------------------------------------------- sampling
def test_shapes_vocab_and_start(stories):
    model, tok = stories
    ids = self_calibration(model, tok, 5, 48, seed=3, cache_dir=False, progress=False, batch_size=2)
    assert ids.shape == (5, 48) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < model.config.vocab_size
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert not (ids == tok.eos_token_id).any()  # EOS suppressed: every row is 48 tokens of running text
    gen = self_calibration(model, tok, 3, 32, seed=3, prompts="generic", cache_dir=False, progress=False)
    for i, row in enumerate(gen):
        p = [tok.bos_token_id] + tok(selfcalib.GENERIC_PROMPTS[i], add_special_tokens=False)["input_ids"]
        assert row[: len(p)].tolist() == p
    own = self_calibration(model, tok, 2, 32, prompts=["Tom and Sue"], cache_dir=False, progress=False)
    p = [tok.bos_token_id] + tok("Tom and Sue", add_special_tokens=False)["input_ids"]
    assert (own[:, : len(p)] == torch.tensor(p)).all()


def test_seeded_determinism(stories):
    model, tok = stories
    kw = dict(cache_dir=False, progress=False)
    a = self_calibration(model, tok, 6, 40, seed=0, batch_size=4, **kw)
    b = self_calibration(model, tok, 6, 40, seed=0, batch_size=4, **kw)
    assert torch.equal(a, b)
    # per-sample generators: the draw does not depend on the batching, and a prefix of samples is a prefix
    c = self_calibration(model, tok, 6, 40, seed=0, batch_size=2, **kw)
    assert torch.equal(a, c)
    d = self_calibration(model, tok, 3, 40, seed=0, batch_size=4, **kw)
    assert torch.equal(a[:3], d)
    e = self_calibration(model, tok, 6, 40, seed=1, batch_size=4, **kw)
    assert not torch.equal(a, e)
    # samples differ from one another (sampling, not greedy) ...
    assert len({tuple(r.tolist()) for r in a}) == 6
    # ... while temperature 0 is greedy: all rows equal the same continuation
    g = self_calibration(model, tok, 2, 40, temperature=0.0, **kw)
    assert torch.equal(g[0], g[1])
    greedy = model.generate(g[:1, :1], do_sample=False, max_new_tokens=39, eos_token_id=None,
                            bad_words_ids=[[tok.eos_token_id]])
    assert torch.equal(g[0], greedy[0])


def test_heldout_uses_a_distinct_seed(stories):
    model, tok = stories
    cal = self_calibration(model, tok, 3, 40, seed=5, cache_dir=False, progress=False)
    held = heldout_sequences(model, tok, 3, 40, seed=5, cache_dir=False, progress=False)
    ref = self_calibration(model, tok, 3, 40, seed=5 + selfcalib.HELDOUT_SEED_OFFSET, cache_dir=False,
                           progress=False)
    assert torch.equal(held, ref) and not torch.equal(held, cal)


def test_cache_hit_does_not_generate(stories, tmp_path, monkeypatch):
    model, tok = stories
    info1, info2 = {}, {}
    a = self_calibration(model, tok, 4, 40, seed=7, cache_dir=tmp_path, progress=False, info=info1)
    assert not info1["cache_hit"] and Path(info1["cache_path"]).is_file()

    def boom(*a, **k):
        raise AssertionError("generation ran although the sequences are cached")

    monkeypatch.setattr(selfcalib, "_generate_batch", boom)
    b = self_calibration(model, tok, 4, 40, seed=7, cache_dir=tmp_path, progress=False, info=info2)
    assert info2["cache_hit"] and torch.equal(a, b)
    # the environment variable is the default cache location
    monkeypatch.setenv("OPTPRUNE_CACHE_DIR", str(tmp_path))
    assert torch.equal(self_calibration(model, tok, 4, 40, seed=7, progress=False), a)
    # any change of setting or of the model is a miss (and would generate)
    for kw in (dict(seed=8), dict(top_p=0.9), dict(temperature=0.7), dict(prompts="generic")):
        with pytest.raises(AssertionError, match="generation ran"):
            self_calibration(model, tok, 4, 40, **{"seed": 7, **kw}, cache_dir=tmp_path, progress=False)
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        pruned.model.layers[2].mlp.down_proj.weight[0, :5] = 0.0
    assert model_fingerprint(pruned) != model_fingerprint(model)
    with pytest.raises(AssertionError, match="generation ran"):
        self_calibration(pruned, tok, 4, 40, seed=7, cache_dir=tmp_path, progress=False)


def test_bad_arguments_are_one_line_errors(stories):
    model, tok = stories
    for kw in (dict(top_p=0.0), dict(temperature=-1.0), dict(nsamples=0), dict(seqlen=4096),
               dict(prompts="wikipedia"), dict(batch_size=0)):
        args = {"nsamples": 2, "seqlen": 16, **kw}
        with pytest.raises(SelfCalibrationError):
            self_calibration(model, tok, cache_dir=False, progress=False, **args)
    assert issubclass(SelfCalibrationError, ValueError) and issubclass(DivergenceError, ValueError)


# ------------------------------------------------------------------------------------------- divergence
def test_kl_of_a_model_with_itself_is_zero(stories):
    model, tok = stories
    ids = heldout_sequences(model, tok, 4, 96, cache_dir=False, progress=False)
    r = kl_eval(model, model, ids, batch_size=3)
    assert r["kl"] == 0.0 and r["top1"] == 1.0 and r["tokens"] == 4 * 96
    assert r["nll"] == r["ref_nll"] > 0


def _reference_kl(model, ref, ids):
    """Independent full-logit computation in float64 (no chunking, F.kl_div)."""
    with torch.no_grad():
        lp = model(input_ids=ids).logits.double().log_softmax(-1)
        lq = ref(input_ids=ids).logits.double().log_softmax(-1)
    kl = torch.nn.functional.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)
    return float(kl.mean()), float((lp.argmax(-1) == lq.argmax(-1)).double().mean())


def test_kl_streaming_matches_full_computation(stories):
    model, tok = stories
    ids = heldout_sequences(model, tok, 5, 64, cache_dir=False, progress=False)
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in noisy.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.add_(0.1 * p.std() * torch.randn(p.shape, generator=g))
    kl_ref, top1_ref = _reference_kl(noisy, model, ids)
    r = kl_eval(noisy, model, ids, batch_size=2, chunk_bytes=4096)  # forces many position chunks
    assert r["kl"] > 0 and r["kl"] == pytest.approx(kl_ref, rel=1e-4)
    assert r["top1"] == pytest.approx(top1_ref, abs=1e-12)
    assert kl_eval(noisy, model, ids, batch_size=5)["kl"] == pytest.approx(r["kl"], rel=1e-5)
    with pytest.raises(DivergenceError):
        kl_eval(noisy, model, torch.full((1, 4), 10_000), batch_size=1)


def _sublayers(model):
    arch = get_arch(model)
    blocks = get_module(model, arch.blocks)
    for i, blk in enumerate(blocks):
        for name in arch.sublayer_names():
            yield f"{i}.{name}", get_module(blk, name), name in arch.transposed


def _dense_input_stats(model, ids, gram: bool):
    """Per-sub-layer input statistics of the dense model (dense-input mode): H or ‖X_j‖²."""
    accs, hooks = {}, []
    for key, mod, tr in _sublayers(model):
        n = linear_weight(mod, tr).shape[1]
        accs[key] = GramAccumulator(n)

        def hook(m, args, key=key):
            x = args[0].detach().float()
            if gram:
                accs[key].add(x)
            else:
                accs[key].sq_norm += (x.reshape(-1, x.shape[-1]) ** 2).sum(0)
                accs[key].nsamples += x.numel() // x.shape[-1]
        hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in range(0, ids.shape[0], 8):
            model(input_ids=ids[b:b + 8], use_cache=False)
    for h in hooks:
        h.remove()
    return accs


def prune_copy(model, method, pattern, calib=None):
    """Apply a registered layer method to every linear sub-layer (dense inputs, no pipeline)."""
    spec = get_method(method)
    stats = _dense_input_stats(model, calib, gram=spec.needs == "gram") if spec.needs != "none" else None
    out = copy.deepcopy(model)
    for (key, mod, tr), (_, src, _) in zip(_sublayers(out), _sublayers(model)):
        W0 = linear_weight(src, tr).float().clone()
        n = W0.shape[1]
        if stats is None:
            prob = LayerProblem(W0=W0, H=torch.eye(n), name=key)
        elif spec.needs == "diag":
            sq = stats[key].sq_norm
            prob = LayerProblem(W0=W0, H=torch.diag(sq), name=key, input_sq_norm=sq)
        else:
            prob = stats[key].problem(W0, name=key)
        res = spec(prob, pattern)
        set_linear_weight(mod, res.W, tr)
    return out


def _sparsity(model):
    z = t = 0
    for _, mod, tr in _sublayers(model):
        W = linear_weight(mod, tr)
        z += int((W == 0).sum())
        t += W.numel()
    return z / t


def test_kl_grows_with_magnitude_sparsity(stories):
    model, tok = stories
    ids = heldout_sequences(model, tok, 6, 128, cache_dir=False, progress=False)
    res = {}
    for s in (0.3, 0.5, 0.7):
        pruned = prune_copy(model, "magnitude", Unstructured(s))
        assert _sparsity(pruned) == pytest.approx(s, abs=0.01)
        res[s] = kl_eval(pruned, model, ids, batch_size=3)
    assert 0 < res[0.3]["kl"] < res[0.5]["kl"] < res[0.7]["kl"]
    assert res[0.3]["top1"] > res[0.7]["top1"]


def _wikitext_windows(tok, seqlen: int, windows: int):
    """The smoke protocol's evaluation windows (WikiText-2 test, first ``windows`` × ``seqlen``)."""
    from optprune.llm_adapters import data as D
    try:
        ids = D.eval_tokens(tok, "wikitext2", seqlen=seqlen, data_dir=DATA_DIR)
    except FileNotFoundError:
        return None
    n = min(windows, ids.numel() // seqlen)
    return ids[: n * seqlen].view(n, seqlen)


def _prune_variant(model, method, pattern: str, sparsity: float, calib):
    """The sequential pipeline when it is there, else the layer method on dense inputs."""
    try:
        from optprune.llm_adapters.pipeline import PruneConfig, prune_model
    except ImportError:
        from optprune.formulations.patterns import parse_pattern
        return prune_copy(model, method, parse_pattern(pattern, sparsity), calib)
    out = copy.deepcopy(model)
    prune_model(out, calib, PruneConfig(method=method, sparsity=sparsity, pattern=pattern, device="cpu"),
                progress=False)
    return out


_QUICK = [("magnitude", "unstructured", 0.3), ("magnitude", "unstructured", 0.5), ("magnitude", "unstructured", 0.7),
          ("wanda", "unstructured", 0.5), ("sparsegpt", "unstructured", 0.5)]
_FULL = [("magnitude", "unstructured", 0.3), ("magnitude", "unstructured", 0.5),
         ("magnitude", "2:4", 0.5), ("magnitude", "unstructured", 0.7),
         ("wanda", "unstructured", 0.5), ("wanda", "2:4", 0.5), ("wanda", "unstructured", 0.7),
         ("sparsegpt", "unstructured", 0.5), ("sparsegpt", "2:4", 0.5), ("sparsegpt", "unstructured", 0.7)]


@pytest.mark.parametrize("variants", [pytest.param(_QUICK, id="quick"),
                                      pytest.param(_FULL, id="full", marks=pytest.mark.slow)])
def test_kl_ranks_pruned_variants_like_perplexity(stories, variants):
    """Spearman correlation of KL (held-out self-generated text) vs WikiText-2 perplexity over pruned variants,
    calibrated on self-generated sequences. Printed; only the monotonicity that must hold is asserted.
    ``-m slow -k full -s`` prints the 10-variant KL-vs-perplexity table."""
    scipy_stats = pytest.importorskip("scipy.stats")
    model, tok = stories
    text = _wikitext_windows(tok, 512, 4)
    if text is None:
        pytest.skip(f"no WikiText-2 under {DATA_DIR}")
    calib = self_calibration(model, tok, 16, 128, seed=0, cache_dir=False, progress=False)
    held = heldout_sequences(model, tok, 8, 128, seed=0, cache_dir=False, progress=False)
    rows = []
    for method, pat, sp in variants:
        pruned = _prune_variant(model, method, pat, sp, calib)
        d = kl_eval(pruned, model, held, batch_size=8)
        t = kl_eval(pruned, model, text, batch_size=4)
        rows.append((f"{method} {pat} {sp}", d["kl"], d["top1"], float(torch.tensor(t["nll"]).exp()), t["kl"]))
    dense_ppl = float(torch.tensor(t["ref_nll"]).exp())
    kls, ppls, text_kls = [r[1] for r in rows], [r[3] for r in rows], [r[4] for r in rows]
    rho = scipy_stats.spearmanr(kls, ppls).statistic
    rho_text = scipy_stats.spearmanr(text_kls, ppls).statistic
    print(f"\nstories260K, self-calibrated 16x128; dense WikiText-2 ppl (first 4x512) {dense_ppl:.2f}")
    print(f"{'variant':28s} {'KL(self)':>9s} {'top1':>6s} {'ppl':>8s} {'KL(wiki)':>9s}")
    for r in rows:
        print(f"{r[0]:28s} {r[1]:9.4f} {r[2]:6.3f} {r[3]:8.2f} {r[4]:9.4f}")
    print(f"Spearman(KL on held-out self-generated, WikiText-2 ppl) = {rho:.3f}; "
          f"Spearman(KL on WikiText-2, ppl) = {rho_text:.3f}  ({len(rows)} variants)")
    mag = [r[1] for r in rows if r[0].startswith("magnitude unstructured")]
    assert mag == sorted(mag) and len(mag) == 3  # KL monotone in sparsity for magnitude
    assert all(k > 0 for k in kls) and all(0 < a < 1 for a in (r[2] for r in rows))
    assert -1.0 <= rho <= 1.0


# ------------------------------------------------------------------------------------------- integration
def test_cli_without_data_falls_back_to_self_calibration_and_reports_kl(tmp_path, monkeypatch, capsys):
    """no data directory → `--calibration self` (announced in one line), no perplexity, KL/top-1
    against the dense model on held-out self-generated text; `eval --reference` reproduces it from disk."""
    pytest.importorskip("optprune.llm_adapters.run")
    from optprune.cli import main
    monkeypatch.setenv("OPTPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    nodata, out = tmp_path / "nodata", tmp_path / "pruned"
    nodata.mkdir()  # a data folder without any text (a folder that does not exist is an error)
    common = ["--data-dir", str(nodata), "--model-dir", str(MODEL_DIR)]
    rc = main(["prune", "--model", "stories260k", "--method", "wanda", "--sparsity", "0.5", "--nsamples", "8",
               "--seqlen", "64", "--output", str(out), *common])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    notes = [ln for ln in cap.err.splitlines() if ln.startswith("[optprune]")]
    assert len([n for n in notes if "--calibration self" in n]) == 1
    import json
    rec = json.loads((out / "run.json").read_text())
    assert rec["calibration"]["source"] == "self" and rec["protocol"]["calibration"] == "self"
    assert rec["calibration"]["nsamples"] == 8 and rec["calibration"]["seqlen"] == 64
    assert not rec.get("perplexity") and rec["protocol"]["eval_datasets"] == []
    dv = rec["divergence_self"]
    assert dv["kl"] > 0 and 0 < dv["top1"] < 1 and dv["seed"] == 1000 and dv["tokens"] >= 4096
    assert "KL" in cap.out and "held-out self-generated" in cap.out
    # the saved model against the dense reference, still without data: the same held-out set, the same KL
    rc = main(["eval", "--model", str(out), "--reference", "stories260k", "--output", str(tmp_path / "e.json"),
               *common])
    assert rc == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["divergence_self"]["generation"]["cache_hit"]
    assert ev["divergence_self"]["kl"] == pytest.approx(dv["kl"], rel=1e-6)
    assert ev["divergence_self"]["top1"] == pytest.approx(dv["top1"], abs=1e-9)
    # nothing to evaluate at all is a one-line error
    rc = main(["eval", "--model", str(out), *common])
    assert rc == 2 and "nothing to evaluate" in capsys.readouterr().err
