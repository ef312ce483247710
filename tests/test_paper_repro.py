"""paper_repro/: every paper script runs at stories scale with --quick and writes JSON + Markdown whose
numbers are the JSONL rows' numbers; make_readme_results replaces only the marked block of the results page.

The quick runs share one process (imports and the model load are paid once) and one module-scoped fixture:
each is 1 dense evaluation + 2 pruning runs on stories260K with 8 calibration samples and 4 evaluation windows.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PR = REPO / "paper_repro"
STORIES = Path(__import__("os").environ["OPTPRUNE_MODEL_DIR"]) / "stories260K"
PAPERS = ["fistapruner", "alphapruning", "spap", "eggs_ptp", "alps"]


def _load(name: str):
    key = f"_paper_repro_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, PR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found at {STORIES}")
    out = tmp_path_factory.mktemp("paper_repro")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = {}
        for p in PAPERS:
            mod = _load(p)
            # --no-extra: the SPAP speed / EGGS 2:4 sections start worker processes (covered by the full runs)
            res[p] = mod.main(mod.SPEC, ["--scale", "stories", "--quick", "--out-dir", str(out), "--no-extra"])
    finally:
        torch.set_num_threads(n)
    return out, res


def _common():
    _load("fistapruner")  # the scripts put paper_repro/ on sys.path and import common
    return sys.modules["common"]


def _rows(path: Path) -> dict:
    return {json.loads(line)["key"]: json.loads(line) for line in path.read_text().splitlines() if line.strip()}


@pytest.mark.parametrize("paper", PAPERS)
def test_quick_run_numbers_are_the_jsonl_rows(quick_runs, paper):
    out, res = quick_runs
    stem = f"{paper}_stories_quick"
    jf, mf, lf = out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.jsonl"
    assert jf.is_file() and mf.is_file() and lf.is_file()
    doc = json.loads(jf.read_text())
    md = mf.read_text()
    rows = _rows(lf)
    assert doc["quick"] and doc["scale"] == "stories" and doc["model"] == "stories260k"
    done = [c for c in doc["rows"] if c["status"] == "done"]
    assert len(done) >= 2, f"{paper}: expected at least two completed quick rows, got {doc['rows']}"
    for c in done:
        r = rows[c["key"]]  # the cell points at its JSONL row
        assert r["config"]["method"] == c["method"]
        assert c["ppl"] == r["perplexity"]["wikitext2"]
        assert c["kl"] == r["kl"] and c["sparsity_achieved"] == r["sparsity_achieved"]
        assert math.isfinite(c["ppl"]) and c["ppl"] > 1
        assert f"{c['ppl']:.2f}" in md, f"{paper}: {c['label']} ppl {c['ppl']:.2f} not in the Markdown"
    dense = [r for r in rows.values() if r["config"]["method"] == "dense"]
    assert len(dense) == 1 and doc["dense"]["ppl"] == dense[0]["perplexity"]["wikitext2"]
    assert f"{doc['dense']['ppl']:.2f}" in md
    # claims are computed from the same cells
    by = {(c["variant"], c["setting"]): c for c in doc["rows"]}
    measured = [c for c in doc["claims"] if c.get("ours_values")]
    assert measured, f"{paper}: no claim measurable in the quick run"
    for c in measured:
        a, b = by[tuple(c["a"])], by[tuple(c["b"])]
        assert c["ours_values"] == [a["ppl"], b["ppl"]]
        assert c["ours_holds"] == (a["ppl"] < b["ppl"])
        assert c["verdict"] in ("agrees", "DISAGREES", "holds", "does not hold")
        if c["verdict"] == "DISAGREES":
            assert "DISAGREES" in md and "disagree with the paper" in md
    # the paper's numbers are quoted from docs/methods.md lines that really hold them
    assert all(s["ok"] is not False for s in doc["sources"]), doc["sources"]
    assert "not comparable" in md  # the header says the paper's models differ


def test_rerun_resumes_without_new_rows(quick_runs):
    out, _ = quick_runs
    lf = out / "fistapruner_stories_quick.jsonl"
    before = lf.read_text()
    mod = _load("fistapruner")
    doc = mod.main(mod.SPEC, ["--scale", "stories", "--quick", "--out-dir", str(out), "--no-extra"])
    assert lf.read_text() == before  # every row was already there: nothing re-run
    assert [c["ppl"] for c in doc["rows"]] == [c["ppl"] for c in json.loads(
        (out / "fistapruner_stories_quick.json").read_text())["rows"]]


def test_paper_scale_refuses_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    mod = _load("spap")
    with pytest.raises(SystemExit) as e:
        mod.main(mod.SPEC, ["--scale", "paper", "--out-dir", str(tmp_path)])
    assert "CUDA" in str(e.value)
    assert not any(tmp_path.iterdir())  # nothing written


def test_paper_numbers_cite_methods_md():
    common = _common()
    if not common.methods_md_path().is_file():
        pytest.skip("the methods brief with the quoted paper numbers is not present")
    for p in PAPERS:
        spec = _load(p).SPEC
        for s in common.check_sources(spec.numbers):
            assert s["ok"], (p, s)
        ids = {v.id for v in spec.variants}
        for c in spec.claims:  # every claim compares rows the script runs
            assert c.a[0] in ids and c.b[0] in ids, (p, c.text)
            assert c.a[1] in spec.settings and c.b[1] in spec.settings, (p, c.text)


# ------------------------------------------------------------------------------------------------ results page
def _page_inputs(quick_runs, tmp_path):
    out, _ = quick_runs
    res = tmp_path / "results"
    res.mkdir()
    for p in PAPERS:  # the generator reads non-quick files: present the quick ones under that name
        shutil.copy(out / f"{p}_stories_quick.json", res / f"{p}_stories.json")
        shutil.copy(out / f"{p}_stories_quick.md", res / f"{p}_stories.md")
    bench = tmp_path / "bench"
    bench.mkdir()
    return res, bench


def test_results_page_replaces_only_the_block(quick_runs, tmp_path):
    mk = _load("make_readme_results")
    res, bench = _page_inputs(quick_runs, tmp_path)
    page = tmp_path / "results.md"
    before = "# title\n\nIntro text.\n\n## Results\n\n"
    after = "\n\n## After\n\nMore text, kept as is.\n"
    page.write_text(before + mk.START + "\nOLD CONTENT 123.45\n" + mk.END + after)
    img = tmp_path / "img"
    args = ["--output", str(page), "--results-dir", str(res), "--bench-dir", str(bench), "--img-dir", str(img)]
    assert mk.main(args) == 0
    text = page.read_text()
    assert text.startswith(before + mk.START) and text.endswith(mk.END + after)
    block = text[text.index(mk.START) + len(mk.START): text.index(mk.END)]
    assert "OLD CONTENT" not in block
    for p in PAPERS:  # every number of every result file's rows is in the block
        doc = json.loads((res / f"{p}_stories.json").read_text())
        for c in doc["rows"]:
            if c["ppl"] is not None:
                assert f"{c['ppl']:.2f}" in block
    pngs = sorted(img.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    methods = {c["method"] for p in PAPERS for c in json.loads((res / f"{p}_stories.json").read_text())["rows"]
               if c["ppl"] is not None}
    assert {p.name.split("ppl_vs_sparsity_")[1].rsplit("_stories", 1)[0] for p in pngs} == methods
    for p in pngs:
        assert f"({p.relative_to(tmp_path).as_posix()})" in block  # embedded with a path relative to the page
    # idempotent: a second run gives the same page
    assert mk.main(args) == 0
    assert page.read_text() == text


def test_results_page_appends_markers_when_absent(quick_runs, tmp_path):
    mk = _load("make_readme_results")
    res, bench = _page_inputs(quick_runs, tmp_path)
    page = tmp_path / "results.md"
    original = "# title\n\nNo results section yet.\n"
    page.write_text(original)
    mk.main(["--output", str(page), "--results-dir", str(res), "--bench-dir", str(bench),
             "--img-dir", str(tmp_path / "img")])
    text = page.read_text()
    assert text.startswith(original)
    assert text.count(mk.START) == 1 and text.count(mk.END) == 1 and text.rstrip().endswith(mk.END)
    # one marker alone is an error and changes nothing
    bad = tmp_path / "BAD.md"
    bad.write_text("x\n" + mk.START + "\n")
    with pytest.raises(SystemExit, match="marker"):
        mk.main(["--output", str(bad), "--results-dir", str(res), "--bench-dir", str(bench),
                 "--img-dir", str(tmp_path / "img2")])
    assert bad.read_text() == "x\n" + mk.START + "\n"
    # a missing page (in a missing folder) is created, with links relative to its own folder
    new = tmp_path / "site" / "results.md"
    assert mk.main(["--output", str(new), "--results-dir", str(res), "--bench-dir", str(bench),
                    "--img-dir", str(tmp_path / "img")]) == 0
    made = new.read_text()
    assert made.startswith("# Results\n") and made.count(mk.START) == 1
    assert "](../img/" in made and "](../results/fistapruner_stories.md)" in made


def test_results_page_default_is_docs_results_md():
    mk = _load("make_readme_results")
    import argparse
    seen = {}
    real_parse = argparse.ArgumentParser.parse_args

    def spy(self, argv=None, namespace=None):
        ns = real_parse(self, argv, namespace)
        seen["output"] = ns.output
        raise SystemExit(0)  # stop before anything is read or written

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", spy)
        with pytest.raises(SystemExit):
            mk.main([])
    assert Path(seen["output"]) == REPO / "docs" / "results.md"


def test_import_rows_fills_missing_cells_and_names_them(tmp_path):
    """``--import-rows`` copies rows of the identical configuration (and the dense row) from a sweep file into the
    paper script's missing cells, re-tagged; rows of other configurations (another error correction, an error)
    are not taken; the Markdown names the copied rows; a second import copies nothing."""
    mod = _load("fistapruner")
    common = sys.modules["common"]
    sweep = common.load_sweep()
    cfg = common.scale_config("cpu")

    def row(method, setting, ec, ppl, error=None):
        c = {"model": cfg["model"], "protocol": "cpu", "method": method, **common.parse_setting(setting),
             "allocation": "uniform", "error_correction": ec, "mode": "sequential", "calibration": None,
             "refit": False, "structure": None, "min_degree": None, "method_options": None, "tag": None}
        r = {"key": sweep.row_key(c), "config": c, "perplexity": {"wikitext2": ppl}, "wall_s": 1.0,
             "record": "src.runs/abc.json"}
        return dict(r, error=error) if error else r

    dense = {"model": cfg["model"], "protocol": "cpu", "method": "dense", "tag": None}
    src = tmp_path / "src" / "sweep.jsonl"
    src.parent.mkdir()
    rows = [{"key": sweep.row_key(dense), "config": dense, "perplexity": {"wikitext2": 20.5}},
            row("fista", "2:4", True, 88.8), row("sparsegpt", "2:4", False, 99.9),
            dict(row("sparsegpt", "0.5", False, 44.4), config=dict(row("sparsegpt", "0.5", False, 0)["config"],
                                                                  calibration="c4")),  # the protocol's own source
            dict(row("magnitude", "0.5", False, 3.0), config=dict(row("magnitude", "0.5", False, 0)["config"],
                                                                  calibration="self")),  # another source
            row("wanda", "2:4", True, 1.0),            # EC on: not the Wanda variant (EC off)
            row("wanda", "0.7", False, 5.0, error="NumericalError: x")]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    doc = mod.main(mod.SPEC, ["--scale", "cpu", "--no-run", "--no-extra", "--out-dir", str(out),
                              "--import-rows", str(src)])
    cell = {(c["variant"], c["setting"]): c for c in doc["rows"]}
    assert cell[("fista", "2:4")]["ppl"] == 88.8 and cell[("sparsegpt", "2:4")]["ppl"] == 99.9
    assert cell[("wanda", "2:4")]["status"] == "missing" and cell[("wanda", "0.7")]["status"] == "missing"
    assert cell[("sparsegpt", "0.5")]["ppl"] == 44.4 and cell[("magnitude", "0.5")]["status"] == "missing"
    assert doc["dense"]["ppl"] == 20.5
    copied = common.read_rows(out / "fistapruner_cpu.jsonl")
    assert len(copied) == 4 and all(r["shared_from_tag"] for r in copied)
    assert {r["config"]["tag"] for r in copied} == {"fistapruner/fista", "fistapruner/sparsegpt"}
    recs = [r["record"] for r in copied if r.get("record")]  # the pruned rows' run records, re-based
    assert len(recs) == 3 and all((out / x).resolve() == (src.parent / "src.runs/abc.json").resolve() for x in recs)
    md = (out / "fistapruner_cpu.md").read_text()
    assert "Rows copied from another run" in md and "FISTA (SparseGPT warm start, EC on) — the paper @ 2:4" in md
    mod.main(mod.SPEC, ["--scale", "cpu", "--no-run", "--no-extra", "--out-dir", str(out), "--import-rows", str(src)])
    assert len(common.read_rows(out / "fistapruner_cpu.jsonl")) == 4


def test_alps_cpu_tables_are_assembled_from_sweep_rows_by_key(tmp_path):
    """``alps.py --scale cpu --no-run --import-rows`` fills exactly the cells whose whole configuration (method
    options and allocation included) has a sweep row; everything else stays missing, never filled in."""
    mod = _load("alps")
    common = sys.modules["common"]
    sweep = common.load_sweep()
    cfg = common.scale_config("cpu")

    def row(method, setting, ec, ppl, options=None, allocation="uniform"):
        c = {"model": cfg["model"], "protocol": "cpu", "method": method, **common.parse_setting(setting),
             "allocation": allocation, "error_correction": ec, "mode": "sequential", "calibration": None,
             "refit": False, "structure": None, "min_degree": None, "method_options": options, "tag": None}
        return {"key": sweep.row_key(c), "config": c, "perplexity": {"wikitext2": ppl}, "wall_s": 1.0}

    src = tmp_path / "sweep.jsonl"
    rows = [row("admm", "0.7", True, 98.0), row("sparsegpt", "0.7", False, 342.0),
            row("eggs", "2:4", True, 150.0, {"mask": "error"}), row("wanda", "2:4", False, 177.0),
            row("eggs", "2:4", False, 222.0), row("eggs", "2:4", False, 1.0, {"mask": "error"}),  # EC off
            row("admm", "0.7", True, 90.0, allocation="alpha:bounded"), row("fista", "0.6", True, 1.0,
                                                                               allocation="alpha")]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    doc = mod.main(mod.SPEC, ["--scale", "cpu", "--no-run", "--out-dir", str(out), "--import-rows", str(src)])
    cell = {(c["variant"], c["setting"]): c for c in doc["rows"]}
    assert cell[("admm", "0.7")]["ppl"] == 98.0 and cell[("sparsegpt", "0.7")]["ppl"] == 342.0
    assert cell[("eggs_error", "2:4")]["ppl"] == 150.0 and cell[("wanda", "2:4")]["ppl"] == 177.0
    assert cell[("admm_alpha_bounded", "0.7")]["ppl"] == 90.0 and cell[("fista_alpha", "0.6")]["ppl"] == 1.0
    assert cell[("eggs_score", "2:4")]["ppl"] == 222.0  # mask=score is the default: the option-less row
    filled = {k for k, c in cell.items() if c["ppl"] is not None}
    assert len(filled) == 7 and sum(c["status"] == "missing" for c in doc["rows"]) == len(doc["rows"]) - 7
    claims = {c["text"]: c for c in doc["claims"]}
    assert claims["ADMM < SparseGPT at 70%"]["verdict"] == "holds"
    assert claims["error-driven EGGS mask < Wanda at 2:4 (both mask-only)"]["ours_values"] == [150.0, 177.0]
    assert claims["ADMM + alpha:bounded < ADMM uniform at 70%"]["verdict"] == "holds"  # 90 vs 98
    assert claims["ADMM < SparseGPT at 2:4"]["verdict"] == "not run"  # neither row exists


def test_alphapruning_auto_section_counts_cells_behind_uniform_and_alpha_from_the_records(tmp_path):
    """The auto section's two verdict lines are computed from the rows, and the reason auto passed over the
    paper's α (its proxy rank, or its held-out score as a finalist) is read from each auto row's run record."""
    mod = _load("alphapruning")
    runs = tmp_path / "x.runs"
    runs.mkdir()

    def record(name, paper_proxy, finalist):
        cands = [{"label": "uniform", "proxy": 5.0, "finalist": True, "heldout_loss": 6.0},
                 {"label": "alpha:median:eps=0.2", "proxy": 4.0, "finalist": True, "heldout_loss": 5.5},
                 {"label": "alpha:mean:eps=0.3", "proxy": paper_proxy, "finalist": finalist}]
        if finalist:
            cands[2]["heldout_loss"] = 5.7
        (runs / name).write_text(json.dumps({"allocation": {"candidates": cands}}))

    record("a.json", 4.5, False)   # rank 2 of 3 by proxy (uniform 5.0 is behind it), not shortlisted
    record("b.json", 3.0, True)    # shortlisted and scored
    jl = tmp_path / "x.jsonl"
    jl.write_text("\n".join(json.dumps({"key": k, "record": f"x.runs/{f}",
                                        "allocation_choice": {"chosen": "alpha:median:eps=0.2",
                                                              "chosen_score": 5.5, "uniform_score": 6.0}})
                            for k, f in (("ka", "a.json"), ("kb", "b.json"))) + "\n")
    rows = [{"variant": "uniform_wanda", "setting": "0.6", "ppl": 100.0},
            {"variant": "alpha_wanda", "setting": "0.6", "ppl": 80.0},
            {"variant": "auto_wanda", "setting": "0.6", "ppl": 90.0, "key": "ka"},
            {"variant": "uniform_sparsegpt", "setting": "0.6", "ppl": 50.0},
            {"variant": "alpha_sparsegpt", "setting": "0.6", "ppl": 45.0},
            {"variant": "auto_sparsegpt", "setting": "0.6", "ppl": 55.0, "key": "kb"}]
    res = {"rows": rows, "settings": ["0.6"], "setting_labels": {"0.6": "60%"}, "sections": []}
    mod.auto_section(res, jl)
    text = "\n".join(res["sections"][-1]["lines"])
    assert "above uniform's in 1 of 2 cells" in text
    assert "above the paper's α allocation's in 2 of 2 cells" in text
    assert "Wanda 60% (90.00 vs 80.00; the paper's α ranked 2 of 3 by the proxy and was not a finalist)" in text
    assert "SparseGPT 60% (55.00 vs 45.00; the paper's α was a finalist, held-out 5.700)" in text
