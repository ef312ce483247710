"""Sparsity patterns as constraint objects (docs/methods.md §0).

A *mask* is a boolean tensor of the weight's shape (m, n); ``True`` means the weight is **kept**.
Every pattern offers:

* ``validate(shape)``      — raise :class:`PatternError` (a ``ValueError``) with a one-line message;
* ``project(scores)``      — the feasible mask with the largest total score (exact for these sets);
* ``project_weights(W)``   — ``W`` with the pruned entries set to zero (projection by magnitude);
* ``is_feasible(mask)``    — whether a mask satisfies the pattern;
* ``constraints(shape)``   — its rows for a solver: :class:`LinearRow` objects over the binary keep
  variables ``z`` (flattened row-major, size m·n) and the pattern's auxiliary variables.

A **pattern kind is one class** decorated with :func:`register_pattern`: it names its kinds (``kinds``), says
how users write it (``syntax``), and parses the user's string in :meth:`Pattern.parse`. :func:`parse_pattern`
asks every registered class in turn, so adding a kind touches nothing else (docs/extending.md).

The expander N:M pattern's projection is a registered hook filled in by the EGGS solver
(:func:`register_projection`), so ``formulations`` never imports a solver.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = [
    "PatternError", "PatternRegistrationError", "LinearRow", "Pattern", "Unstructured", "NM", "ColumnGroups",
    "ExpanderNM", "parse_pattern", "register_pattern", "pattern_kinds", "pattern_classes", "pattern_kind",
    "discover_patterns", "pattern_load_errors", "definition_site",
    "register_projection", "check_sparsity",
]


class PatternError(ValueError):
    """An impossible or malformed sparsity request (bad sparsity, N > M, width not divisible by M...)."""


class PatternRegistrationError(TypeError):
    """A pattern class that cannot be registered (kind taken, malformed kind name, a method not provided)."""


def check_sparsity(s: float, what: str = "sparsity") -> float:
    try:
        s = float(s)
    except (TypeError, ValueError):
        raise PatternError(f"{what} must be a number in [0, 1), got {s!r}") from None
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise PatternError(f"{what} must be in [0, 1), got {s}")
    return s


@dataclass
class LinearRow:
    """``Σ_t coef_t · var_t[idx_t]  (sense)  rhs`` with sense in {'<=', '==', '>='}.

    ``terms`` is a list of ``(variable name, flat indices, coefficients)``; the mask variable is ``"z"``.
    """

    terms: list
    sense: str
    rhs: float

    def evaluate(self, values: dict) -> float:
        tot = 0.0
        for var, idx, coef in self.terms:
            v = torch.as_tensor(values[var]).reshape(-1).to(torch.float64)
            tot += float((v[torch.as_tensor(idx)] * torch.as_tensor(coef, dtype=torch.float64)).sum())
        return tot

    def satisfied(self, values: dict, tol: float = 1e-9) -> bool:
        lhs = self.evaluate(values)
        return {"<=": lhs <= self.rhs + tol, ">=": lhs >= self.rhs - tol,
                "==": abs(lhs - self.rhs) <= tol}[self.sense]


def _ones(k: int) -> torch.Tensor:
    return torch.ones(k, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ pattern registry
_PATTERNS: dict[type, type] = {}  # class -> class, in registration order (parse_pattern asks them in turn)
_KINDS: dict[str, type] = {}      # kind name -> class
_KIND_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")
ENTRY_POINT_GROUP = "optprune.patterns"
_discovered = {"done": False, "errors": {}}


def definition_site(obj) -> tuple:
    """(source file, qualified name) of a class or function: the same definition imported twice (under two
    module names, or a re-import) has the same site and may register again; a different one under a taken
    name may not. The method and backend registries use it too."""
    import os
    import sys
    f = getattr(sys.modules.get(obj.__module__), "__file__", None)
    return (os.path.realpath(f) if f else obj.__module__, obj.__qualname__)


def register_pattern(cls):
    """Class decorator: register a :class:`Pattern` subclass under its ``kinds``. A kind already taken by a
    different class, a malformed kind name, or a missing ``parse``/``project``/``is_feasible``/``constraints``/
    ``kept_count`` raise :class:`PatternRegistrationError`."""
    if not (isinstance(cls, type) and issubclass(cls, Pattern)):
        raise PatternRegistrationError(f"register_pattern takes a Pattern subclass, got {cls!r}")
    kinds = cls.__dict__.get("kinds")
    if not kinds or isinstance(kinds, str):
        raise PatternRegistrationError(f"pattern class {cls.__qualname__} must declare kinds = ('name', ...) itself")
    missing = [m for m in ("parse", "project", "is_feasible", "constraints", "kept_count")
               if getattr(cls, m) is getattr(Pattern, m)]
    if missing:
        raise PatternRegistrationError(f"pattern class {cls.__qualname__} does not define {', '.join(missing)}")
    for kind in kinds:
        if not isinstance(kind, str) or not _KIND_RE.match(kind):
            raise PatternRegistrationError(f"pattern kind {kind!r} of {cls.__qualname__}: use lower-case letters, "
                                           f"digits, '_' or '-'")
        other = _KINDS.get(kind)
        if other is not None and definition_site(other) != definition_site(cls):
            raise PatternRegistrationError(f"pattern kind {kind!r} is already registered by "
                                           f"{other.__module__}.{other.__qualname__}; registered kinds: "
                                           f"{', '.join(_KINDS)}")
    for old in [c for c in _PATTERNS if definition_site(c) == definition_site(cls)]:  # the same class, re-imported
        del _PATTERNS[old]
    _PATTERNS[cls] = cls
    for kind in kinds:
        _KINDS[kind] = cls
    return cls


def _discover(force: bool = False) -> None:
    """Load pattern classes that third-party packages declare under the ``optprune.patterns`` entry-point group
    (once; ``force`` reads them again). A plug-in that fails to import is recorded in
    :func:`pattern_load_errors` and warned about."""
    if _discovered["done"] and not force:
        return
    _discovered["done"] = True
    import warnings
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except PatternRegistrationError:
            raise
        except Exception as e:  # a broken plug-in must not break optprune, but it is reported
            _discovered["errors"][ep.value] = f"{type(e).__name__}: {e}"
            warnings.warn(f"optprune: pattern plug-in {ep.value!r} failed to import: {type(e).__name__}: {e}",
                          stacklevel=2)


discover_patterns = _discover


def pattern_load_errors() -> dict:
    """Plug-in pattern modules that failed to import: entry-point value -> one-line error."""
    _discover()
    return dict(_discovered["errors"])


def pattern_kinds() -> list[str]:
    """Every registered pattern kind (the names methods list in ``register_method(patterns=...)``)."""
    _discover()
    return list(_KINDS)


def pattern_classes() -> list[type]:
    _discover()
    return list(_PATTERNS)


def pattern_registries() -> tuple[dict, dict]:
    """The registries themselves — class → class and kind → class — for a snapshot that restores them
    (:func:`optprune.solvers.registry.isolated`)."""
    return _PATTERNS, _KINDS


def pattern_class(kind: str) -> type:
    """The class registered under ``kind``; :class:`PatternError` naming the registered kinds otherwise."""
    _discover()
    if kind not in _KINDS:
        raise PatternError(f"unknown pattern kind {kind!r}; registered kinds: {', '.join(_KINDS)}")
    return _KINDS[kind]


def pattern_kind(p: Pattern) -> str:
    """The registry kind of a pattern object."""
    return p.kind


def _syntaxes() -> str:
    return ", ".join(f"'{c.syntax}'" if c.syntax else f"'{c.kinds[0]}'" for c in _PATTERNS)


class Pattern:
    """Base class of every sparsity pattern. A subclass registered with :func:`register_pattern` declares:

    * ``kinds`` — the kind names it registers (what methods list in ``register_method(patterns=...)``);
      ``kind`` (an instance property) is the one an instance is, by default ``kinds[0]``;
    * ``syntax`` — how the user writes it (shown by ``optprune list patterns`` and in errors);
    * ``params`` — the :func:`parse_pattern` keyword parameters it reads (e.g. ``min_degree``);
    * :meth:`parse` — the pattern the user string denotes, or ``None`` when the string is not its syntax;
    * ``project``, ``is_feasible``, ``constraints``, ``kept_count`` (and ``validate``, ``describe``).
    """
    name = "pattern"
    kinds: tuple = ()
    syntax: str = ""
    params: tuple = ()

    @property
    def kind(self) -> str:
        return type(self).kinds[0] if type(self).kinds else self.name

    @classmethod
    def parse(cls, text: str, sparsity: Optional[float] = None, **params) -> Optional["Pattern"]:
        """The pattern ``text`` (lower-cased, stripped) denotes, or ``None`` if it is not this class's syntax."""
        return None

    #: auxiliary integer variables a solver must create: name -> size (given the shape)
    def aux_variables(self, shape) -> dict:
        return {}

    def validate(self, shape) -> None:  # pragma: no cover - overridden
        pass

    def project(self, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project_weights(self, W: torch.Tensor) -> torch.Tensor:
        return W * self.project(W.abs())

    def is_feasible(self, mask: torch.Tensor) -> bool:
        raise NotImplementedError

    def constraints(self, shape) -> list[LinearRow]:
        raise NotImplementedError

    def kept_count(self, shape) -> int:
        """Number of weights a feasible mask keeps at most."""
        raise NotImplementedError

    def target_sparsity(self, shape) -> float:
        m, n = shape
        return 1.0 - self.kept_count(shape) / (m * n)

    def describe(self) -> dict:
        return {"pattern": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


_MATRIX_WORDS = ("unstructured", "matrix", "per-matrix")
_ROW_WORDS = ("row", "per-row", "unstructured-row")


@register_pattern
class Unstructured(Pattern):
    """At most ``k = numel − ⌊s·numel⌋`` nonzeros per matrix (scope='matrix') or per row (scope='row')."""

    kinds = ("unstructured", "row")
    syntax = "unstructured | row"

    @property
    def kind(self) -> str:
        return "row" if self.scope == "row" else "unstructured"

    @classmethod
    def parse(cls, text, sparsity=None, **params):
        if text in _MATRIX_WORDS or text in _ROW_WORDS:
            return cls(0.5 if sparsity is None else sparsity, "row" if text in _ROW_WORDS else "matrix")
        return None

    def __init__(self, sparsity: float, scope: str = "matrix"):
        self.sparsity = check_sparsity(sparsity)
        if scope not in ("matrix", "row"):
            raise PatternError(f"unstructured scope must be 'matrix' or 'row', got {scope!r}")
        self.scope = scope
        self.name = "unstructured" if scope == "matrix" else "unstructured-row"

    def describe(self):
        return {"pattern": "unstructured", "sparsity": self.sparsity, "scope": self.scope}

    def validate(self, shape):
        if len(shape) != 2:
            raise PatternError(f"a weight matrix is 2-D, got shape {tuple(shape)}")

    def prune_count(self, count: int) -> int:
        """How many of ``count`` weights are pruned: ⌊sparsity·count⌋."""
        return int(self.sparsity * count)

    def kept_count(self, shape) -> int:
        m, n = shape
        if self.scope == "row":
            return m * (n - self.prune_count(n))
        return m * n - self.prune_count(m * n)

    def project(self, scores):
        self.validate(scores.shape)
        m, n = scores.shape
        mask = torch.ones(m, n, dtype=torch.bool, device=scores.device)
        if self.scope == "row":
            p = self.prune_count(n)
            if p:
                idx = torch.topk(scores, p, dim=1, largest=False).indices
                mask.scatter_(1, idx, False)
        else:
            p = self.prune_count(m * n)
            if p:
                idx = torch.topk(scores.reshape(-1), p, largest=False).indices
                mask.view(-1)[idx] = False
        return mask

    def is_feasible(self, mask):
        m, n = mask.shape
        if self.scope == "row":
            return bool((mask.sum(1) <= n - self.prune_count(n)).all())
        return int(mask.sum()) <= self.kept_count(mask.shape)

    def constraints(self, shape):
        m, n = shape
        if self.scope == "row":
            k = n - self.prune_count(n)
            return [LinearRow([("z", torch.arange(i * n, (i + 1) * n), _ones(n))], "<=", k) for i in range(m)]
        return [LinearRow([("z", torch.arange(m * n), _ones(m * n))], "<=", self.kept_count(shape))]


_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@register_pattern
class NM(Pattern):
    """N:M: in every row, each consecutive group of M input columns keeps at most N."""

    kinds = ("nm",)
    syntax = "N:M, e.g. 2:4"

    @classmethod
    def parse(cls, text, sparsity=None, min_degree=None, **params):
        mt = _NM_RE.match(text)
        if mt is None or min_degree is not None:  # with a minimum degree it is the expander kind
            return None
        return cls(int(mt.group(1)), int(mt.group(2)))

    def __init__(self, n: int, m: int):
        n, m = int(n), int(m)
        if m < 1 or n < 1:  # N = 0 would prune everything (sparsity 1)
            raise PatternError(f"N:M needs M ≥ 1 and N ≥ 1, got {n}:{m}")
        if n > m:
            raise PatternError(f"N:M needs N ≤ M, got {n}:{m}")
        self.N, self.M = n, m
        self.name = f"{n}:{m}"
        self.sparsity = 1.0 - n / m

    def describe(self):
        return {"pattern": "N:M", "N": self.N, "M": self.M, "sparsity": self.sparsity}

    def validate(self, shape):
        if len(shape) != 2:
            raise PatternError(f"a weight matrix is 2-D, got shape {tuple(shape)}")
        if shape[1] % self.M:
            raise PatternError(f"{self.name} needs the layer width (input columns) divisible by M={self.M}, "
                               f"got {shape[1]}")

    def kept_count(self, shape):
        return shape[0] * shape[1] * self.N // self.M

    def project(self, scores):
        self.validate(scores.shape)
        m, n = scores.shape
        g = scores.reshape(m, n // self.M, self.M)
        mask = torch.zeros_like(g, dtype=torch.bool)
        if self.N:
            idx = torch.topk(g, self.N, dim=2).indices
            mask.scatter_(2, idx, True)
        return mask.reshape(m, n)

    def is_feasible(self, mask):
        self.validate(mask.shape)
        m, n = mask.shape
        return bool((mask.reshape(m, n // self.M, self.M).sum(2) <= self.N).all())

    def constraints(self, shape):
        self.validate(shape)
        return _group_rows(shape, self.M, "<=", self.N)



def _group_rows(shape, M: int, sense: str, rhs: int) -> list:
    """One row per group of ``M`` consecutive entries of each row of the mask ``z``: their sum (sense) ``rhs``."""
    m, n = shape
    return [LinearRow([("z", torch.arange(i * n + b, i * n + b + M), _ones(M))], sense, rhs)
            for i in range(m) for b in range(0, n, M)]

@register_pattern
class ColumnGroups(Pattern):
    """Structured: input columns are partitioned into groups; keep ``k`` groups (whole columns).

    ``groups`` is either a group size (consecutive blocks of that many columns: an attention head is
    ``head_dim`` columns of ``o_proj``) or an explicit list of column-index lists. Give ``keep`` (a count)
    or ``sparsity`` (the fraction of groups removed, ``k = g − ⌊s·g⌋``).
    Auxiliary variable ``g`` (one binary per group); the keep variable ``z_ij`` equals ``g_{group(j)}``.
    """

    kinds = ("groups",)
    syntax = "groups"
    params = ("group_size",)

    @classmethod
    def parse(cls, text, sparsity=None, group_size=None, **params):
        if text not in ("groups", "structured"):
            return None
        if sparsity is None:
            raise PatternError("pattern 'groups' needs a sparsity (fraction of groups removed)")
        return cls(group_size or 1, sparsity=sparsity)

    def __init__(self, groups: Union[int, Sequence[Sequence[int]]], *, keep: Optional[int] = None,
                 sparsity: Optional[float] = None, n: Optional[int] = None):
        self._size = groups if isinstance(groups, int) else None
        self._groups = None if isinstance(groups, int) else [list(map(int, gr)) for gr in groups]
        if (keep is None) == (sparsity is None):
            raise PatternError("ColumnGroups needs exactly one of keep= or sparsity=")
        self.sparsity = None if sparsity is None else check_sparsity(sparsity)
        self._keep = keep
        self.name = "groups"
        if n is not None:
            self.validate((1, n))

    def group_list(self, n: int) -> list[list[int]]:
        if self._groups is not None:
            return self._groups
        return [list(range(b, b + self._size)) for b in range(0, n, self._size)]

    def n_groups(self, n: int) -> int:
        if self._groups is None:  # consecutive blocks of _size columns: counted, not listed
            return -(-n // self._size)
        return len(self._groups)

    def keep_groups(self, n: int) -> int:
        g = self.n_groups(n)
        if self._keep is not None:
            return int(self._keep)
        return g - int(self.sparsity * g)

    def describe(self):
        return {"pattern": "groups", "group_size": self._size, "keep": self._keep, "sparsity": self.sparsity}

    def validate(self, shape):
        n = shape[1]
        if self._size is not None:
            if self._size < 1 or n % self._size:
                raise PatternError(f"group size {self._size} does not divide the layer width {n}")
        else:
            flat = sorted(j for gr in self._groups for j in gr)
            if flat != list(range(n)):
                raise PatternError(f"column groups must partition the {n} input columns exactly once")
        k, g = (self._keep if self._keep is not None else 0), self.n_groups(n)
        if self._keep is not None and not (0 < k <= g):
            raise PatternError(f"keep must be in [1, {g}] groups, got {k}")

    def kept_count(self, shape):
        m, n = shape
        sizes = sorted((len(gr) for gr in self.group_list(n)), reverse=True)
        return m * sum(sizes[: self.keep_groups(n)])

    def group_index(self, n: int) -> torch.Tensor:
        gi = torch.empty(n, dtype=torch.long)
        for k, gr in enumerate(self.group_list(n)):
            gi[gr] = k
        return gi

    def group_scores(self, scores: torch.Tensor) -> torch.Tensor:
        n = scores.shape[1]
        gi = self.group_index(n).to(scores.device)
        return torch.zeros(self.n_groups(n), dtype=scores.dtype, device=scores.device).index_add_(
            0, gi, scores.sum(0))

    def mask_from_groups(self, keep: torch.Tensor, m: int, n: int) -> torch.Tensor:
        """Column mask (m, n) from a boolean per-group vector."""
        gi = self.group_index(n).to(keep.device)
        return keep[gi].unsqueeze(0).expand(m, -1).clone()

    def project(self, scores):
        self.validate(scores.shape)
        m, n = scores.shape
        gs = self.group_scores(scores)
        keep = torch.zeros(gs.numel(), dtype=torch.bool, device=scores.device)
        keep[torch.topk(gs, self.keep_groups(n)).indices] = True
        return self.mask_from_groups(keep, m, n)

    def kept_groups_of(self, mask: torch.Tensor) -> torch.Tensor:
        gi = self.group_index(mask.shape[1]).to(mask.device)
        cols = mask.any(0)
        return torch.zeros(self.n_groups(mask.shape[1]), dtype=torch.bool, device=mask.device).index_put_(
            (gi,), cols, accumulate=True)

    def is_feasible(self, mask):
        self.validate(mask.shape)
        return int(self.kept_groups_of(mask).sum()) <= self.keep_groups(mask.shape[1])

    def aux_variables(self, shape):
        return {"g": self.n_groups(shape[1])}

    def constraints(self, shape):
        self.validate(shape)
        m, n = shape
        rows = [LinearRow([("g", torch.arange(self.n_groups(n)), _ones(self.n_groups(n)))], "==",
                          self.keep_groups(n))]
        for k, gr in enumerate(self.group_list(n)):
            for i in range(m):  # z_ij − g_k ≤ 0 : a weight is usable only if its group is kept
                for j in gr:
                    rows.append(LinearRow([("z", [i * n + j], [1.0]), ("g", [k], [-1.0])], "<=", 0.0))
        return rows


_PROJECTIONS: dict[str, Callable] = {}


def register_projection(name: str, fn: Callable) -> None:
    """Solvers register exact projections for patterns whose projection is a combinatorial problem."""
    _PROJECTIONS[name] = fn


@register_pattern
class ExpanderNM(NM):
    """N:M per row plus connectivity: in every tile of M rows × M columns each column keeps ≥ B.

    (EGGS-PTP, docs/methods.md §5, reconstructed.) Each row of a tile keeps exactly N of its M columns.
    The projection is the tile transportation problem; the EGGS solver registers it (``"expander_nm"``).
    """

    kinds = ("expander",)
    syntax = "N:M with min_degree B (CLI --min-degree)"
    params = ("min_degree",)

    @classmethod
    def parse(cls, text, sparsity=None, min_degree=None, **params):
        mt = _NM_RE.match(text)
        if mt is None or min_degree is None:
            return None
        return cls(int(mt.group(1)), int(mt.group(2)), min_degree)

    def __init__(self, n: int, m: int, min_degree: int = 1):
        super().__init__(n, m)
        b = int(min_degree)
        if b < 0 or b > n:
            raise PatternError(f"expander N:M needs 0 ≤ B ≤ N, got B={b} with {n}:{m}")
        self.B = b
        self.name = f"expander-{n}:{m}"

    def describe(self):
        d = super().describe()
        d.update(pattern="expander-N:M", min_degree=self.B)
        return d

    def validate(self, shape):
        super().validate(shape)
        if shape[0] % self.M:
            raise PatternError(f"{self.name} tiles M={self.M} output rows at a time; the layer has {shape[0]} "
                               f"rows, not divisible by {self.M}")

    def project(self, scores):
        self.validate(scores.shape)
        fn = _PROJECTIONS.get("expander_nm")
        if fn is None:
            raise NotImplementedError("no expander N:M projection registered (import optprune.solvers.methods.eggs)")
        return fn(scores, self.N, self.M, self.B)

    def is_feasible(self, mask):
        self.validate(mask.shape)
        m, n = mask.shape
        t = mask.reshape(m // self.M, self.M, n // self.M, self.M)  # (row tile, row, col tile, col)
        rows_ok = (t.sum(3) == self.N).all()
        cols_ok = (t.sum(1) >= self.B).all()
        return bool(rows_ok and cols_ok)

    def constraints(self, shape):
        self.validate(shape)
        m, n = shape
        rows = _group_rows(shape, self.M, "==", self.N)
        for r0 in range(0, m, self.M):
            for j in range(n):
                idx = torch.arange(r0, r0 + self.M) * n + j
                rows.append(LinearRow([("z", idx, _ones(self.M))], ">=", self.B))
        return rows


def parse_pattern(pattern: Optional[str], sparsity: Optional[float] = None, *, min_degree: Optional[int] = None,
                  group_size: Optional[int] = None, quant: Optional[str] = None, **params) -> Pattern:
    """The pattern named by the CLI/API string: "unstructured", "row", "N:M" (e.g. "2:4"; with ``min_degree``
    the expander N:M), "groups", or any registered kind's syntax. ``params`` (``None`` values ignored) go to the
    matching class; one that it does not read is an error naming the kinds that do. ``quant`` (``--quant``,
    e.g. "w4g128") puts every kept weight on that quantization grid (formulations/grid.py)."""
    _discover()
    if quant is not None:  # the grid kind (formulations/grid.py, registered on import) wraps the base pattern
        grid = _KINDS.get("grid")
        if grid is None:
            raise PatternError("quantization grids are not registered (import optprune.formulations)")
        base = parse_pattern(pattern, 0.0 if sparsity is None else sparsity, min_degree=min_degree,
                             group_size=group_size, **params)
        return grid(base, quant)
    text = (pattern or "unstructured").strip().lower()
    given = {k: v for k, v in dict(params, min_degree=min_degree, group_size=group_size).items() if v is not None}
    for cls in _PATTERNS.values():
        pat = cls.parse(text, sparsity, **given)
        if pat is None:
            continue
        unused = sorted(set(given) - set(cls.params))
        if unused:
            takers = {k: [c.kinds[0] for c in _PATTERNS.values() if k in c.params] for k in unused}
            raise PatternError("; ".join(
                f"{k} does not apply to the {pat.kind} pattern (it applies to: {', '.join(takers[k]) or 'none'})"
                for k in unused))
        return pat
    raise PatternError(f"unknown pattern {pattern!r}; use {_syntaxes()}")
