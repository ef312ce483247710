"""The prune engine: one flow for every model source, and a package without import cycles.

* The import graph of every module of the package (module-level and function-local imports, relative and
  absolute) has no cycle.
* ``run.prune`` goes through :class:`~optprune.llm_adapters.engine.PruneRun`; the in-memory, sharded and
  block-parallel runs are strategies of that one engine (bad input is refused by its preflight before any
  weight is read).
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: package name → folder (pyproject's package-dir)
PACKAGES = {"optprune": REPO / "optprune", "optprune.formulations": REPO / "formulations",
            "optprune.solvers": REPO / "solvers", "optprune.llm_adapters": REPO / "llm_adapters"}


# ============================================================================================ import graph
def _modules() -> dict:
    """module name → (path, is_package) for every module of the package."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted(folder.rglob("*.py")):  # sub-packages too (llm_adapters/engine/)
            parts = f.relative_to(folder).with_suffix("").parts
            if ".venv" in parts or "__pycache__" in parts or (pkg == "optprune" and len(parts) > 1):
                continue
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((pkg,) + parts)] = (f, f.name == "__init__.py")
    return out


def _resolve(mod: str, is_pkg: bool, node, modules: dict) -> set:
    """The package modules an import node refers to."""
    def known(name):
        return name if name in modules else None

    found = set()
    if isinstance(node, ast.Import):
        for a in node.names:
            parts = a.name.split(".")
            # ``import a.b.c`` imports a.b.c (the longest known prefix)
            for k in range(len(parts), 0, -1):
                if known(".".join(parts[:k])):
                    found.add(".".join(parts[:k]))
                    break
        return found
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    for a in node.names:
        sub = f"{target}.{a.name}"
        if known(sub):
            found.add(sub)  # ``from pkg import module``
        elif known(target):
            found.add(target)  # ``from module import name``
    return found


def import_graph() -> dict:
    modules = _modules()
    graph = {}
    for name, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = set()
        for node in ast.walk(tree):  # every import, wherever it is (module level, functions, branches)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _resolve(name, is_pkg, node, modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict) -> list:
    """One cycle (list of modules, first repeated at the end) per strongly connected component of size > 1."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def strong(v):  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    cycles = []
    for comp in comps:  # a shortest cycle through the component's first module (breadth-first search)
        start = min(comp)
        prev, frontier, end = {start: None}, [start], None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & comp):
                    if w == start:
                        end = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        cycles.append(list(reversed(path)) + [start])
    return cycles


def test_the_cycle_finder_finds_cycles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(g) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_resolver_reads_relative_absolute_and_local_imports(tmp_path):
    modules = {"optprune.llm_adapters": None, "optprune.llm_adapters.run": None, "optprune.solvers": None,
               "optprune.llm_adapters.offload": None}
    src = ("from . import run\nfrom .offload import X\nfrom ..solvers import get_method\n"
           "def f():\n    import optprune.llm_adapters.offload as O\n")
    nodes = [n for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.Import, ast.ImportFrom))]
    got = set().union(*(_resolve("optprune.llm_adapters.engine", False, n, modules) for n in nodes))
    assert got == {"optprune.llm_adapters.run", "optprune.llm_adapters.offload", "optprune.solvers"}


def test_no_module_imports_a_module_that_imports_it():
    graph = import_graph()
    assert "optprune.llm_adapters.engine" in graph and len(graph) > 40
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(c) for c in cycles)


# ============================================================================================ the engine
def _weights(d: Path) -> dict:
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _prune(stories_dir, out, **kw):
    from optprune.llm_adapters.run import prune
    args = dict(model=str(stories_dir), method="sparsegpt", sparsity=0.5, calibration="wikitext2", nsamples=4,
                seqlen=32, evaluate=False, progress=False, output=out)
    args.update(kw)
    return prune(**args)


def test_the_prune_flow_lives_in_the_engine_only():
    """offload.py keeps storage mechanics, distributed.py process mechanics, run.py calls the engine: none of
    them builds a pipeline config, runs the pipeline or writes a run record."""
    flow = {"prune_model", "validate_config", "PruneConfig", "calibration_tokens", "print_prune_summary",
            "atomic_output", "open_checkpoint"}
    for mod in ("offload", "distributed", "run"):
        tree = ast.parse((REPO / "llm_adapters" / f"{mod}.py").read_text(encoding="utf-8"))
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
               {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | \
               {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not (flow & used), f"llm_adapters/{mod}.py carries part of the prune flow: {sorted(flow & used)}"
    run = ast.parse((REPO / "llm_adapters" / "run.py").read_text(encoding="utf-8"))
    prune = next(n for n in run.body if isinstance(n, ast.FunctionDef) and n.name == "prune")
    code = [n for n in prune.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert len(code) <= 2, "run.prune should only hand its options to PruneRun"


@pytest.mark.parametrize("kw,msg", [
    (dict(method="spap", structure="mlp", sparsity=0.3), "structured"),
    (dict(allocation="alpha"), "--allocation alpha"),
    (dict(calibration="self"), "--calibration self"),
    (dict(output=None), "give --output"),
    (dict(activation_dtype="int8"), "--activation-dtype"),
])
def test_sharded_source_refuses_in_the_preflight_before_any_weight_is_read(stories_dir, tmp_path, monkeypatch,
                                                                          kw, msg):
    from optprune.llm_adapters import engine, offload

    def boom(*a, **k):
        raise AssertionError("a model was opened before the input was checked")

    monkeypatch.setattr(offload.OffloadedModel, "__init__", boom)
    monkeypatch.setattr(engine.OffloadedModel, "__init__", boom)
    out = tmp_path / "out"
    options = dict(model=str(stories_dir), method="sparsegpt", sparsity=0.5, calibration="wikitext2", nsamples=4,
                   seqlen=32, evaluate=False, progress=False, output=out, low_memory=True)
    options.update(kw)
    from optprune.llm_adapters.run import prune
    with pytest.raises(ValueError, match=msg):
        prune(**options)
    assert not out.exists()
    with pytest.raises(ValueError, match=msg):  # the engine's own preflight, called alone
        run = engine.PruneRun(**{**_defaults(), **options})
        run.preflight()


def _defaults() -> dict:
    import inspect

    from optprune.llm_adapters.run import prune
    return {k: p.default for k, p in inspect.signature(prune).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_in_memory_and_sharded_sources_write_the_same_model(stories_dir, tmp_path):
    """The same settings through the two model sources: identical weights, the same per-layer records, and a
    record that names the output folder (not the temporary folder the shards were written to)."""
    a = _prune(stories_dir, tmp_path / "mem")
    b = _prune(stories_dir, tmp_path / "shards", low_memory=True)
    wa, wb = _weights(tmp_path / "mem"), _weights(tmp_path / "shards")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [(r["name"], r["error"]) for r in a["layers"]] == [(r["name"], r["error"]) for r in b["layers"]]
    assert a["summary"]["nonzero_after"] == b["summary"]["nonzero_after"] < a["summary"]["nonzero_before"]
    for rec, d in ((a, "mem"), (b, "shards")):
        saved = json.loads((tmp_path / d / "run.json").read_text())
        assert saved["saved"]["path"] == str((tmp_path / d).resolve())
        assert saved["config"]["output"] == str(tmp_path / d)
        assert saved["status"] == "done"
    assert b["config"]["low_memory"] is True and "low_memory" in b["pipeline"]
    assert not [p for p in tmp_path.iterdir() if "optprune-tmp" in p.name]


def test_preflight_runs_once_and_resolves_the_settings(stories_dir, tmp_path):
    from optprune.llm_adapters.engine import InMemorySource, PruneRun, ShardedSource
    opts = {**_defaults(), **dict(model=str(stories_dir), method="wanda", calibration="wikitext2", nsamples=4,
                                  seqlen=32, evaluate=False, progress=False, output=tmp_path / "o")}
    run = PruneRun(**opts)
    assert run.preflight() is run and isinstance(run.source, InMemorySource)
    d = run.d
    assert run.preflight().d is d  # idempotent: the description is resolved once
    s = d.protocol
    assert (s["nsamples"], s["seqlen"], s["calibration"]) == (4, 32, "wikitext2") and d.sparsity == 0.5
    assert isinstance(PruneRun(**{**opts, "low_memory": True}).preflight().source, ShardedSource)
    assert not (tmp_path / "o").exists()


def test_auto_allocation_plot_is_written_with_the_output(stories_dir, tmp_path):
    """``--allocation auto`` plots its candidates next to run.json: the plot goes into the output written as a
    whole (not into the target folder while the run is still going, which the atomic save would refuse)."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "auto"
    rec = _prune(stories_dir, out, method="wanda", sparsity=0.6, allocation="auto")
    assert rec["status"] == "done"
    plot = Path(rec["allocation"]["plot"])
    assert plot == out / "allocation_selection.png" and plot.is_file() and plot.stat().st_size > 0
    assert json.loads((out / "run.json").read_text())["allocation"]["plot"] == str(plot)
