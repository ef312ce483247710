"""What optprune offers, as data and as one line per entry: ``optprune list methods|patterns|backends|
architectures``. Everything is read from the registries (methods, pattern kinds, backends) and the architecture
table, so a new method, pattern, backend or table entry shows up here without touching this module."""
from __future__ import annotations

import dataclasses

__all__ = ["SECTIONS", "methods", "patterns", "backends", "architectures", "lines"]

SECTIONS = ("methods", "patterns", "backends", "architectures")
INFERRED = "inferred: any model with q/k/v/o+gate/up/down, fc1/fc2 or Conv1D"


def methods() -> list[dict]:
    from .solvers.registry import method_specs
    return [{"name": s.name, "description": s.description, "needs": s.needs, "structured": s.structured,
             "patterns": sorted(s.patterns), "options": {o.name: o.default for o in s.options.values()},
             "help": {o.name: o.help for o in s.options.values() if o.help},
             "allowed": {o.name: o.allowed() for o in s.options.values() if o.allowed()}} for s in method_specs()]


def patterns() -> list[dict]:
    from .formulations.patterns import pattern_classes
    out = []
    for cls in pattern_classes():
        doc = (cls.__doc__ or "").strip().splitlines()
        out.append({"kinds": list(cls.kinds), "class": cls.__name__, "syntax": cls.syntax or cls.kinds[0],
                    "params": list(cls.params), "description": doc[0].strip().replace("``", "") if doc else ""})
    return out


def backends() -> list[dict]:
    from .solvers.registry import backend_classes
    out = []
    for cls in backend_classes():
        try:
            ok = bool(cls.available())
        except Exception:  # an availability probe that fails means: not usable here
            ok = False
        caps = getattr(cls, "capabilities", None)
        cap = {}
        if dataclasses.is_dataclass(caps):
            for f in dataclasses.fields(caps):
                v = getattr(caps, f.name)
                if v is None or v == "" or v == ():
                    continue
                cap[f.name] = sorted(v) if isinstance(v, (set, frozenset)) else v
        doc = (cls.__doc__ or "").strip().splitlines()
        out.append({"name": cls.name, "available": ok, "capabilities": cap,
                    "description": doc[0].strip().replace("``", "") if doc else ""})
    return out


def architectures() -> list[dict]:
    from .llm_adapters.architectures import ARCHITECTURES
    out = []
    for name, a in ARCHITECTURES.items():
        structure = [k for k in ("mlp", "heads") if getattr(a, k, None) is not None]
        out.append({"name": name, "model_types": list(getattr(a, "model_types", ())),
                    "blocks": getattr(a, "blocks", ""), "structure": structure})
    return out


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt(x) for x in v)
    return repr(v)


def _table(rows: list[tuple]) -> list[str]:
    w = max((len(r[0]) for r in rows), default=0)
    return [f"{r[0]:<{w}}  {r[1]}" for r in rows]


def lines(what: str) -> list[str]:
    """One line per entry of section ``what`` (one of :data:`SECTIONS`)."""
    if what == "methods":
        from .solvers.registry import load_errors
        rows = []
        for m in methods():
            opts = ", ".join(f"{k}={_fmt(v)}" + (f" {m['allowed'][k]}" if k in m["allowed"] and m["allowed"][k][0] in "[(" else "")
                             for k, v in m["options"].items()) or "none"
            rows.append((m["name"], f"{m['description']} [patterns: {', '.join(m['patterns'])}; "
                                    f"statistics: {m['needs']}] options: {opts}"))
        return _table(rows) + [f"! {w}: {e}" for w, e in load_errors().items()]
    if what == "patterns":
        from .formulations.patterns import pattern_load_errors
        rows = [(", ".join(p["kinds"]), f"{p['description']} [write: {p['syntax']}"
                 + (f"; parameters: {', '.join(p['params'])}" if p["params"] else "") + "]") for p in patterns()]
        return _table(rows) + [f"! {w}: {e}" for w, e in pattern_load_errors().items()]
    if what == "backends":
        rows = []
        for b in backends():
            cap = "; ".join(f"{k}: {_fmt(v)}" for k, v in b["capabilities"].items())
            rows.append((b["name"], f"{'available' if b['available'] else 'not installed'} — {cap}"))
        return _table(rows)
    if what == "architectures":
        rows = [(a["name"], f"model types: {', '.join(a['model_types'])} [blocks: {a['blocks']}; structured "
                            f"pruning: {', '.join(a['structure']) or 'none'}]") for a in architectures()]
        return _table(rows) + [INFERRED]
    raise ValueError(f"unknown section {what!r}; choose from {', '.join(SECTIONS)}")
