"""ALPS-class L0 solvers (docs/methods.md §7, §5): the new layer solvers beside the methods they improve on.

Rows: the ADMM L0 solver (``admm``, error correction on) at 50/60/70/80% and 2:4 against SparseGPT and Wanda
(as their published code runs them: no error correction) and FISTA (EC on); EGGS at 2:4 in three forms — the
score-driven expander mask (``mask=score``, the EGGS-PTP method; EC off like its paper script), the expander mask
chosen for the layer objective with the kept weights fixed (``mask=error``, still mask-only; EC on) and EGGS with a
weight update (``eggs_update``: the mask chosen inside an OBS sweep, then ADMM; EC on); and the α allocation
(``alpha``, ``alpha:bounded``) with FISTA and ADMM at 60/70/80%. The paper's own numbers are on LLaMA/OPT and are
not quoted in docs/methods.md: the claims below are checks of ours (orderings on our rows).

    python paper_repro/alps.py --scale stories       # stories260K, smoke protocol (seconds per row)
    python paper_repro/alps.py --scale cpu --no-run --import-rows benchmarks/results/cpu_smollm2.jsonl \\
        --import-rows benchmarks/results/cpu_smollm2_admm.jsonl    # SmolLM2 rows made by sweep.py, by key

Writes ``paper_repro/results/alps_<scale>.{jsonl,json,md}``. At ``--scale cpu`` every row is minutes on 2 cores;
``--no-run --import-rows FILE`` assembles the table from sweep files whose configurations match a cell exactly
(a cell without such a row is shown as not run).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Claim, PaperSpec, Variant, main  # noqa: E402

UNSTRUCTURED = ["0.5", "0.6", "0.7", "0.8"]
SETTINGS = UNSTRUCTURED + ["2:4"]
LABELS = {"0.5": "50%", "0.6": "60%", "0.7": "70%", "0.8": "80%", "2:4": "2:4"}
ALLOC = ["0.6", "0.7", "0.8"]

VARIANTS = [
    Variant("admm", "ADMM L0 (EC on)", "admm", error_correction=True, quick=True),
    Variant("sparsegpt", "SparseGPT (EC off)", "sparsegpt", quick=True),
    Variant("wanda", "Wanda (EC off)", "wanda"),
    Variant("fista", "FISTA (EC on)", "fista", error_correction=True),
    Variant("eggs_score", "EGGS mask-only, score-driven mask (mask=score, the default; B=1, EC off)", "eggs",
            settings=["2:4"]),
    Variant("eggs_error", "EGGS mask-only, error-driven mask (B=1, EC on)", "eggs", settings=["2:4"],
            error_correction=True, method_options={"mask": "error"}),
    Variant("eggs_update", "EGGS with weight update (OBS + ADMM, B=1, EC on)", "eggs_update", settings=["2:4"],
            error_correction=True),
]
for meth, lab in (("fista", "FISTA"), ("admm", "ADMM L0")):
    for alloc in ("alpha", "alpha:bounded"):
        VARIANTS.append(Variant(f"{meth}_{alloc.replace(':', '_')}", f"{lab} + {alloc} allocation (EC on)", meth,
                                error_correction=True, allocation=alloc, settings=ALLOC))

_OURS = "a check of the new solver on our rows"
CLAIMS = [Claim(f"ADMM < SparseGPT at {LABELS[s]}", ("admm", s), ("sparsegpt", s), paper_text=_OURS, ours_only=True)
          for s in SETTINGS]
CLAIMS += [Claim(f"ADMM < FISTA at {LABELS[s]}", ("admm", s), ("fista", s), paper_text=_OURS, ours_only=True)
           for s in ("0.5", "0.7", "2:4")]
CLAIMS += [
    Claim("error-driven EGGS mask < Wanda at 2:4 (both mask-only)", ("eggs_error", "2:4"), ("wanda", "2:4"),
          paper_text="the expander mask chosen for the layer objective", ours_only=True),
    Claim("error-driven EGGS mask < score-driven EGGS mask at 2:4", ("eggs_error", "2:4"), ("eggs_score", "2:4"),
          paper_text=_OURS, ours_only=True),
    Claim("EGGS with weight update < SparseGPT at 2:4", ("eggs_update", "2:4"), ("sparsegpt", "2:4"),
          paper_text=_OURS, ours_only=True),
]
for meth, lab in (("fista", "FISTA"), ("admm", "ADMM")):
    for alloc in ("alpha", "alpha_bounded"):
        CLAIMS += [Claim(f"{lab} + {alloc.replace('_', ':')} < {lab} uniform at {LABELS[s]}", (f"{meth}_{alloc}", s),
                         (meth, s), paper_text="α allocation with the best solver", ours_only=True) for s in ALLOC]

SPEC = PaperSpec(
    name="alps",
    title="ALPS-class L0 solvers (ADMM, EGGS with an error-driven mask or a weight update, α allocation)",
    seed="-",
    arxiv="2406.07831",
    settings=SETTINGS,
    setting_labels=LABELS,
    variants=VARIANTS,
    numbers=[],
    claims=CLAIMS,
    notes=[
        "EC = error correction: each sub-layer of a block is solved on the inputs of its already-pruned upstream "
        "sub-layers (X̂) against the dense target. SparseGPT, Wanda and the score-driven EGGS run without it, as "
        "their published code (and the other paper scripts) do.",
        "Mask-only rows (Wanda, both EGGS masks) keep the original weights on the kept entries; the error-driven "
        "EGGS mask minimises ½‖X̂(W0 ⊙ M) − X W0‖² over expander N:M masks by exact block-coordinate descent over "
        "the column groups, started from the score-driven mask (solvers/methods/eggs.py, ``mask_search``).",
        "alpha:bounded takes each layer's sparsity bounds from Wanda error curves (llm_adapters/allocation_select.py), "
        "not from the curves of the solver that prunes.",
    ],
)

if __name__ == "__main__":
    main(SPEC)
