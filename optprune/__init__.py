"""optprune: post-training pruning of LLMs where every method is a mathematical program.

Public face: :func:`prune`, :func:`save`, :func:`evaluate`, :func:`verify`, :func:`analyze` (same names as the CLI).
"""
__version__ = "0.1.0"

from .api import analyze, evaluate, prune, save, verify  # noqa: E402

__all__ = ["prune", "save", "evaluate", "verify", "analyze", "__version__"]
