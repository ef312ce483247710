"""AlphaPruning (arXiv 2410.10912): the paper's headline comparisons at our scales.

AlphaPruning is an allocation, not a pruner: it decides each block's sparsity from the heavy-tailed exponent α
of its weight spectra, then a pruner prunes. Rows: {uniform, OWL, α} allocation × {Wanda, SparseGPT} at 60 /
70 / 80% global sparsity (unstructured; baselines as their published code runs them: no error correction).
The paper's headline: LLaMA-7B at 70% with Wanda, 23.86 (α) vs 85.77 (uniform) vs 24.55 (OWL).

    python paper_repro/alphapruning.py --scale stories | cpu | paper

Writes ``paper_repro/results/alphapruning_<scale>.{jsonl,json,md}``; the extra section lists α per block and
the block sparsities α gives at each target (from ``optprune.llm_adapters.allocation.layer_sparsities``, the
same function the runs use).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Claim, PaperNumber, PaperSpec, Variant, fmt_num, main  # noqa: E402

L7 = "LLaMA-7B"
PPL = "WikiText-2 ppl"
ABS = "the paper's abstract"

VARIANTS = []
for pr, pr_label in (("wanda", "Wanda"), ("sparsegpt", "SparseGPT")):
    for al, al_label in (("uniform", "uniform"), ("owl", "OWL"), ("alpha", "α (AlphaPruning)")):
        VARIANTS.append(Variant(f"{al}_{pr}", f"{pr_label} + {al_label}", pr, error_correction=False, allocation=al,
                                quick=(pr == "wanda" and al in ("uniform", "alpha"))))


def _claims():
    c = [
        Claim("α < uniform with Wanda at 70%", ("alpha_wanda", "0.7"), ("uniform_wanda", "0.7"), (23.86, 85.77), L7, 69),
        Claim("α < OWL with Wanda at 70%", ("alpha_wanda", "0.7"), ("owl_wanda", "0.7"), (23.86, 24.55), L7, 69),
        Claim("OWL < uniform with Wanda at 70%", ("owl_wanda", "0.7"), ("uniform_wanda", "0.7"), (24.55, 85.77), L7, 69),
        Claim("α < uniform with SparseGPT at 70%", ("alpha_sparsegpt", "0.7"), ("uniform_sparsegpt", "0.7"),
              paper_text="α helps multiple pruners (no SparseGPT number in docs/methods.md)", paper_source=ABS),
        Claim("α < OWL with SparseGPT at 70%", ("alpha_sparsegpt", "0.7"), ("owl_sparsegpt", "0.7"),
              paper_text="α beats OWL (LLaMA-7B Wanda number only)", paper_line=69),
    ]
    for s, lab in (("0.6", "60%"), ("0.8", "80%")):
        for pr, prl in (("wanda", "Wanda"), ("sparsegpt", "SparseGPT")):
            c.append(Claim(f"α < uniform with {prl} at {lab}", (f"alpha_{pr}", s), (f"uniform_{pr}", s),
                           paper_text=("LLaMA-7B at 80% keeps a 'reasonable' perplexity with α"
                                       if s == "0.8" else "layer-wise α allocation beats uniform"),
                           paper_line=69 if s == "0.8" else None, paper_source="" if s == "0.8" else ABS))
    return c


def alpha_section(args, cfg, res, out_dir, stem):
    """α per block and the block sparsities α's allocation gives at each target (no calibration needed)."""
    import torch
    from optprune.llm_adapters.allocation import layer_sparsities
    from optprune.llm_adapters.architectures import get_arch
    from optprune.llm_adapters.loading import load_model
    torch.set_num_threads(args.threads or 1)
    model, _, _ = load_model(cfg["model"])
    arch = get_arch(model)
    lines, data = [], {}
    spectra = None
    for st in res["settings"]:
        try:
            S = float(st)
        except ValueError:
            continue
        from optprune.llm_adapters.allocation import model_spectra
        if spectra is None:
            spectra = model_spectra(model, arch)
        _, info = layer_sparsities(model, arch, "alpha", S, spectra=spectra)
        data[st] = {"alpha_per_block": info.get("alpha_per_block"), "unit_sparsities": info.get("unit_sparsities"),
                    "units": info.get("units"), "min": info.get("min"), "max": info.get("max"),
                    "weighted_mean": info.get("weighted_mean"), "eps": info.get("eps")}
    if not data:
        return
    first = next(iter(data.values()))
    alphas = first["alpha_per_block"] or {}
    blocks = sorted(alphas, key=lambda b: int(b))
    lines.append(f"α (Hill estimate, KS-chosen x_min, float64 spectra; mean over the block's matrices) and the block "
                 f"sparsity the α allocation gives (ε = {first.get('eps')}), {res['model_label']}:")
    lines.append("")
    hdr = ["block", "α"] + [f"sparsity @ {res['setting_labels'].get(st, st)}" for st in data]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * len(hdr))
    for b in blocks:
        row = [str(b), fmt_num(alphas[b], ".3f")]
        for st, d in data.items():
            us = dict(zip([str(u) for u in d.get("units") or []], d.get("unit_sparsities") or []))
            row.append(fmt_num(us.get(str(b)), ".3f"))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Parameter-weighted mean of the targets: " + ", ".join(
        f"{res['setting_labels'].get(st, st)} → {d['weighted_mean']:.4f} (range {d['min']:.3f}–{d['max']:.3f})"
        for st, d in data.items()) + ".")
    res.setdefault("sections", []).append({"title": "α per block and the allocation it gives", "lines": lines})
    res["alpha_allocation"] = data


SPEC = PaperSpec(
    name="alphapruning",
    title="AlphaPruning",
    seed="003",
    arxiv="2410.10912",
    settings=["0.6", "0.7", "0.8"],
    setting_labels={"0.6": "60%", "0.7": "70%", "0.8": "80%"},
    variants=VARIANTS,
    numbers=[
        PaperNumber("alpha_wanda", "0.7", 23.86, L7, PPL, 69, "LLaMA-7B at 70% with Wanda: 23.86"),
        PaperNumber("uniform_wanda", "0.7", 85.77, L7, PPL, 69, "uniform 85.77"),
        PaperNumber("owl_wanda", "0.7", 24.55, L7, PPL, 69, "(OWL 24.55)"),
    ],
    claims=_claims(),
    notes=[
        "Allocation units are decoder blocks (AlphaPruning's default); α allocation ε = 0.3 (docs/methods.md §3 default); "
        "OWL M = 5, λ = 0.08. Every target is kept inside [0, 1) (the public code's ratios are not clipped).",
        "Pruners as their published code runs them (sequential blocks, no intra-layer error correction).",
        "The paper's 23.86 / 85.77 / 24.55 are on LLaMA-7B (7B parameters, 32 blocks); our models have 5 "
        "(stories260K) or 30 (SmolLM2-135M) blocks, so the spread of α across blocks — what the allocation exploits "
        "— differs.",
    ],
    extra=alpha_section,
)

if __name__ == "__main__":
    main(SPEC)
