"""Graph metrics of 2:4 masks on the real stories260K layers: EGGS (≥ B per column per 4×4 tile) vs
magnitude / Wanda / RIA / SparseGPT 2:4 masks, which carry no degree guarantee.

Every linear sub-layer of stories260K (5 blocks × q, k, v, o, gate, up, down = 35 matrices) is pruned to 2:4
by each method on the same statistics: the dense model's inputs to that layer on the in-domain TinyStories
sample (``--random-activations``: Gaussian inputs instead). Per mask: degrees, isolated inputs, connected
components, σ2 vs the Ramanujan bound (solvers/methods/graph_metrics.py), the per-tile column degrees, and the layer's
relative reconstruction error f(W)/f(0). Prints a table and saves a plot (and optionally the JSON).

    python benchmarks/semistructured/eggs_graph_metrics.py --out out/eggs_graph_metrics.png --json /tmp/gm.json
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from optprune.formulations import NM, ExpanderNM, LayerProblem
from optprune.solvers import get_method
from optprune.solvers.methods.graph_metrics import graph_metrics

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = Path(os.environ.get("OPTPRUNE_MODEL_DIR", Path.home() / ".cache" / "optprune" / "models"))
DATA_DIR = Path(os.environ.get("OPTPRUNE_DATA_DIR", Path.home() / ".cache" / "optprune" / "data"))
SUBLAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")


def layer_inputs(model_dir: Path, text: str, max_tokens: int):
    """Dense inputs (tokens × in) of every linear sub-layer, via forward pre-hooks (transformers)."""
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tok(text, return_tensors="pt").input_ids[:, :max_tokens]
    weights, inputs, hooks = {}, {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name.endswith(s) for s in SUBLAYERS):
            weights[name] = mod.weight.detach().clone()
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: inputs.__setitem__(name, a[0].detach().reshape(-1, a[0].shape[-1]).clone())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return weights, inputs, int(ids.shape[1])


def random_inputs(model_dir: Path, tokens: int, seed: int = 0):
    from safetensors.torch import load_file
    sd = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    weights = {k[: -len(".weight")]: v for k, v in sd.items() if v.dim() == 2 and ".layers." in k}
    inputs = {k: torch.randn(tokens, W.shape[1], generator=g) for k, W in weights.items()}
    return weights, inputs, tokens


def tile_degree_hist(mask: torch.Tensor, M: int) -> list:
    m, n = mask.shape
    t = mask.reshape(m // M, M, n // M, M).sum(1).reshape(-1)
    return torch.bincount(t, minlength=M + 1).tolist()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=str(MODEL_DIR / "stories260K"))
    ap.add_argument("--random-activations", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--out", default="eggs_graph_metrics.png", help="plot file (PNG)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    mdir = Path(args.model_dir)
    if args.random_activations:
        weights, inputs, ntok = random_inputs(mdir, args.max_tokens)
        src = f"random Gaussian inputs ({ntok} tokens)"
    else:
        text = (DATA_DIR / "tinystories" / "tinystories_sample.txt").read_text()
        weights, inputs, ntok = layer_inputs(mdir, text, args.max_tokens)
        src = f"real activations, TinyStories sample ({ntok} tokens)"
    M = 4
    methods = {"magnitude": ("magnitude", NM(2, 4), {}), "wanda": ("wanda", NM(2, 4), {}),
               "ria": ("ria", NM(2, 4), {}), "sparsegpt": ("sparsegpt", NM(2, 4), {}),
               "eggs B=1": ("eggs", ExpanderNM(2, 4, 1), {"graph": False}),
               "eggs B=2": ("eggs", ExpanderNM(2, 4, 2), {"graph": False})}
    rows = {k: [] for k in methods}
    for lname, W in weights.items():
        p = LayerProblem.from_activations(W.to(torch.float64), inputs[lname].to(torch.float64), name=lname)
        f0 = p.constant()
        for label, (meth, pat, opts) in methods.items():
            res = get_method(meth)(p, pat, **opts)
            gm = graph_metrics(res.mask, M=M)
            gm.update(layer=lname, rel_error=p.objective(res.W) / f0 if f0 > 0 else 0.0,
                      tile_degree_hist=tile_degree_hist(res.mask, M),
                      in_degrees=res.mask.sum(0).tolist())
            rows[label].append(gm)

    print(f"stories260K, {len(weights)} linear layers, 2:4 masks, statistics: {src}")
    hdr = (f"{'method':<11} {'min in-deg':>10} {'min/(m/2)':>9} {'iso. inputs':>11} {'layers w/ iso':>13} "
           f"{'max comps':>9} {'tile col deg 0':>14} {'min tile deg':>12} {'σ2/bound':>9} {'rel. gap':>8} "
           f"{'rel. err':>8}")
    print(hdr)
    print("-" * len(hdr))
    summary = {}
    for label, rs in rows.items():
        zero = sum(r["tile_degree_hist"][0] for r in rs)
        cols = sum(sum(r["tile_degree_hist"]) for r in rs)
        s = {"min_in_degree": min(r["in_degree"]["min"] for r in rs),
             "min_in_degree_over_half_m": min(r["in_degree"]["min"] / (r["shape"][0] / 2) for r in rs),
             "isolated_inputs": sum(r["isolated_inputs"] for r in rs),
             "layers_with_isolated": sum(r["isolated_inputs"] > 0 for r in rs),
             "max_components": max(r["components"] for r in rs),
             "tile_columns_degree0_frac": zero / cols,
             "min_tile_degree": min(r["tile_min_degree"] for r in rs),
             "mean_sigma2_over_bound": sum(r["sigma2_over_bound"] for r in rs) / len(rs),
             "max_sigma2_over_bound": max(r["sigma2_over_bound"] for r in rs),
             "mean_relative_gap": sum(r["relative_gap"] for r in rs) / len(rs),
             "mean_rel_error": sum(r["rel_error"] for r in rs) / len(rs)}
        summary[label] = s
        print(f"{label:<11} {s['min_in_degree']:>10} {s['min_in_degree_over_half_m']:>9.2f} "
              f"{s['isolated_inputs']:>11} {s['layers_with_isolated']:>13} {s['max_components']:>9} "
              f"{s['tile_columns_degree0_frac']:>14.2%} {s['min_tile_degree']:>12} "
              f"{s['mean_sigma2_over_bound']:>9.3f} {s['mean_relative_gap']:>8.3f} {s['mean_rel_error']:>8.4f}")
    print("min/(m/2): smallest input degree relative to the average m/2; tile col deg 0: share of (tile, column) "
          "pairs with no kept entry; σ2/bound: second singular value over √(d_out−1)+√(d_in−1) (average degrees), "
          "mean over layers; rel. gap = 1 − σ2/σ1; rel. err = f(W)/f(0) mean over layers.")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    for label, rs in rows.items():
        normed = [d / (r["shape"][0] / 2) for r in rs for d in r["in_degrees"]]
        ax[0].hist(normed, bins=40, histtype="step", label=label, linewidth=1.4)
        h = torch.tensor([r["tile_degree_hist"] for r in rs]).sum(0).double()
        ax[1].plot(range(M + 1), (h / h.sum()).tolist(), marker="o", label=label)
        ax[2].plot(range(len(rs)), [r["sigma2_over_bound"] for r in rs], marker=".", linestyle="-", label=label)
    ax[0].set(title="input degree / (m/2), all layers", xlabel="normalised input degree", ylabel="inputs",
              yscale="log")
    ax[1].set(title="column degree inside 4×4 tiles", xlabel="kept entries of a column in a tile",
              ylabel="share of (tile, column)", yscale="log")
    ax[2].set(title="σ2 / Ramanujan bound per layer", xlabel="layer (block-major: q k v o gate up down)",
              ylabel="σ2 / (√(d_out−1)+√(d_in−1))")
    ax[2].axhline(1.0, color="k", linewidth=0.8, linestyle="--")
    for a in ax:
        a.legend(fontsize=7)
    fig.suptitle(f"stories260K 2:4 masks — {src}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"plot: {args.out}")
    if args.json:
        for rs in rows.values():
            for r in rs:
                r.pop("in_degrees", None)
        with open(args.json, "w") as f:
            json.dump({"source": src, "summary": summary, "layers": rows}, f, indent=1)
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
