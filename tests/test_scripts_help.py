"""Every benchmark and paper_repro script answers ``--help`` (its argparse set-up is valid: help strings with
a bare ``%`` crash argparse only when help is printed)."""
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for d in ("benchmarks", "paper_repro") for p in (REPO / d).glob("*.py")
                 if "__main__" in p.read_text() and "argparse" in p.read_text())


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_help(path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    monkeypatch.syspath_prepend(str(path.parent))
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(path), run_name="__main__")
    assert e.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out
