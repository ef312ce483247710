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


def test_sweep_table_puts_each_row_in_its_cell(tmp_path):
    import json
    import importlib.util
    spec = importlib.util.spec_from_file_location("sweep_table", REPO / "benchmarks" / "sweep_table.py")
    st = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(st)
    rows = [{"config": {"method": "dense"}, "perplexity": {"wikitext2": 21.6}, "wall_s": 5},
            {"config": {"method": "wanda", "pattern": "unstructured", "sparsity": 0.5, "error_correction": False},
             "perplexity": {"wikitext2": 49.59}, "kl": 0.7381, "top1": 0.581, "wall_s": 131,
             "timings": {"prune_s": 55.2}},
            {"config": {"method": "fista", "pattern": "2:4", "sparsity": 0.5, "error_correction": True,
                        "calibration": "self"}, "error": "NumericalError: layer x", "wall_s": 3}]
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    md = st.tables(st.load(f))
    line = next(l for l in md.splitlines() if l.startswith("| wanda · EC off |"))
    assert line.split("|")[2:5] == [" – ", " 49.59 ", " – "]  # columns: dense, 50%, 2:4
    assert "| fista · EC on · calib self | – | – | error: NumericalError: layer x |" in md
    assert "0.738 / 0.581" in md and "131 (55)" in md
