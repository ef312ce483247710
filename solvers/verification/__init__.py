"""Verification: the cross-check of every program against its production solvers and reference backends
(docs/methods.md §6) and the certificates of a pruned layer (lower bounds and duality gaps, §8).

* :mod:`.harness` — :func:`verify` (``optprune verify``): draws the instances, solves every case, reports;
* :mod:`.instances` — the instance families; :mod:`.cases` — the programs of an instance and their production
  solvers, from the registry; :mod:`.judging` — verdicts against the proven optima, pair statistics, tables;
* :mod:`.certificates` — lower bounds on a layer's L0 optimum, used by ``--certify``.
"""
from .cases import CANONICAL_PATTERNS, Case, Producer, build_cases, l1_lambda, verify_pattern
from .harness import Runner, VerificationError, select_backends, verify
from .instances import FAMILIES, InstanceFactory
from .judging import CONVEX_RTOL, EXACT_RTOL, format_pairs, judge, pair_stats

__all__ = ["verify", "VerificationError", "Runner", "select_backends", "build_cases", "Case", "Producer",
           "CANONICAL_PATTERNS", "verify_pattern", "l1_lambda", "FAMILIES", "InstanceFactory", "CONVEX_RTOL",
           "EXACT_RTOL", "judge", "pair_stats", "format_pairs"]
