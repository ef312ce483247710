"""Every benchmark and paper_repro script answers ``--help`` (its argparse set-up is valid: help strings with
a bare ``%`` crash argparse only when help is printed)."""
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for d in ("benchmarks", "paper_repro") for p in (REPO / d).rglob("*.py")
                 if "__main__" in p.read_text() and "argparse" in p.read_text())


def _script(name):
    """A benchmark script as a module, found by file name in benchmarks/'s subject folders."""
    import importlib.util
    (path,) = (REPO / "benchmarks").glob(f"*/{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_script_help(path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    monkeypatch.syspath_prepend(str(path.parent))
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(path), run_name="__main__")
    assert e.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


def test_sweep_table_puts_each_row_in_its_cell(tmp_path):
    import json
    st = _script("sweep_table")
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


def test_sweep_keeps_run_record_and_graph_summary(tmp_path, stories_dir, monkeypatch):
    """benchmarks/models/sweep.py on stories260K (smoke protocol), EGGS 2:4 with B=1: the JSONL row carries the worst-case
    graph metrics over the layers (matching the full run record it points to), and a second call skips the row."""
    import json
    monkeypatch.setenv("OPTPRUNE_MODEL_DIR", str(stories_dir.parent))
    sw = _script("sweep")
    out = tmp_path / "r.jsonl"
    argv = ["--model", "stories260k", "--protocol", "smoke", "--methods", "eggs,wanda", "--settings", "2:4",
            "--min-degree", "1", "--eval-windows", "2", "--nsamples", "4", "--no-kl", "--threads", "1",
            "--out", str(out)]
    assert sw.main(argv) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 2 and all("error" not in r for r in rows), rows
    by = {r["config"]["method"]: r for r in rows}
    for meth, r in by.items():
        rec = json.loads((out.parent / r["record"]).read_text())
        gs = [l["graph"] for l in rec["layers"]]
        assert len(gs) == r["graph"]["layers"] == 35
        assert r["graph"]["min_in_degree"] == min(g["in_degree"]["min"] for g in gs)
        assert r["graph"]["isolated_inputs"] == sum(g["isolated_inputs"] for g in gs)
        assert r["graph"]["min_tile_degree"] == min(g["tile_min_degree"] for g in gs)
    assert by["eggs"]["graph"]["min_tile_degree"] >= 1 and by["eggs"]["graph"]["isolated_inputs"] == 0
    assert sw.main(argv) == 0  # resumable: both rows are already there
    assert len(out.read_text().splitlines()) == 2
    st = _script("sweep_table")
    md = st.tables(st.load(out))
    g = by["eggs"]["graph"]
    line = next(l for l in md.splitlines() if l.startswith("| eggs · EC off · B=1 | 2:4 |"))
    assert f"| {g['isolated_inputs']} ({g['layers_with_isolated_inputs']}) |" in line


def test_spap_path_summary_reads_real_run_records(tmp_path, stories_dir, monkeypatch, capsys):
    """SPAP through benchmarks/models/sweep.py on stories260K (smoke protocol), default start and penalty-only start; the
    summary of their run records accounts for every MLP layer, never puts a start below SPAP's own objective, and
    reports no baseline comparison for the penalty-only run (it tried none)."""
    import json
    monkeypatch.setenv("OPTPRUNE_MODEL_DIR", str(stories_dir.parent))
    sw, ps = _script("sweep"), _script("spap_path_summary")
    out = tmp_path / "r.jsonl"
    base = ["--model", "stories260k", "--protocol", "smoke", "--methods", "spap", "--settings", "0.3",
            "--structure", "mlp", "--error-correction", "on", "--eval-windows", "2", "--nsamples", "4", "--no-kl",
            "--threads", "1", "--out", str(out)]
    assert sw.main(base) == 0 and sw.main(base + ["-O", "spap:init=penalty"]) == 0
    rows = {json.dumps(r["config"]["method_options"]): r for r in map(json.loads, out.read_text().splitlines())}
    summ = {json.dumps(s["method_options"]): s for s in ps.load(str(tmp_path / "r.runs"))}
    assert set(summ) == set(rows) == {"null", '{"init": "penalty"}'}
    for key, s in summ.items():
        assert s["layers"] == sum(s["wins"].values()) == 5  # stories260K: 5 blocks, one down_proj each
        assert s["ppl"] == rows[key]["perplexity"]["wikitext2"]
        assert all(g >= -1e-9 for g in s["start_gap_median"].values()), s
    dflt, pen = summ["null"], summ['{"init": "penalty"}']
    assert set(dflt["start_gap_median"]) == {"group_magnitude", "flap", "group_obs", "penalty"}
    assert dflt["compared_layers"] == 5 and 0 <= dflt["improvement_max"] < 1
    assert set(pen["start_gap_median"]) == {"penalty"} and pen["compared_layers"] == 0
    assert ps.main([str(tmp_path / "r.runs")]) is None
    md = capsys.readouterr().out
    assert md.count("\n| default | 0.3 |") == 1 and '| {"init": "penalty"} | 0.3 |' in md


def test_certificate_report_summarises_run_records(tmp_path, capsys):
    """The report reads --certify run records: distribution, per-type medians, counts; rc 2 without certificates."""
    import json
    cr = _script("certificate_report")
    gaps = {"q_proj": [0.8, 0.9], "o_proj": [0.05, 0.15], "down_proj": [0.2, 0.3]}
    layers = [{"name": f"model.layers.{i}.x.{t}", "certificate": {"rel_gap": g, "objective": 10.0,
                                                                   "lower_bound": 10.0 * (1 - g), "jacobi_t": 0.1}}
              for t, v in gaps.items() for i, g in enumerate(v)]
    run = tmp_path / "r1"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": {"model": "m", "method": "sparsegpt", "sparsity": 0.5,
                                                          "pattern": "2:4"}, "layers": layers}))
    assert cr.main([str(run), "--out", str(tmp_path / "rep"), "--no-plot"]) == 0
    doc = json.loads((tmp_path / "rep.json").read_text())
    (s,) = doc["runs"]
    allg = sorted(g for v in gaps.values() for g in v)
    assert s["layers"] == 6 and s["rel_gap"]["min"] == allg[0] and s["rel_gap"]["max"] == allg[-1]
    assert s["rel_gap"]["median"] == pytest.approx((allg[2] + allg[3]) / 2)
    assert s["within_10pct"] == 1 and s["within_25pct"] == 3
    assert s["by_type"]["o_proj"]["median"] == pytest.approx(0.1)
    assert s["weakest"][0]["rel_gap"] == 0.9
    assert s["objective_sum"] / s["bound_sum"] == pytest.approx(60.0 / sum(10 * (1 - g) for g in allg))
    md = (tmp_path / "rep.md").read_text()
    assert "| sparsegpt | 2:4 | 6 |" in md and "--pattern 2:4" in md
    bare = tmp_path / "r2"
    bare.mkdir()
    (bare / "run.json").write_text(json.dumps({"config": {}, "layers": [{"name": "a"}]}))
    capsys.readouterr()
    assert cr.main([str(bare), "--out", str(tmp_path / "x"), "--no-plot"]) == 2
    assert "--certify" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_sweep_results_carry_no_machine_paths(monkeypatch, tmp_path):
    sw = _script("sweep")
    monkeypatch.setenv("OPTPRUNE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("OPTPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    rec = {"calibration": {"path": str(tmp_path / "data" / "c4" / "x.parquet")},
           "cmd": [f"--out {REPO}/benchmarks/results/a.jsonl", str(tmp_path / "cache" / "models" / "m")], "n": 3}
    out = sw.portable(rec)
    assert out == {"calibration": {"path": "$OPTPRUNE_DATA_DIR/c4/x.parquet"},
                   "cmd": ["--out benchmarks/results/a.jsonl", "$OPTPRUNE_CACHE_DIR/models/m"], "n": 3}


def test_fingerprint_sees_a_changed_weight(stories_dir, tmp_path, capsys):
    """benchmarks/models/fingerprint.py: the same run twice is identical; a fingerprint whose tensor digest
    differs (as after a change of the code) is reported and makes the comparison exit 1."""
    import json
    fp = _script("fingerprint")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert fp.main(["--model", str(stories_dir), "--only", "magnitude-50", "--out", str(a)]) == 0
    rec = json.loads(a.read_text())["configs"]["magnitude-50"]
    assert rec["n_tensors"] > 0 and rec["n_layers"] > 0
    assert fp.main(["--model", str(stories_dir), "--only", "magnitude-50", "--out", str(b),
                    "--compare", str(a)]) == 0
    old = json.loads(a.read_text())
    name = next(iter(old["configs"]["magnitude-50"]["per_tensor"]))
    old["configs"]["magnitude-50"]["per_tensor"][name] = "0" * 64
    old["configs"]["magnitude-50"]["tensors"] = "0" * 64
    a.write_text(json.dumps(old))
    capsys.readouterr()
    assert fp.main(["--model", str(stories_dir), "--only", "magnitude-50", "--out", str(b),
                    "--compare", str(a)]) == 1
    assert f"1 tensors differ, e.g. ['{name}']" in capsys.readouterr().out


def test_attribution_table_and_its_docs_section(tmp_path):
    at = _script("attribution")
    rows = [{"row": "sparsegpt", "pattern": "50%", "command": "optprune prune A", "cell": {"ppl": 40.5, "prune_s": 12.0}},
            {"row": "admm+ec", "pattern": "2:4", "command": "optprune prune B", "cell": {"ppl": 61.25, "prune_s": 30.4}},
            {"row": "slr-equal", "pattern": "50%", "command": "optprune prune C", "cell": {"ppl": None, "prune_s": 1.0}}]
    md = at.table(rows, "m")
    lines = md.splitlines()
    head = next(s for s in lines if s.startswith("| configuration"))
    assert head.split(" | ")[1:] == ["50%", "2:4 |"]
    sg = next(s for s in lines if s.startswith("| SparseGPT, error correction off"))
    assert "40.50 (12)" in sg and sg.rstrip(" |").endswith("–")
    admm = next(s for s in lines if s.startswith("| ADMM, error correction on"))
    assert "61.25 (30)" in admm
    slr = next(s for s in lines if s.startswith("| sparse + low-rank"))
    assert "failed" in slr and "n/a" in slr and any(s.startswith("n/a: N:M") for s in lines)
    assert "optprune prune B" in md
    doc = tmp_path / "results.md"
    doc.write_text("# R\n\n<!-- results:start -->\nG\n<!-- results:end -->\n")
    at.write_docs(md, doc)
    at.write_docs(md, doc)  # replaced in place, not appended twice
    text = doc.read_text()
    assert text.count(at.BEGIN) == 1 and text.index(at.END) < text.index("<!-- results:start -->")
    assert at.main(["--out", str(tmp_path / "x.jsonl"), "--rows", "nope"]) == 2
