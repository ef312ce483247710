"""The optprune command line. Every subcommand is a thin wrapper over the function of the same name in
:mod:`optprune.api`, with the same option names (``--sparsity`` ↔ ``sparsity=``)."""
from __future__ import annotations

import argparse
import json
import sys

from .catalog import SECTIONS


def _kv(items) -> dict:
    """``-O key=value`` pairs → dict, values parsed as JSON where possible (numbers, true/false, lists, dicts);
    ``-`` in a key reads as ``_``. A malformed pair or a key given twice is a ValueError (one line, exit 2)."""
    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        k = k.strip().replace("-", "_")
        if not sep or not k.isidentifier():
            raise ValueError(f"method option {it!r} is not key=value (e.g. -O refit=true)")
        if k in out:
            raise ValueError(f"method option {k!r} is given twice")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _check_method(method: str, options: dict) -> None:
    """The method exists and reads every ``-O`` option — checked before anything loads."""
    from .solvers.registry import get_method
    get_method(method).check_options(options)


def _add_data_args(p):
    p.add_argument("--data-dir", default=None,
                   help="folder with wikitext-2-raw/, ptb/, c4/ (default: $OPTPRUNE_DATA_DIR; layout in docs/protocols.md)")
    p.add_argument("--model-dir", default=None,
                   help="folder holding built-in models such as stories260K (default: $OPTPRUNE_MODEL_DIR)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)


def _add_eval_args(p):
    p.add_argument("--eval", dest="eval_datasets", default=None,
                   help="comma-separated evaluation texts: wikitext2, ptb, c4 (default from --protocol)")
    p.add_argument("--eval-seqlen", type=int, default=None)
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first K windows")
    p.add_argument("--reference", default=None,
                   help="dense model to compare next-token distributions with (KL divergence, top-1 agreement)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="optprune", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model layer by layer and save it")
    p.add_argument("--model", required=True, help="built-in name (stories260k, smollm2-135m), HF dir, hub id, or .gguf")
    p.add_argument("--method", required=True, help="magnitude, wanda, sparsegpt, ria, refit, fista, spap, eggs, ...")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured", help="unstructured, row, N:M (e.g. 2:4), groups")
    p.add_argument("--min-degree", type=int, default=None, help="expander N:M: keep ≥ B entries per column per tile")
    p.add_argument("--allocation", default="uniform", help="per-layer sparsity: uniform, alpha, owl")
    p.add_argument("--allocation-eps", type=float, default=None, help="alpha/owl: sparsities in [S(1-ε), S(1+ε)]")
    p.add_argument("--structure", default="mlp", help="structured methods: mlp, heads (query heads), heads:kv (whole key/value groups under GQA), or a comma list such as mlp,heads")
    p.add_argument("--mode", default="sequential", choices=["sequential", "dense-input"],
                   help="block inputs from the pruned model (sequential) or the dense model (independent blocks)")
    p.add_argument("--no-error-correction", dest="error_correction", action="store_false",
                   help="within a block, solve each sub-layer on dense inputs instead of pruned-upstream inputs")
    p.add_argument("--refit", action="store_true", help="finish every layer with the least-squares refit")
    p.add_argument("--calibration", default=None,
                   help="c4, wikitext2, ptb, self, or a text file (default: c4 if the data dir has it, else self)")
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--protocol", default=None, help="smoke, cpu or paper (docs/protocols.md): sets data and eval defaults")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes for block-parallel pruning (--mode dense-input; also runs under torchrun)")
    p.add_argument("--low-memory", action="store_true",
                   help="read one block at a time from the safetensors shards and write the output shard by shard")
    p.add_argument("--activation-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="--low-memory: dtype of the stored calibration activations (default: the model's)")
    p.add_argument("-O", "--method-opt", action="append", metavar="KEY=VALUE",
                   help="method option, repeatable; `optprune list methods` shows each method's options and defaults")
    p.add_argument("--certify", action="store_true",
                   help="per layer: a valid lower bound on the optimal error of its L0 program and the relative gap "
                        "of our solution (and FISTA's certified ℓ1 duality gap), in run.json and the summary")
    p.add_argument("--output", default=None, help="directory for the pruned model and run.json")
    p.add_argument("--no-eval", dest="evaluate", action="store_false")
    p.add_argument("--no-kl", dest="kl", action="store_false",
                   help="skip the data-free KL/top-1 against the dense model (held-out self-generated text)")
    _add_data_args(p)
    _add_eval_args(p)

    p = sub.add_parser("eval", help="perplexity (and KL to a reference) of any model, pruned or not")
    p.add_argument("--model", required=True)
    p.add_argument("--protocol", default=None)
    p.add_argument("--output", default=None, help="write the evaluation record here (JSON)")
    _add_data_args(p)
    _add_eval_args(p)

    p = sub.add_parser("verify", help="cross-check every (model, backend) pair on small instances")
    p.add_argument("--quick", action="store_true", help="a small set of instances (< 1 minute on 2 cores)")
    p.add_argument("--instances", type=int, default=None, help="instances per program (default 100; --quick: 4)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per reference solve (default 10; --quick: 3)")
    p.add_argument("--gurobi", dest="gurobi", action="store_true", default=None, help="require Gurobi")
    p.add_argument("--output", default=None, help="write the table as JSON here")
    _add_data_args(p)

    p = sub.add_parser("analyze", help="heavy-tailed spectra (α per layer), allocations and plots")
    p.add_argument("--model", required=True)
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--allocation", default="alpha")
    p.add_argument("--allocation-eps", type=float, default=None)
    p.add_argument("--output", default="analysis", help="directory for PNG plots and analysis.json")
    p.add_argument("--matrix", default=None, help="matrix whose ESD to plot (default: the first MLP down)")
    _add_data_args(p)

    p = sub.add_parser("list", help="list methods (with their options), patterns, backends or architectures")
    p.add_argument("what", nargs="?", choices=SECTIONS, default=None,
                   help="one of %(choices)s (default: all four)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            from .catalog import lines
            for i, what in enumerate([args.what] if args.what else SECTIONS):
                if not args.what:
                    print(("\n" if i else "") + f"{what}:")
                print("\n".join(lines(what)))
            return 0
        kw = {k: v for k, v in vars(args).items() if k != "command"}
        if "method_opt" in kw:
            kw["method_options"] = _kv(kw.pop("method_opt"))
        if args.command == "prune":
            _check_method(args.method, kw["method_options"])
        from . import api
        fn = {"prune": api.prune, "eval": api.evaluate, "verify": api.verify, "analyze": api.analyze}[args.command]
        fn(**kw, _cli=True)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        # bad input: one line naming the problem, nothing changed
        print(f"optprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
