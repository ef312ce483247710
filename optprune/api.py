"""The Python API. Each function has the same name and options as its CLI subcommand.

``prune`` and ``evaluate`` live in :mod:`optprune.llm_adapters.run`; ``verify`` in
:mod:`optprune.solvers.verify`; ``analyze`` in :mod:`optprune.llm_adapters.analysis`. They are imported
lazily so that ``import optprune`` works without the LLM extras.
"""
from __future__ import annotations


def prune(**kw):
    from .llm_adapters.run import prune as _prune
    return _prune(**kw)


def evaluate(**kw):
    from .llm_adapters.run import evaluate as _evaluate
    return _evaluate(**kw)


def verify(**kw):
    from .solvers.verify import verify as _verify
    return _verify(**kw)


def analyze(**kw):
    from .llm_adapters.analysis import analyze as _analyze
    return _analyze(**kw)
