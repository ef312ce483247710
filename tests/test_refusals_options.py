"""Option values and calibration inputs, one row per case: method options against the ranges and choices
declared where the method is registered, typed run options (booleans parsed, never read by truthiness; integers
from files), sizes against the model's context and the memory available, ``--nproc`` against the CPU cores,
and calibration types — from the command line, ``--config``, ``--replay``, llm-compressor recipes and the API,
all through the same check.

A refusal is exit code 2 and one line on stderr naming the option, its value and what is allowed, before any
weight is read (the model is a copy of stories260K whose weights a load would have to read: ``load_model`` is
replaced by a function that fails the test), with the output folder and the model exactly as they were. Rows
that are accepted assert the documented behaviour instead."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import optprune  # noqa: E402
from optprune.cli import main  # noqa: E402
from optprune.llm_adapters import loading  # noqa: E402
from optprune.llm_adapters.calib_inputs import CalibrationTypeError  # noqa: E402
from optprune.llm_adapters.settings import cpu_cores  # noqa: E402


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _write(tmp: Path, name: str, obj) -> str:
    f = tmp / name
    if isinstance(obj, bytes):
        f.write_bytes(obj)
    else:
        f.write_text(json.dumps(obj) if name.endswith(".json") else obj)
    return str(f)


def _run_json(tmp: Path, **protocol) -> str:
    """the run.json of an earlier prune, with some recorded values replaced"""
    rec = {"command": "prune", "status": "done",
           "config": {"model": "{model}", "method": "wanda", "sparsity": 0.5, "pattern": "unstructured",
                      "evaluate": False},
           "protocol": {"base": "smoke", "calibration": "self", "nsamples": 2, "seqlen": 16, "seed": 0, **protocol}}
    return _write(tmp, "run.json", rec)


# (id, prune options {flag: value | True}, files {name: content} made in tmp (a .json/.yaml file path replaces
# "{name}" in the options), expected in the one-line error)
PRUNE_CASES = [
    # method options against their declared ranges and choices (registered next to the solver)
    ("blocksize-0", {"--method": "sparsegpt", "-O": "blocksize=0"}, None,
     "method 'sparsegpt': option blocksize=0 is out of range; allowed: an integer in [1, inf)"),
    ("blocksize-negative", {"--method": "sparsegpt", "-O": "blocksize=-1"}, None,
     "option blocksize=-1 is out of range; allowed: an integer in [1, inf)"),
    ("blocksize-not-int", {"--method": "sparsegpt", "-O": "blocksize=1.5"}, None, "option blocksize expects int"),
    ("damp-negative", {"--method": "sparsegpt", "-O": "damp=-1"}, None,
     "method 'sparsegpt': option damp=-1 is out of range; allowed: a number in [0, inf)"),
    ("fista-xi-1", {"--method": "fista", "-O": "xi=1"}, None, "option xi=1 is out of range; allowed: a number in (0, 1)"),
    ("fista-lam-step-1", {"--method": "fista", "-O": "lam_step=1.0"}, None, "lam_step=1.0 is out of range"),
    ("admm-rho-0", {"--method": "admm", "-O": "rho=0"}, None, "method 'admm': option rho=0 is out of range"),
    ("admm-refit-choice", {"--method": "admm", "-O": "refit=qr"}, None,
     "option refit='qr'; choose one of pcg, cholesky, none"),
    ("spap-threads-0", {"--method": "spap", "-O": "threads=0"}, None, "option threads=0 is out of range"),
    ("method-bool-maybe", {"-O": "refit=maybe"}, None, "option refit expects bool"),
    ("method-nan", {"--method": "sparsegpt", "-O": "damp=NaN"}, None, "option damp expects float"),
    # run options
    ("nproc-0", {"--nproc": "0"}, None, "--nproc=0 is out of range; allowed: an integer in [1, inf)"),
    ("nproc-above-cores", {"--nproc": str(cpu_cores() + 1), "--mode": "dense-input"}, None, "--force-nproc"),
    ("nproc-forced-passes-the-core-check",  # and meets the next check: a checkpoint needs a single process
     {"--nproc": str(cpu_cores() + 1), "--mode": "dense-input", "--force-nproc": True, "--resume": True}, None,
     "need a single process"),
    ("seqlen-beyond-context", {"--seqlen": "1000000000"}, None, "--seqlen 1000000000 exceeds the model's context"),
    ("nsamples-beyond-memory", {"--nsamples": "1000000000"}, None, "the calibration activations need about"),
    ("eval-seqlen-beyond-context", {"--eval-seqlen": "100000", "--no-eval": None, "--eval": "wikitext2"}, None,
     "--eval-seqlen 100000 exceeds the model's context"),
    ("packing-with-self", {"--calibration-packing": "rows"}, None, "applies to texts"),
    ("packing-rows-with-owl", {"--dataset": "{calib.txt}", "--calibration-packing": "rows",
                               "--allocation": "owl"}, {"calib.txt": "one text\nanother text\n"},
     "--calibration-packing rows is not available with --allocation owl"),
    # a text file read as rows: its lines are read (and refused) before the weights
    ("rows-file-blank", {"--dataset": "{calib.txt}"}, {"calib.txt": "\n  \n\n"}, "no calibration text"),
    ("rows-file-latin1", {"--dataset": "{calib.txt}"}, {"calib.txt": "caf\xe9 au lait\n".encode("latin-1")},
     "not UTF-8 text"),
    # --config: the same checks, booleans and integers parsed from the file's strings
    ("config-refit-maybe", {"--config": "{c.json}"}, {"c.json": {"refit": "maybe"}}, "refit expects bool"),
    ("config-evaluate-maybe", {"--config": "{c.json}"}, {"c.json": {"evaluate": "perhaps"}},
     "evaluate (--no-eval) expects bool"),
    ("config-nsamples-many", {"--config": "{c.json}"}, {"c.json": {"nsamples": "many"}},
     "--nsamples expects int, got 'many'"),
    ("config-batch-size-0", {"--config": "{c.json}"}, {"c.json": {"batch_size": 0}},
     "--batch-size=0 is out of range"),
    ("config-damp-negative", {"--config": "{c.json}"}, {"c.json": {"damp": -0.5}}, "--damp=-0.5 is out of range"),
    ("config-method-option-range", {"--config": "{c.json}"},
     {"c.json": {"method": "sparsegpt", "method_options": {"blocksize": 0}}}, "option blocksize=0 is out of range"),
    ("config-packing-unknown", {"--config": "{c.json}"}, {"c.json": {"calibration_packing": "lines"}},
     "--calibration-packing='lines'; choose one of rows, windows"),
    ("config-dataset-number", {"--config": "{c.json}"}, {"c.json": {"dataset": 42}},
     "calibration (dataset=) of type int is not accepted"),
    ("config-dataset-mapping", {"--config": "{c.json}"}, {"c.json": {"dataset": {"path": "x"}}},
     "of type dict is not accepted"),
    ("config-nproc-0-yaml", {"--config": "{c.yaml}"}, {"c.yaml": "nproc: 0\n"}, "--nproc=0 is out of range"),
    # --replay: what a run.json records is checked the same way
    ("replay-nsamples-many", {"--replay": "{run}"}, {"run": {"nsamples": "many"}}, "--nsamples expects int, got 'many'"),
    ("replay-seqlen-beyond-context", {"--replay": "{run}"}, {"run": {"seqlen": 100000}},
     "--seqlen 100000 exceeds the model's context"),
    # an llm-compressor recipe's dampening_frac is --damp
    ("recipe-dampening-negative", {"--config": "{r.yaml}"},
     {"r.yaml": "SparseGPTModifier:\n  sparsity: 0.5\n  dampening_frac: -0.1\n"}, "--damp=-0.1 is out of range"),
]


@pytest.fixture
def setup(stories_dir, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(stories_dir, model)
    out = tmp_path / "out"  # an earlier optprune output
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"command": "prune", "status": "done"}))
    (out / "model.safetensors").write_bytes(b"earlier weights")

    def no_load(*a, **k):
        raise AssertionError("load_model was called: the refusal came after the weights were read")
    monkeypatch.setattr(loading, "load_model", no_load)
    return model, out


@pytest.mark.parametrize("case", PRUNE_CASES, ids=[c[0] for c in PRUNE_CASES])
def test_prune_refusal_exit_2_one_line_before_loading(case, setup, tmp_path, capfd):
    name, opts, files, expected = case
    model, out = setup
    paths = {}
    for fname, content in (files or {}).items():
        if fname == "run":
            p = Path(_run_json(tmp_path, **content))
            p.write_text(p.read_text().replace("{model}", str(model)))
            paths[fname] = str(p)
        else:
            paths[fname] = _write(tmp_path, fname, content)
    before = {p: _digest(p) for p in (out, model)}
    siblings = sorted(p.name for p in tmp_path.iterdir())
    base = {"--model": str(model), "--method": "wanda", "--output": str(out), "--overwrite": True, "--no-eval": True,
            "--dataset": "self", "--nsamples": "2", "--seqlen": "16"}
    if "--replay" in opts:
        base = {"--output": str(out), "--overwrite": True}
    base.update(opts)
    argv = ["prune"]
    for k, v in base.items():
        if v is None:
            continue
        if isinstance(v, str) and v.startswith("{") and v.endswith("}"):
            v = paths[v[1:-1]]
        argv += [k] if v is True else [k, v]
    if "--config" in opts:  # the file's values stand: drop the flags it sets
        cfg = files[next(iter(files))]
        keys = set(cfg) if isinstance(cfg, dict) else {ln.split(":")[0].strip() for ln in cfg.splitlines()}
        for k in keys:
            flag = {"evaluate": "--no-eval"}.get(k, "--" + k.replace("_", "-"))
            if flag in argv:
                i = argv.index(flag)
                del argv[i:i + (1 if flag == "--no-eval" else 2)]
        if "SparseGPTModifier:" in str(cfg):
            i = argv.index("--method")
            del argv[i:i + 2]
    capfd.readouterr()
    rc = main(argv)
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip() and not ln.startswith("[optprune] ")]
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("optprune prune: error:") and expected in err[0], err[0]
    assert {p: _digest(p) for p in (out, model)} == before  # nothing written, inputs untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings


EVAL_CASES = [
    ("eval-batch-size-negative", ["--batch-size", "-3"], "--batch-size=-3 is out of range; allowed: an integer in [1, inf)"),
    ("eval-batch-size-0", ["--batch-size", "0"], "--batch-size=0 is out of range"),
    ("eval-seqlen-beyond-context", ["--eval-seqlen", "100000"], "--eval-seqlen 100000 exceeds the model's context of"),
    ("eval-windows-negative", ["--eval-windows", "-1"], "--eval-windows=-1 is out of range"),
]


@pytest.mark.parametrize("case", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_refusal_exit_2_one_line_before_loading(case, setup, data_dir, tmp_path, capfd):
    name, opts, expected = case
    model, out = setup
    before = {p: _digest(p) for p in (out, model)}
    capfd.readouterr()
    rc = main(["eval", "--model", str(model), "--eval", "wikitext2", "--data-dir", str(data_dir),
               "--output", str(out / "eval.json"), *opts])
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip() and not ln.startswith("[optprune] ")]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("optprune eval: error:") and expected in err[0], err[0]
    assert {p: _digest(p) for p in (out, model)} == before


# ----------------------------------------------------------------------------------------- accepted, parsed
@pytest.mark.parametrize("words", [("false", "no"), ("off", "0"), ("False", "No")])
def test_config_boolean_words_mean_false(words, stories_dir, tmp_path, capfd):
    """``refit: "false"`` / ``evaluate: "no"`` in --config are False: magnitude without refit is data-free, and no
    evaluation runs (a truthy reading would calibrate, refit and evaluate)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f'model: "{stories_dir}"\nmethod: magnitude\nrefit: "{words[0]}"\nevaluate: "{words[1]}"\n'
                   f'output: "{tmp_path / "out"}"\n')
    assert main(["prune", "-q", "--config", str(cfg)]) == 0, capfd.readouterr().err
    rec = json.loads((tmp_path / "out" / "run.json").read_text())
    assert rec["config"]["refit"] is False and rec["config"]["evaluate"] is False
    assert "perplexity" not in rec and rec["calibration"]["source"] == "none" and rec["calibration"]["tokens"] == 0


def test_cli_method_option_words_are_parsed(stories_dir, tmp_path):
    assert main(["prune", "-q", "--model", str(stories_dir), "--method", "magnitude", "-O", "refit=off",
                 "--no-eval", "--output", str(tmp_path / "o")]) == 0
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert rec["config"]["method_options"] == {"refit": False}


@pytest.fixture(scope="module")
def loaded():
    from conftest import STORIES
    from optprune.llm_adapters.loading import load_model
    model, tok, _ = load_model(str(STORIES))
    return model, tok


SENTENCES = [f"The {a} {b} sat by the {c} and looked at the sky." for a, b, c in
             zip("little big red old happy small brave kind sleepy tiny shy proud calm quick gentle funny".split(),
                 "cat dog bird fox bear frog duck girl boy fish cow pig hen owl mouse bee".split(),
                 "tree pond hill door road wall fire bed boat car box gate lamp sea rock well".split())]


def test_api_refit_string_false_and_bad_words(loaded):
    model, tok = loaded
    m = copy.deepcopy(model)
    _, rec = optprune.prune(m, tok, method="wanda", sparsity=0.5, dataset=SENTENCES, refit="false", progress=False)
    assert rec["config"]["refit"] is False
    w = {n: p.clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="refit expects bool .*got 'maybe'"):
        optprune.prune(m, tok, method="wanda", dataset=SENTENCES, refit="maybe", progress=False)
    with pytest.raises(ValueError, match="option blocksize=0 is out of range"):
        optprune.prune(m, tok, method="sparsegpt", dataset=SENTENCES, method_options={"blocksize": 0},
                       progress=False)
    assert all(torch.equal(p, w[n]) for n, p in m.named_parameters())  # refused before touching the model


def _gen():
    yield "a text"


@pytest.mark.parametrize("bad", [42, {"text": ["a"]}, _gen(), b"some bytes", 3.5], ids=["int", "dict", "generator",
                                                                                        "bytes", "float"])
def test_api_wrong_calibration_types_are_type_errors(bad, loaded, tmp_path, monkeypatch):
    model, tok = loaded
    monkeypatch.chdir(tmp_path)
    m = copy.deepcopy(model)
    with pytest.raises(TypeError, match="not accepted; give a name .*a list or tuple of strings, a datasets.Dataset, "
                                        "or an integer torch tensor of token ids"):
        optprune.prune(m, tok, method="wanda", dataset=bad, progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing written, no file looked up under the value's name
    with pytest.raises(TypeError, match="must be strings, found a int"):
        optprune.prune(m, tok, method="wanda", dataset=["a text", 7], progress=False)


def test_sixteen_sentences_calibrate_as_rows_with_the_default_seqlen(loaded):
    """llm-compressor's convention: each text one sample (here all shorter than the default window), the
    record says how many tokens were used; the per-layer token counts are those real tokens (no padding)."""
    model, tok = loaded
    m = copy.deepcopy(model)
    _, rec = optprune.prune(m, tok, method="wanda", sparsity=0.5, dataset=SENTENCES, progress=False)
    cal = rec["calibration"]
    want = sum(min(len(tok(s)["input_ids"]), 512) for s in SENTENCES)
    assert cal["packing"] == "rows" and cal["rows"] == 16 and cal["tokens"] == want
    assert cal["longest_row"] < 512 and cal["truncated_rows"] == 0
    assert rec["config"]["calibration_packing"] == "rows"
    assert {r["nsamples"] for r in rec["layers"]} == {want}
    assert rec["summary"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    # windows keep today's behaviour: 16 one-sentence texts hold less than one default window
    with pytest.raises(ValueError, match="fewer than one window"):
        optprune.prune(copy.deepcopy(model), tok, method="wanda", dataset=SENTENCES, progress=False,
                       calibration_packing="windows")


def test_rows_are_truncated_at_seqlen_and_drawn_when_more_than_nsamples(loaded):
    model, tok = loaded
    long = [" ".join(["the cat sat on the mat"] * 20)] * 3
    _, rec = optprune.prune(copy.deepcopy(model), tok, method="wanda", dataset=long + SENTENCES, nsamples=8,
                            seqlen=24, progress=False)
    cal = rec["calibration"]
    assert cal["rows"] == 8 and cal["longest_row"] <= 24 and cal["nsamples"] == 8
    assert cal["tokens"] <= 8 * 24


def test_text_file_lines_are_rows_on_the_command_line(stories_dir, tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("\n".join(SENTENCES) + "\n\n")
    assert main(["prune", "-q", "--model", str(stories_dir), "--method", "wanda", "--calibration", str(f),
                 "--no-eval", "--output", str(tmp_path / "o")]) == 0
    rec = json.loads((tmp_path / "o" / "run.json").read_text())
    assert rec["calibration"]["packing"] == "rows" and rec["calibration"]["rows"] == 16
    assert rec["calibration"]["path"] == str(f.resolve())
    # and the replay of that run reads the same rows
    assert main(["prune", "-q", "--replay", str(tmp_path / "o" / "run.json"), "--output", str(tmp_path / "o2")]) == 0
    rec2 = json.loads((tmp_path / "o2" / "run.json").read_text())
    assert rec2["calibration"]["sha256"] == rec["calibration"]["sha256"]
    assert rec2["calibration"]["tokens"] == rec["calibration"]["tokens"]
