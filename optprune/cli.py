"""The optprune command line. Every subcommand is a thin wrapper over the function of the same name in
:mod:`optprune.api`, with the same option names (``--sparsity`` ↔ ``sparsity=``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .catalog import SECTIONS

from .llm_adapters.description import SAVE_FORMAT_HELP, add_cli_options, cli_destinations  # noqa: F401


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option shows its default, unless its help already says what the default is."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h.lower() or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return h
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return h + " (default: off)" if action.default is False else h + " (default: on)"
        return h + " (default: %(default)s)"


def _common():
    c = argparse.ArgumentParser(add_help=False)
    g = c.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.ERROR,
                   default=argparse.SUPPRESS, help="errors only, no summary table (progress bars stay)")
    g.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                   default=argparse.SUPPRESS, help="debug logging")
    return c


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


def _check_method(method: str, options: dict, structure=None) -> None:
    """The method exists and reads every ``-O`` option — checked before anything loads."""
    if str(structure or "").strip().lower() == "depth":  # a block-selection rule, not a layer solver
        from .llm_adapters.depth import depth_rule
        depth_rule(method).check_options(options)
        return
    from .solvers.registry import get_method
    get_method(method).check_options(options)


#: the options ``optprune eval``, ``verify`` and ``analyze`` share with ``optprune prune`` (declared there)
DATA_OPTIONS = ("data_dir", "model_dir", "device", "seed")
EVAL_OPTIONS = ("eval_datasets", "eval_seqlen", "eval_windows", "reference")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    ap = argparse.ArgumentParser(prog="optprune", description=__doc__, formatter_class=_Formatter, parents=[common])
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name, **kw):
        return sub.add_parser(name, formatter_class=_Formatter, parents=[common], **kw)

    p = add("prune", help="prune a model layer by layer and save it")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML/JSON file of prune options (same names), or an llm-compressor recipe with a "
                        "SparseGPTModifier/WandaPruningModifier; flags given here override it (default: none)")
    p.add_argument("--replay", default=None, metavar="RUN_JSON",
                   help="reproduce the run recorded in this run.json (flags given here override it; default: none)")
    add_cli_options(p)  # every run option, from llm_adapters/description.py

    p = add("eval", help="perplexity, KL to a reference, lm-eval tasks of any model, pruned or not")
    p.add_argument("--model", required=True, help="built-in name, HF dir, optprune output (any --save-format), hub id, or .gguf")
    p.add_argument("--protocol", default=None, help="smoke, cpu or paper: evaluation defaults (default: the model's)")
    p.add_argument("--output", default=None, help="write the evaluation record here (JSON; default: not written)")
    p.add_argument("--tasks", default=None,
                   help="comma list of lm-evaluation-harness tasks (the eval extra; offline: local or cached task "
                        "data; default: none)")
    p.add_argument("--include-path", default=None, help="folder of custom lm-eval task YAML files (default: none)")
    p.add_argument("--task-limit", type=int, default=None, help="examples per task (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: automatic)")
    add_cli_options(p, DATA_OPTIONS + EVAL_OPTIONS)

    p = add("verify", help="cross-check every (model, backend) pair on small instances")
    p.add_argument("--quick", action="store_true", help="a small set of instances (< 1 minute on 2 cores)")
    p.add_argument("--instances", type=int, default=None, help="instances per program (default 100; --quick: 4)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per reference solve (default 10; --quick: 3)")
    p.add_argument("--gurobi", dest="gurobi", action="store_true", default=None,
                   help="require Gurobi (default: use it where installed and licensed)")
    p.add_argument("--output", default=None, help="write the table as JSON here (default: not written)")
    p.add_argument("--programs", default=None,
                   help="only programs whose label contains one of these comma-separated strings, e.g. EIG or "
                        "'L0 groups' (default: all)")
    add_cli_options(p, DATA_OPTIONS)

    p = add("analyze", help="heavy-tailed spectra (α per layer), allocations and plots")
    p.add_argument("--model", required=True, help="built-in name, HF dir, hub id, or .gguf")
    p.add_argument("--sparsity", type=float, default=0.7, help="mean sparsity the allocations distribute")
    p.add_argument("--allocation", default="alpha", help="alpha, owl or uniform")
    p.add_argument("--allocation-eps", type=float, default=None,
                   help="sparsities within [S(1-ε), S(1+ε)] (default: the allocation's)")
    p.add_argument("--output", default="analysis", help="directory for PNG plots and analysis.json")
    p.add_argument("--matrix", default=None, help="matrix whose ESD to plot (default: the first MLP down)")
    add_cli_options(p, DATA_OPTIONS)

    p = sub.add_parser("list", help="list methods (with their options), patterns, backends or architectures")
    p.add_argument("what", nargs="?", choices=SECTIONS, default=None,
                   help="one of %(choices)s (default: all four)")
    return ap


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (not the one at set-up), so redirected or captured stderr works."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _setup_logging(level) -> None:
    log = logging.getLogger("optprune")
    if not any(getattr(h, "_optprune_cli", False) for h in log.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("[optprune] %(message)s"))
        h._optprune_cli = True
        log.addHandler(h)
        log.propagate = False
    log.setLevel(level)


def _explicit(argv, command) -> set:
    """Destinations of the options given on the command line (not defaults): they override --config/--replay."""
    ap = build_parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for a in sub._actions:
        a.default = argparse.SUPPRESS
        a.required = False
    return set(vars(ap.parse_args(argv)).keys()) - {"command"}


def _prune_kwargs(args, argv) -> tuple:
    """The keyword arguments of :func:`optprune.llm_adapters.run.prune` from the command line, over those of
    ``--replay`` and ``--config`` (explicit flags win; ``-O`` adds to the file's method options)."""
    from .llm_adapters import recipes
    names = cli_destinations()  # --dataset → calibration, -O/--method-opt → method_options
    kw = {names.get(k, k): v for k, v in vars(args).items() if k not in ("command", "log_level", "config", "replay")}
    kw["method_options"] = _kv(kw["method_options"])
    explicit = {names.get(k, k) for k in _explicit(argv, "prune")}
    base, infos = {}, []
    if args.replay:
        r, info = recipes.replay_kwargs(args.replay)
        base.update(r)
        infos.append(info)
    if args.config:
        c, info = recipes.config_kwargs(args.config)
        base.update(c)
        infos.append(info)
    for k, v in base.items():
        k = names.get(k, k)
        if k == "method_options":  # -O KEY=VALUE adds to / overrides the file's options
            kw[k] = {**(v or {}), **kw[k]} if k in explicit else v
        elif k not in explicit:
            kw[k] = v
    for need in ("model", "method"):
        if not kw.get(need):
            raise ValueError(f"--{need} is required (on the command line, in --config or from --replay)")
    return kw, infos


def _interrupted(args, code: int) -> int:
    """One line: what stopped the run and how to continue it."""
    from .llm_adapters.checkpoint import default_checkpoint_dir
    ck = getattr(args, "checkpoint_dir", None) or (default_checkpoint_dir(Path(args.output))
                                                   if getattr(args, "output", None) else None)
    if args.command == "prune" and ck and Path(ck, "manifest.json").is_file():
        hint = f"checkpoint kept in {ck}; run the same command with --resume to continue"
    else:
        hint = "the output was not touched; run the command again to start over"
    print(f"optprune {args.command}: interrupted ({ {130: 'SIGINT', 143: 'SIGTERM'}.get(code, code) }); {hint}",
          file=sys.stderr)
    return code


def main(argv=None) -> int:
    try:  # Ctrl-C / SIGTERM from here on stop the run cleanly (exit 130 / 143), never swallowed
        from .llm_adapters.checkpoint import Interrupted, install_signal_handlers, interrupted_signal
        install_signal_handlers()
    except ImportError:  # pragma: no cover - without the LLM extras
        Interrupted, interrupted_signal = KeyboardInterrupt, (lambda: None)
    import signal
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser().parse_args(argv)
        level = getattr(args, "log_level", logging.INFO)
        _setup_logging(level)
        try:
            if args.command == "list":
                from .catalog import lines
                for i, what in enumerate([args.what] if args.what else SECTIONS):
                    if not args.what:
                        print(("\n" if i else "") + f"{what}:")
                    print("\n".join(lines(what)))
                return 0
            if args.command == "prune":
                kw, infos = _prune_kwargs(args, argv)
                _check_method(kw["method"], kw["method_options"], kw.get("structure"))
                for info in infos:
                    logging.getLogger("optprune").info(f"{info['kind']}: {info['path']}")
                rec = _run_prune(**kw, verbose=level < logging.ERROR, _cli=True)
                replay = next((i for i in infos if i["kind"] == "replay"), None)
                got = ((rec or {}).get("calibration") or {}).get("sha256")
                if replay and replay.get("recorded_calibration_sha256") and got != replay["recorded_calibration_sha256"]:
                    logging.getLogger("optprune").warning(
                        f"the replay's calibration tokens differ from the recorded run's ({got} vs "
                        f"{replay['recorded_calibration_sha256']}): data or tokenizer changed")
                return 0
            kw = {k: v for k, v in vars(args).items() if k not in ("command", "log_level")}
            if args.command == "eval":
                from .llm_adapters.run import evaluate as _evaluate
                _evaluate(**kw, verbose=level < logging.ERROR, _cli=True)
            else:
                _call_plain(args.command, kw)
        except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
            if interrupted_signal() is not None:  # a library turned the signal into an error: still an interruption
                return _interrupted(args, 128 + interrupted_signal())
            # bad input: one line naming the problem, nothing changed
            print(f"optprune {args.command}: error: {e}", file=sys.stderr)
            return 2
        except Interrupted as e:
            return _interrupted(args, e.exit_code)
        except KeyboardInterrupt:
            return _interrupted(args, 130)
        if interrupted_signal() is not None:  # caught and dropped by a library: still stop
            return _interrupted(args, 128 + interrupted_signal())
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_prune(**kw):
    """``optprune prune``: the engine's run of these options (what :func:`optprune.llm_adapters.run.prune` does
    for Python callers): resolved and checked, pruned, evaluated, saved to --output."""
    from .llm_adapters.engine import PruneRun
    return PruneRun(**kw).run()


def _call_plain(command: str, kw: dict):
    if command == "verify":
        from .solvers.verification import verify as fn
    else:
        from .llm_adapters.analysis import analyze as fn
    return fn(**kw, _cli=True)


if __name__ == "__main__":
    sys.exit(main())
