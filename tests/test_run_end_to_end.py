"""End to end: ``optprune prune`` / ``optprune eval`` in-process on stories260K under the ``smoke`` protocol
(llm_adapters/run.py, through optprune.cli.main)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import optprune.cli  # noqa: E402
from optprune.cli import main  # noqa: E402
from optprune.llm_adapters import run as R  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("OPTPRUNE_DATA_DIR", REPO.parent / "shared" / "data"))
MODEL_DIR = Path(os.environ.get("OPTPRUNE_MODEL_DIR", REPO.parent / "shared" / "models"))
COMMON = ["--data-dir", str(DATA_DIR), "--model-dir", str(MODEL_DIR)]


def _need():
    for p in (MODEL_DIR / "stories260K", DATA_DIR / "wikitext-2-raw" / "wiki.test.raw",
              DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw"):
        if not p.exists():
            pytest.skip(f"{p} not found")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cli_prune(out: Path, method: str, *extra, monkeypatch=None, keep=None) -> int:
    """Run ``optprune prune`` in-process; with ``keep`` (a dict) the pruned in-memory model is kept there."""
    if keep is not None:
        real = optprune.cli._run_prune

        def capture(**kw):
            model, tok, rec = R.prune(**kw, return_model=True)
            keep.update(model=model, tok=tok, record=rec)
            return rec
        monkeypatch.setattr(optprune.cli, "_run_prune", capture)
    try:
        return main(["prune", "--model", "stories260k", "--method", method, "--sparsity", "0.5",
                     "--output", str(out), *COMMON, *extra])
    finally:
        if keep is not None:
            monkeypatch.setattr(optprune.cli, "_run_prune", real)


@pytest.fixture(scope="module")
def sparsegpt_run(tmp_path_factory):
    _need()
    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("e2e") / "sparsegpt"
    keep = {}
    try:
        rc = _cli_prune(out, "sparsegpt", monkeypatch=mp, keep=keep)
    finally:
        mp.undo()
    return rc, out, keep


@pytest.fixture(scope="module")
def magnitude_run(tmp_path_factory):
    _need()
    out = tmp_path_factory.mktemp("e2e") / "magnitude"
    return _cli_prune(out, "magnitude"), out


def test_prune_writes_a_stock_loadable_model_with_identical_logits(sparsegpt_run):
    rc, out, keep = sparsegpt_run
    assert rc == 0
    for f in ("config.json", "model.safetensors", "run.json", "tokenizer.json"):
        assert (out / f).is_file(), f
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    pruned = keep["model"].to("cpu").eval()
    ids = torch.randint(0, 512, (3, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, pruned(ids).logits)
    # the pruned weights really are on disk: half of every prunable matrix is zero
    for name, W in back.named_parameters():
        if any(k in name for k in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")):
            assert (W == 0).float().mean().item() == pytest.approx(0.5, abs=1e-6), name


def test_run_json_records_every_layer(sparsegpt_run):
    _, out, keep = sparsegpt_run
    rec = json.loads((out / "run.json").read_text())
    assert rec == json.loads(json.dumps(keep["record"]))
    assert rec["status"] == "done" and rec["config"]["method"] == "sparsegpt"
    for k in ("python", "torch", "transformers", "optprune"):
        assert rec["versions"][k]
    assert rec["machine"]["cpu_count"] >= 1 and rec["peak_rss_mb"] > 0
    p = rec["protocol"]
    assert (p["name"], p["calibration"], p["nsamples"], p["seqlen"], p["seed"]) == ("smoke", "wikitext2", 32, 128, 0)
    assert (p["eval_datasets"], p["eval_seqlen"], p["eval_windows"]) == (["wikitext2"], 512, 64)
    layers = rec["layers"]
    assert len(layers) == 5 * 7 and len({r["name"] for r in layers}) == 35
    for r in layers:
        assert r["sparsity"] == pytest.approx(r["sparsity_target"]) == pytest.approx(0.5)
        assert r["error"] is not None and r["error_before"] is not None and r["time_s"] >= 0
        assert 0 <= r["rel_error"] < 1
    assert rec["summary"]["sparsity"] == pytest.approx(0.5)
    assert rec["summary"]["nonzero_after"] * 2 == rec["summary"]["prunable_weights"]
    ppl = rec["perplexity"]["wikitext2"]
    assert ppl["windows"] == 64 and ppl["seqlen"] == 512 and math.isfinite(ppl["ppl"])
    for k in ("load_s", "calibration_s", "prune_s", "eval_s", "save_s", "total_s"):
        assert rec["timings"][k] >= 0


def test_sparsegpt_beats_magnitude_on_smoke(sparsegpt_run, magnitude_run):
    rc, out = magnitude_run
    assert rc == 0
    sg = json.loads((sparsegpt_run[1] / "run.json").read_text())["perplexity"]["wikitext2"]["ppl"]
    mg = json.loads((out / "run.json").read_text())["perplexity"]["wikitext2"]["ppl"]
    assert sg < mg


def test_eval_reproduces_the_recorded_perplexity(sparsegpt_run, tmp_path, capsys):
    """``optprune eval`` on the output reuses the run's protocol (run.json) and the reloaded weights."""
    _, out, _ = sparsegpt_run
    rc = main(["eval", "--model", str(out), "--output", str(tmp_path / "e.json"), *COMMON])
    assert rc == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    rec = json.loads((out / "run.json").read_text())
    assert ev["protocol"]["base"] == "smoke" and ev["protocol"]["origin"] == "recorded in run.json"
    assert ev["perplexity"]["wikitext2"]["ppl"] == pytest.approx(rec["perplexity"]["wikitext2"]["ppl"], rel=1e-6)
    assert "perplexity wikitext2" in capsys.readouterr().out


def test_calibration_from_a_text_file_no_eval(tmp_path):
    _need()
    f = tmp_path / "calib.txt"
    f.write_text((DATA_DIR / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")[:20000])
    out = tmp_path / "w"
    rc = main(["prune", "--model", "stories260k", "--method", "wanda", "--pattern", "2:4", "--calibration", str(f),
               "--nsamples", "4", "--seqlen", "64", "--no-eval", "--output", str(out), *COMMON])
    assert rc == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["calibration"]["path"] == str(f.resolve()) and rec["calibration"]["nsamples"] == 4
    assert rec["protocol"]["name"] == "smoke+custom" and "perplexity" not in rec
    assert all(r["feasible"] and r["sparsity"] == pytest.approx(0.5) for r in rec["layers"])


@pytest.mark.parametrize("extra,msg", [
    (["--sparsity", "-0.1"], "sparsity"),
    (["--pattern", "6:4"], "N ≤ M"),
    (["--pattern", "4:8"], "172"),
    (["--method", "no_such_method"], "unknown method"),
    (["--model", "{tmp}/no_such_model"], "no_such_model"),
    (["--protocol", "nope"], "unknown protocol"),
    (["--eval", "no_such_text"], "no_such_text"),
])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, capsys, extra, msg):
    _need()
    out = tmp_path / "out"
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    rc = main(["prune", "--model", "stories260k", "--method", "sparsegpt", "--output", str(out), *COMMON, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    err = [e for e in err if e.startswith("optprune")]
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("optprune prune: error:") and msg in err[0]
    assert not out.exists()


def test_missing_calibration_data_is_a_clear_error(tmp_path, capsys):
    _need()
    out = tmp_path / "out"
    (tmp_path / "nodata").mkdir()  # the folder exists (a missing one is its own error) but lacks the text
    # an explicitly named source must exist (with no source named, the run falls back to --calibration self)
    rc = main(["prune", "--model", "stories260k", "--method", "wanda", "--output", str(out), "--calibration",
               "wikitext2", "--data-dir", str(tmp_path / "nodata"), "--model-dir", str(MODEL_DIR)])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path / "nodata" / "wikitext-2-raw" / "wiki.valid.raw") in err
    assert "--calibration" in err and not out.exists()


def test_refuses_to_overwrite_a_foreign_directory(tmp_path, capsys):
    _need()
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    rc = main(["prune", "--model", "stories260k", "--method", "magnitude", "--output", str(out), *COMMON])
    assert rc == 2 and "not an optprune output" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
