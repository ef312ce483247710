"""What a weight-only structured score throws away: the input energy of the MLP neurons that group magnitude
removes from each block (dense inputs, no pruning applied).

Group magnitude ranks neuron ``j`` by ``‖w_j‖²`` (the ``down_proj`` column) and never looks at the activation
energy ``h_j = Σ x_j²`` that multiplies it. This prints, per block, the share of ``Σ_j ‖w_j‖² h_j`` (the output
energy the layer's diagonal carries) in the removed neurons, how large the largest removed ``h_j`` is against
the median, and whether the neuron carrying the most output energy is among the removed.

    python benchmarks/structured/group_magnitude_energy.py --model smollm2-135m --sparsity 0.3 --nsamples 8
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.3, help="fraction of MLP neurons removed per block")
    ap.add_argument("--nsamples", type=int, default=8, help="C4 calibration sequences")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if not 0 <= args.sparsity < 1:
        raise SystemExit(f"--sparsity must be in [0, 1), got {args.sparsity}")
    from optprune.llm_adapters.architectures import get_arch
    from optprune.llm_adapters.data import calibration_tokens
    from optprune.llm_adapters.loading import load_model
    from optprune.llm_adapters.surgery import capture_problems, structure_pattern
    from optprune.solvers import get_method
    torch.set_num_threads(args.threads)
    model, tok, _ = load_model(args.model)
    ids = calibration_tokens(tok, "c4", nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    print("| block | removed share of Σ‖w_j‖²h_j | largest removed h_j / median h | largest h_j / median h "
          "| top-energy neuron removed |\n|---|---|---|---|---|")
    hit = 0
    arch, magnitude = get_arch(model), get_method("group_magnitude")
    for i, p in enumerate(capture_problems(model, ids, kind="mlp", batch_size=4)):
        _, pat = structure_pattern(model, arch, i, "mlp", args.sparsity)
        removed = ~pat.kept_groups_of(magnitude(p, pat).mask)  # one group = one neuron = one down_proj column
        W, h = p.W0.double(), p.H.diagonal().double()
        energy = (W * W).sum(0) * h
        top = bool(removed[energy.argmax()])
        hit += top
        print(f"| {i} | {float(energy[removed].sum() / energy.sum()):.3f} | {float(h[removed].max() / h.median()):.1f} "
              f"| {float(h.max() / h.median()):.1f} | {'yes' if top else 'no'} |")
    print(f"\nthe neuron carrying the most output energy is removed in {hit} blocks")


if __name__ == "__main__":
    main()
