"""Plot an ``--allocation auto`` selection from a run record: every candidate's cheap proxy and the finalists'
held-out calibration loss, the chosen candidate and uniform's score marked.

    python benchmarks/allocation/selection_plot.py out/run.json [--output selection.png]

``optprune prune --allocation auto --output DIR`` already writes ``DIR/allocation_selection.png``; this redraws it
from any stored record (e.g. the per-run records a sweep keeps).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("record", help="a run.json written by optprune prune --allocation auto")
    ap.add_argument("--output", default=None, help="PNG path (default: allocation_selection.png next to the record)")
    a = ap.parse_args(argv)
    path = Path(a.record)
    if not path.is_file():
        print(f"selection_plot: error: no such file {path}", file=sys.stderr)
        return 2
    alloc = (json.loads(path.read_text()).get("allocation") or {})
    if not alloc.get("candidates"):
        print(f"selection_plot: error: {path} holds no auto allocation selection (run with --allocation auto)",
              file=sys.stderr)
        return 2
    from optprune.llm_adapters.allocation_select import plot_selection
    out = plot_selection(alloc, a.output or path.with_name("allocation_selection.png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
