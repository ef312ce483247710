"""Interrupting ``optprune prune`` (SIGINT/SIGTERM at precise points through the ``OPTPRUNE_TEST_INTERRUPT``
hook of llm_adapters/checkpoint.py) leaves the output folder as it was, keeps the checkpoint, and ``--resume``
gives weights and masks bit-identical to an uninterrupted run (stories260K, one thread)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from optprune.cli import main  # noqa: E402
from optprune.llm_adapters.checkpoint import ENV_TEST, default_checkpoint_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    assert sd, f"no weights in {d}"
    return sd


def _assert_identical(a: Path, b: Path):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape, k
        assert torch.equal(wa[k] != 0, wb[k] != 0), f"mask of {k} differs"
        assert torch.equal(wa[k], wb[k]), f"weights of {k} differ"


def _argv(stories_dir, out, method, extra=()):
    return ["prune", "--model", str(stories_dir), "--method", method, "--output", str(out), "--no-eval",
            "--calibration", "self", "--nsamples", "4", "--seqlen", "32", "--data-dir", str(out.parent), *extra]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTPRUNE_CACHE_DIR", str(tmp_path / "cache"))  # no shared self-calibration cache


def _earlier_output(out: Path):
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"command": "prune", "status": "done"}))
    (out / "model.safetensors").write_bytes(b"earlier weights")
    return _digest(out)


@pytest.mark.parametrize("method,extra,point", [
    ("sparsegpt", (), "block:2"),                              # sequential: blocks put back, stream recomputed
    ("wanda", ("--mode", "dense-input"), "block:1"),           # dense stream: blocks put back afterwards
    ("spap", ("--sparsity", "0.3"), "block:3"),                # structured: shrunk blocks restored
    ("sparsegpt", (), "calibration"),                          # early: during the self-generated calibration
    ("sparsegpt", (), "save"),                                 # late: while the output is being written
])
def test_interrupt_then_resume_is_bit_identical(stories_dir, tmp_path, cache, monkeypatch, capfd, method, extra,
                                                point):
    ref = tmp_path / "ref"
    assert main(_argv(stories_dir, ref, method, extra)) == 0
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # the calibration is generated again, not cached

    out = tmp_path / "out"
    before = _earlier_output(out)
    monkeypatch.setenv(ENV_TEST, point)
    capfd.readouterr()
    rc = main(_argv(stories_dir, out, method, (*extra, "--overwrite")))
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("optprune")]
    assert rc == 130
    assert len(err) == 1 and "interrupted (SIGINT)" in err[0] and "--resume" in err[0], err
    assert _digest(out) == before  # the earlier output is untouched
    ck = default_checkpoint_dir(out)
    assert (ck / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if "optprune-tmp" in p.name]  # the temporary output is gone
    if point.startswith("block:"):
        k = int(point.split(":")[1])
        assert json.loads((ck / "manifest.json").read_text())["blocks"] == list(range(k + 1))

    monkeypatch.delenv(ENV_TEST)
    assert main(_argv(stories_dir, out, method, (*extra, "--overwrite", "--resume"))) == 0
    _assert_identical(out, ref)
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "done" and len(rec["layers"]) == len(json.loads((ref / "run.json").read_text())["layers"])
    if point.startswith("block:"):
        assert rec["pipeline"]["resumed_blocks"] == list(range(int(point.split(":")[1]) + 1))
    assert not ck.exists()  # a complete run deletes its checkpoint


def test_sigterm_in_a_real_process_exits_143_and_keeps_the_target(stories_dir, tmp_path, cache):
    out = tmp_path / "out"
    before = _earlier_output(out)
    env = dict(os.environ, **{ENV_TEST: "block:1:TERM", "OMP_NUM_THREADS": "1"})
    p = subprocess.run([sys.executable, "-m", "optprune", *_argv(stories_dir, out, "magnitude", ("--overwrite",))],
                       env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("optprune")]
    assert p.returncode == 143, p.stderr[-2000:]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "--resume" in lines[0]
    assert "Traceback" not in p.stderr
    assert _digest(out) == before


def test_resume_with_other_settings_is_refused(stories_dir, tmp_path, cache, monkeypatch, capfd):
    out = tmp_path / "out"
    monkeypatch.setenv(ENV_TEST, "block:0")
    assert main(_argv(stories_dir, out, "magnitude")) == 130
    monkeypatch.delenv(ENV_TEST)
    capfd.readouterr()
    assert main(_argv(stories_dir, out, "magnitude", ("--sparsity", "0.6", "--resume"))) == 2
    err = capfd.readouterr().err
    assert "other settings" in err and "sparsity" in err
    assert not out.exists()


def test_overwrite_replaces_the_whole_folder_and_a_stale_widths_file_is_ignored(stories_dir, tmp_path, cache):
    out = tmp_path / "out"
    assert main(_argv(stories_dir, out, "spap", ("--sparsity", "0.3"))) == 0  # a structured output
    widths = json.loads((out / "optprune_widths.json").read_text())
    assert widths["layers"][0]["mlp"] < 172
    (out / "extra-from-before.txt").write_text("x")
    assert main(_argv(stories_dir, out, "wanda", ("--overwrite",))) == 0
    assert not (out / "optprune_widths.json").exists() and not (out / "extra-from-before.txt").exists()
    assert not [p for p in tmp_path.iterdir() if "optprune-" in p.name]  # no temporary or old folder left
    # a folder where an earlier structured run's widths file was left next to plain weights re-prunes fine
    (out / "optprune_widths.json").write_text(json.dumps({**widths, "stock_loadable": False}))
    again = tmp_path / "again"
    argv = _argv(stories_dir, again, "magnitude")
    argv[argv.index("--model") + 1] = str(out)
    assert main(argv) == 0
    assert _weights(again)["model.layers.0.mlp.down_proj.weight"].shape[1] == 172


def test_ctrl_c_swallowed_by_a_library_still_stops_the_run(stories_dir, tmp_path, cache, monkeypatch, capfd):
    """a SIGINT that some code catches and drops (here: the calibration step) still ends the run with 130 at the
    next checkpoint, before anything is saved"""
    import signal
    from optprune.llm_adapters import selfcalib

    real = selfcalib.self_calibration

    def swallowing(*a, **kw):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:  # noqa: BLE001 - what a careless library does
            pass
        return real(*a, **kw)

    monkeypatch.setattr(selfcalib, "self_calibration", swallowing)
    out = tmp_path / "out"
    capfd.readouterr()
    assert main(_argv(stories_dir, out, "wanda")) == 130  # a method that calibrates (magnitude is data-free)
    assert "interrupted (SIGINT)" in capfd.readouterr().err
    assert not out.exists()
