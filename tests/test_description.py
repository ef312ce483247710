"""The run description (llm_adapters/description.py): every option declared once, and the CLI options, the
signatures of ``optprune.prune`` / ``llm_adapters.run.prune``, their docs, the ``--config`` keys, the recorded
settings and the resume key all derived from it — checked option by option, and with an option added at run
time reaching every one of them."""
from __future__ import annotations

import argparse
import inspect
import json

import pytest

import optprune
from optprune.llm_adapters import description as D
from optprune.llm_adapters import run as R


def _prune_parser():
    from optprune.cli import build_parser
    ap = build_parser()
    return next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices["prune"]


def _parser_flags(parser) -> dict:
    return {s: a for a in parser._actions for s in a.option_strings}


def _run(stories_dir, tmp_path, **kw):
    """A data-free prune of the tiny test model, written to ``tmp_path/out``: its record."""
    out = tmp_path / "out"
    R.prune(model=str(stories_dir), method="magnitude", sparsity=0.5, evaluate=False, progress=False, output=out,
            **kw)
    return json.loads((out / "run.json").read_text())


def test_every_option_reaches_the_cli_the_signatures_the_docs_and_the_config_keys():
    flags = _parser_flags(_prune_parser())
    run_sig = inspect.signature(R.prune).parameters
    api_sig = inspect.signature(optprune.prune).parameters
    keys = set(D.config_keys())
    assert len(D.options()) >= 50
    for name, f in D.options().items():
        m = f.metadata
        assert name in run_sig and name in R.prune.__doc__, name  # llm_adapters.run.prune takes every option
        if not m["required"]:
            assert run_sig[name].default == f.default, name
        if m["cli"]:
            spelled = m["flags"] or ("--" + name.replace("_", "-"), "--no-" + name.replace("_", "-"))
            action = next(flags[s] for s in spelled if s in flags)
            assert action.dest == (m["dest"] or name) and action.help == m["help"], name
        else:
            assert m["help"] == "" and m["doc"], f"{name}: a Python-only option is documented for Python"
        api_name = m["api_name"] or name
        assert (api_name in api_sig) == m["api"], name
        if m["api"]:
            assert f"{api_name}: " in optprune.prune.__doc__, name
        assert (api_name in keys) == m["config"], name
    # nothing on the CLI that the description does not declare (beside where options come from, and logging)
    declared = {s for f in D.options().values() if f.metadata["cli"] for s in D.cli_flags(f)}
    assert set(flags) - declared == {"-h", "--help", "-q", "--quiet", "-v", "--verbose", "--config", "--replay"}
    assert set(run_sig) - set(D.options()) == {"_cli"}


def test_the_record_and_the_resume_key_are_the_declared_options(stories_dir, tmp_path):
    rec = _run(stories_dir, tmp_path, nsamples=4, seqlen=16)
    recorded = {n for n, f in D.options().items() if f.metadata["record"]}
    assert set(rec["config"]) == recorded
    assert rec["config"]["method"] == "magnitude" and rec["config"]["sparsity"] == 0.5
    assert rec["config"]["output"] == str(tmp_path / "out") and rec["config"]["structure"] is None
    d = D.resolve(str(stories_dir), "wanda", nsamples=4, seqlen=16, evaluate=False, output=tmp_path / "o2")
    key = d.resume_key()
    assert {n for n, f in D.options().items() if f.metadata["key"]} <= set(key)
    assert key["method"] == "wanda" and key["nsamples"] == 4 and key["seqlen"] == 16
    assert D.resolve(str(stories_dir), "wanda", nsamples=8, seqlen=16, evaluate=False).resume_key() != key
    assert set(D.replay_keys()) <= recorded
    assert not (tmp_path / "o2").exists()  # resolving writes nothing


def test_resolve_types_parses_the_pattern_once_and_refuses_unknown_names(stories_dir):
    d = D.resolve(model=str(stories_dir), method="sparsegpt", pattern="2:4", nsamples="4", seqlen=16,
                  evaluate="false", refit="no")
    assert d.sparsity == 0.5 and d.pattern.kind == "nm" and (d.pattern.N, d.pattern.M) == (2, 4)
    assert d.get("nsamples") == 4 and d.evaluation.evaluate is False and d.method.refit is False
    with pytest.raises(Exception) as e:
        d.method.sparsity = 0.3  # frozen
    assert "cannot assign" in str(e.value)
    with pytest.raises(TypeError, match="sparsty"):
        D.resolve(str(stories_dir), "wanda", sparsty=0.5)
    with pytest.raises(TypeError, match="sparsty"):
        optprune.prune(str(stories_dir), method="wanda", sparsty=0.5)
    with pytest.raises(ValueError, match="--nsamples expects int"):
        D.resolve(str(stories_dir), "wanda", nsamples="many")


def test_an_option_added_in_one_place_reaches_the_cli_the_api_and_the_record(stories_dir, tmp_path):
    from optprune.cli import main
    with D.isolated():
        D.add_option("output", "run_note", D.option(None, "a free-text note kept with the run (default: none)",
                                                    record=True))
        assert "--run-note" in _parser_flags(_prune_parser())
        assert "run_note" in inspect.signature(R.prune).parameters
        assert "run_note" in inspect.signature(optprune.prune).parameters and "run_note: " in optprune.prune.__doc__
        assert "run_note" in D.config_keys()
        assert _run(stories_dir, tmp_path / "api", run_note="from Python")["config"]["run_note"] == "from Python"
        out = tmp_path / "cli"
        assert main(["-q", "prune", "--model", str(stories_dir), "--method", "magnitude", "--no-eval",
                     "--run-note", "from the CLI", "--output", str(out)]) == 0
        assert json.loads((out / "run.json").read_text())["config"]["run_note"] == "from the CLI"
        with pytest.raises(ValueError, match="exists already"):
            D.add_option("method", "sparsity", D.option(0.5, "again"))
    assert "run_note" not in inspect.signature(optprune.prune).parameters and "--run-note" not in \
        _parser_flags(_prune_parser())
