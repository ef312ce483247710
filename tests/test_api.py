"""The Python API (optprune/api.py): real signatures, an in-memory model, every calibration form, targets/ignore,
and ``save`` as a separate call."""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import pydoc
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import optprune  # noqa: E402
from optprune.llm_adapters.calib_inputs import CalibrationInputError, calibration_from  # noqa: E402

TEXTS = [" ".join(random.Random(i).choice("the cat sat on a mat and the dog ran in the park with a ball".split())
                  for _ in range(60)) for i in range(12)]
PRUNABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")


def test_signatures_and_help_show_the_parameters():
    sig = inspect.signature(optprune.prune)
    p = sig.parameters
    assert list(p)[:2] == ["model", "tokenizer"]
    for name in ("method", "sparsity", "pattern", "dataset", "nsamples", "seqlen", "targets", "ignore"):
        assert p[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert p["method"].default is inspect.Parameter.empty and p["sparsity"].default is None and "default 0.5" in optprune.prune.__doc__
    assert not any(x.kind is inspect.Parameter.VAR_KEYWORD for x in p.values())
    doc = pydoc.render_doc(optprune.prune)
    for word in ("dataset", "datasets.Dataset", "LongTensor", "targets", "ignore", "Returns"):
        assert word in doc
    for fn, must in ((optprune.save, ("format", "dtype")), (optprune.evaluate, ("tasks", "include_path")),
                     (optprune.verify, ("quick", "gurobi")), (optprune.analyze, ("sparsity", "allocation"))):
        params = inspect.signature(fn).parameters
        assert not any(x.kind is inspect.Parameter.VAR_KEYWORD for x in params.values()), fn.__name__
        assert all(m in params for m in must) and fn.__doc__, fn.__name__


@pytest.fixture(scope="module")
def loaded():
    from conftest import STORIES
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found at {STORIES}")
    from optprune.llm_adapters.loading import load_model
    model, tok, _ = load_model(str(STORIES))
    return model, tok


def _prune(loaded, dataset, **kw):
    model, tok = loaded
    m = copy.deepcopy(model)
    out, rec = optprune.prune(m, tok, method="wanda", sparsity=0.5, dataset=dataset, progress=False,
                              **{"nsamples": 4, "seqlen": 32, **kw})
    assert out is m  # pruned in place, in memory: not turned into a string and reloaded
    return out, rec


def _mask(model) -> dict:
    return {n: (p != 0) for n, p in model.named_parameters() if any(k in n for k in PRUNABLE)}


def test_list_of_strings_and_datasets_dataset_calibrate_identically(loaded):
    datasets = pytest.importorskip("datasets")
    m1, r1 = _prune(loaded, TEXTS)
    ds = datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))})
    m2, r2 = _prune(loaded, ds)
    assert r1["calibration"]["source"] == "list of strings" and r2["calibration"]["source"] == "datasets.Dataset"
    assert r1["calibration"]["sha256"] == r2["calibration"]["sha256"]
    assert (r1["calibration"]["nsamples"], r1["calibration"]["seqlen"]) == (4, 32)
    assert r1["protocol"]["calibration"] == "list of strings" and r1["config"]["model"].endswith("stories260K")
    k1, k2 = _mask(m1), _mask(m2)
    assert len(k1) == 35 and all(torch.equal(k1[n], k2[n]) for n in k1)
    assert r1["summary"]["sparsity"] == pytest.approx(0.5)
    # another column name, and a missing one
    ds2 = datasets.Dataset.from_dict({"body": TEXTS})
    _, r3 = _prune(loaded, ds2, text_column="body")
    assert r3["calibration"]["sha256"] == r1["calibration"]["sha256"]
    with pytest.raises(CalibrationInputError, match="no 'text' column.*body"):
        _prune(loaded, ds2)


def test_token_ids_are_used_as_given(loaded):
    ids = torch.randint(0, 512, (6, 40), generator=torch.Generator().manual_seed(3))
    _, rec = _prune(loaded, ids, nsamples=None, seqlen=None)
    assert (rec["calibration"]["nsamples"], rec["calibration"]["seqlen"]) == (6, 40)
    assert rec["calibration"]["sha256"] == hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    _, rec = _prune(loaded, ids, nsamples=2, seqlen=16)
    assert rec["calibration"]["sha256"] == hashlib.sha256(ids[:2, :16].contiguous().numpy().tobytes()).hexdigest()[:16]
    with pytest.raises(CalibrationInputError, match="6 × 40"):
        _prune(loaded, ids, nsamples=7, seqlen=16)
    stream = ids.reshape(-1)
    _, rec = _prune(loaded, stream, nsamples=3, seqlen=20)
    assert (rec["calibration"]["nsamples"], rec["calibration"]["seqlen"]) == (3, 20)
    with pytest.raises(CalibrationInputError, match="vocabulary"):
        _prune(loaded, torch.full((2, 16), 100000), nsamples=None, seqlen=None)


def test_text_file_and_named_dataset(loaded, tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("\n\n".join(TEXTS))
    _, rec = _prune(loaded, str(f))
    assert rec["protocol"]["calibration"] == str(f) and rec["calibration"]["nsamples"] == 4
    from conftest import DATA_DIR
    if not (DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw").is_file():
        pytest.skip("wikitext-2 not found")
    _, rec = _prune(loaded, "wikitext2", data_dir=str(DATA_DIR))
    assert rec["protocol"]["calibration"] == "wikitext2" and rec["calibration"]["source"] == "wikitext2"


def test_calibration_errors_are_one_line():
    class Tok:
        def __call__(self, text, **kw):
            return {"input_ids": torch.arange(len(text.split())).unsqueeze(0)}
    with pytest.raises(CalibrationInputError, match="fewer than one window of 64"):
        calibration_from(Tok(), ["a b c"], nsamples=2, seqlen=64, packing="windows")
    X, info = calibration_from(Tok(), ["a b c"], nsamples=2, seqlen=64)  # rows: a short text is one sample
    assert X.shape == (1, 3) and info["tokens"] == 3 and info["lengths"] == [3]
    with pytest.raises(CalibrationInputError, match="packing 'lines'; choose one of rows, windows"):
        calibration_from(Tok(), ["a b c"], nsamples=2, seqlen=64, packing="lines")
    with pytest.raises(CalibrationInputError, match="must be strings"):
        calibration_from(Tok(), ["a", 3], nsamples=2, seqlen=2)
    with pytest.raises(CalibrationInputError, match="integer tensor"):
        calibration_from(Tok(), torch.zeros(2, 8), nsamples=2, seqlen=8)


def test_targets_and_ignore_choose_the_pruned_layers(loaded):
    model, _ = loaded
    m, rec = _prune(loaded, TEXTS, ignore=["re:.*self_attn.*"])
    names = {r["name"] for r in rec["layers"]}
    assert len(names) == 15 and all(".mlp." in n for n in names)
    assert rec["config"]["ignore"] == ["re:.*self_attn.*"]
    dense = dict(model.named_parameters())
    for n, p in m.named_parameters():
        if "self_attn" in n:
            assert torch.equal(p, dense[n]), n
        elif any(k in n for k in PRUNABLE):
            assert (p == 0).float().mean().item() == pytest.approx(0.5), n
    _, rec = _prune(loaded, TEXTS, targets="model.layers.0.mlp.down_proj,re:model\\.layers\\.4\\.self_attn\\.(q|k)_proj")
    assert [r["name"] for r in rec["layers"]] == ["model.layers.0.mlp.down_proj", "model.layers.4.self_attn.q_proj",
                                                  "model.layers.4.self_attn.k_proj"]
    _, rec = _prune(loaded, TEXTS, targets=["Linear"], ignore=["lm_head", "re:model.layers.[1-4]\\."])
    assert {r["name"].split(".")[2] for r in rec["layers"]} == {"0"} and len(rec["layers"]) == 7
    # decoder blocks as targets (older llm-compressor recipes), a block name in ignore
    _, rec = _prune(loaded, TEXTS, targets=["re:model.layers.\\d+$"], ignore=["model.layers.2"])
    assert len(rec["layers"]) == 28 and not any(".layers.2." in r["name"] for r in rec["layers"])
    with pytest.raises(ValueError, match="matches no prunable layer"):
        _prune(loaded, TEXTS, targets=["model.layers.0.mlp.down"])
    with pytest.raises(ValueError, match="leave no layer"):
        _prune(loaded, TEXTS, ignore=["Linear"])


def test_save_is_a_separate_call_and_reloads(loaded, tmp_path):
    model, tok = loaded
    m, rec = _prune(loaded, TEXTS, pattern="2:4")
    out = tmp_path / "saved"
    info = optprune.save(m, out)
    assert info["dtype"] == "float32" and (out / "tokenizer.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    sd = m.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in back.state_dict().items())
    saved = json.loads((out / "run.json").read_text())
    assert saved["config"]["pattern"] == "2:4" and saved["saved"]["save_format"] == "dense"
    assert len(saved["layers"]) == 35


def test_save_of_a_structured_model_goes_through_surgery(loaded, tmp_path):
    model, tok = loaded
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    m, rec = optprune.prune(copy.deepcopy(model), tok, method="spap", sparsity=0.25, structure="mlp", dataset=ids,
                            progress=False)
    out = tmp_path / "shrunk"
    info = optprune.save(m, out, dtype="bfloat16")
    assert next(m.parameters()).dtype == torch.float32  # the caller's model is not converted
    assert info["format"] == "optprune-shrunk" and info["dtype"] == "bfloat16"
    from optprune.llm_adapters.loading import load_model
    back, _, _ = load_model(str(out), dtype=torch.bfloat16)
    assert back.model.layers[0].mlp.down_proj.weight.shape == m.model.layers[0].mlp.down_proj.weight.shape
    assert back.model.layers[0].mlp.down_proj.weight.shape[1] < model.model.layers[0].mlp.down_proj.weight.shape[1]
    mine = {k: v.to(torch.bfloat16) for k, v in m.named_parameters()}
    theirs = dict(back.named_parameters())
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with pytest.raises(ValueError, match="cannot hold a structurally pruned model"):
        optprune.save(m, tmp_path / "c", format="compressed-sparse-legacy")


def _subparser(name):
    import argparse
    from optprune.cli import build_parser
    ap = build_parser()
    return next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def test_cli_and_api_use_the_same_names_and_every_option_has_help_and_a_default():
    cli = {a.dest for a in _subparser("prune")._actions if a.option_strings} - {"help"}
    api = set(inspect.signature(optprune.prune).parameters)
    api_only = {"tokenizer", "text_column", "progress", "damp", "batch_size",  # objects / fine-tuning knobs
                "method_options"}  # the CLI's -O/--method-opt KEY=VALUE
    cli_only = {"output", "save_format", "dtype", "gguf_type", "config", "replay", "low_memory", "activation_dtype", "method_opt",
                "reference", "log_level", "overwrite", "checkpoint_dir", "resume"}
    # saving is optprune.save (which takes overwrite too); method_opt is method_options; checkpoints belong to a
    # command-line run that writes --output
    assert api - api_only <= cli, api - api_only - cli
    assert cli - cli_only <= api, cli - cli_only - api
    assert {"format", "dtype", "gguf_type"} <= set(inspect.signature(optprune.save).parameters)
    for name in ("prune", "eval", "verify", "analyze"):
        p = _subparser(name)
        for a in p._actions:
            if not a.option_strings or a.dest == "help":
                continue
            text = p.formatter_class("x")._get_help_string(a)
            assert a.help, (name, a.dest)
            assert ("default" in text.lower() or "required" in text.lower() or a.required
                    or a.dest == "log_level"), (name, a.dest, text)


def test_quiet_hides_the_summary_and_notes_but_not_errors(stories_dir, tmp_path, capsys):
    from optprune.cli import main
    ids = tmp_path / "t.txt"
    ids.write_text(" ".join(TEXTS * 3))
    args = ["prune", "--model", str(stories_dir), "--method", "magnitude", "--dataset", str(ids), "--nsamples", "2",
            "--seqlen", "16", "--no-eval"]
    assert main(args) == 0
    assert "optprune prune: magnitude" in capsys.readouterr().out
    assert main(["-q", *args]) == 0 and main([*args, "-q"]) == 0
    assert "optprune prune" not in capsys.readouterr().out
    assert main([*args, "-q", "--sparsity", "1.5"]) == 2
    assert "error" in capsys.readouterr().err
