"""Shared plumbing for the reference backends (cvxpy, Gurobi, SCIP, enumeration).

Everything here is translation of a declarative :class:`~optprune.formulations.programs.Program` into
numbers a solver takes — it contains no model of its own:

* :class:`Layout` — one flat vector of the program's *free* entries (fixed-zero entries dropped), variable by
  variable, row-major; ``unpack`` turns a solver's vector back into full float64 tensors.
* :func:`linear_rows` — the program's :class:`LinearRow` constraints as one sparse matrix.
* :func:`row_quadratics` — the layer objective per output row on the free entries of that row:
  ``f(W) = Σ_i ½ w_iᵀ Ĥ_{S_i S_i} w_i − b_{i,S_i}ᵀ w_i + c_i`` with ``b = W0 C`` (rows always decouple).
* :func:`gram_factor` — ``Ĥ = Rᵀ R`` (eigen square root) and ``y_i`` with ``Rᵀ y_i = b_i``, so that
  ``½‖R w_i − y_i‖² = ½ w_iᵀ Ĥ w_i − b_iᵀ w_i + ½‖y_i‖²`` (the data form ``½‖W X̂ − W0 X‖²`` with ``X̂``
  replaced by the n×n factor ``R``: well conditioned and small for the solver).
* :func:`bigm_bounds` — a big-M bound on ``|W_ij|`` that provably cuts off no optimal solution (below).
* :func:`translate` — what the mixed-integer backends (Gurobi, SCIP) build their models from: the layout,
  objective terms, variable bounds (binaries, grid codes, big-M or dead inputs fixed at 0), the row
  quadratics around the unconstrained optimum and the shifted linear rows; :func:`bigm_ratio` after the solve.
* :func:`finish_mask_solution` — rounds binaries, zeroes W off the support and (optionally) polishes W by
  the exact least-squares refit on the solver's support.

**The big-M bound.** Let ``U`` be the objective of a feasible solution (the pattern's projection of
``|W0|`` followed by the exact refit) and ``W*`` the unconstrained optimum with value ``f*``. Because
``f(W) = f* + Σ_i ½ (w_i − w*_i)ᵀ Ĥ (w_i − w*_i)`` and every row term is ≥ 0, any solution at least as good
as ``U`` — in particular every optimal one — has, in every row, ``(w_i − w*_i)ᵀ Ĥ (w_i − w*_i) ≤ 2(U − f*)``;
maximising ``|w_ij − w*_ij|`` over that ellipsoid gives
``|w_ij| ≤ M_ij = |w*_ij| + sqrt(2 (U − f*) [Ĥ⁻¹]_jj)``. We use ``1.05·M_ij + 1e-9`` (float safety). Inputs
with ``Ĥ_jj = 0`` (dead; then column j of ``Ĥ`` and of ``b`` are zero) do not affect ``f``, so their weights are
fixed to 0 (``M = 0``) without losing optimality. When ``Ĥ`` restricted to live inputs is too ill-conditioned
for the bound to be numerically useful (``M`` above ``1e4·(1 + max|W*|)``), backends use indicator
constraints instead. After the solve the backends report ``bigm_max_ratio = max |W_ij| / M_ij``; a value
below 1 shows the bound was not active at the solution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ...formulations.programs import L1Penalty, LayerObjective, LinearScore, Program
from ..base import Backend, SolverUnavailable

__all__ = ["Layout", "linear_rows", "row_quadratics", "gram_factor", "dead_columns", "bigm_bounds",
           "feasible_start", "finish_mask_solution", "relative_gap", "STATUS_OPTIMAL", "Translation", "translate",
           "bigm_ratio", "warm_start_values", "EnumerationBackend", "MAX_CANDIDATES"]

STATUS_OPTIMAL = "optimal"
#: the most candidates an enumeration backend tries
MAX_CANDIDATES = 1 << 20


class EnumerationBackend(Backend):
    """A backend that solves by trying every candidate: it takes a program whose :meth:`candidates` count is
    known (≥ 0) and at most :data:`MAX_CANDIDATES`."""

    def candidates(self, program) -> int:  # pragma: no cover - interface
        """How many candidates ``program`` needs (−1: this backend cannot enumerate it)."""
        raise NotImplementedError

    def refusal(self, program) -> str:
        """Why a program that cannot be enumerated is refused."""
        return f"{self.name} cannot enumerate this {program.kind}"

    def supports(self, program):
        ok, why = super().supports(program)
        if not ok:
            return ok, why
        k = self.candidates(program)
        if k < 0:
            return False, self.refusal(program)
        if k > MAX_CANDIDATES:
            return False, f"{k} candidates > enumeration limit {MAX_CANDIDATES} (2^20); use gurobi/scip"
        return True, ""


class Layout:
    """Flat vector of the free entries of every variable, in ``program.variables`` order, row-major."""

    def __init__(self, program: Program):
        self.program = program
        self.offsets: dict = {}
        self.free: dict = {}      # name -> bool np array (flat) of free entries
        self.maps: dict = {}      # name -> int np array (flat): position in x, or -1 if fixed to 0
        pos = 0
        for name, v in program.variables.items():
            size = v.size
            free = np.ones(size, dtype=bool) if v.fixed_zero is None else \
                ~v.fixed_zero.reshape(-1).cpu().numpy().astype(bool)
            mp = -np.ones(size, dtype=np.int64)
            mp[free] = np.arange(pos, pos + int(free.sum()))
            self.offsets[name] = pos
            self.free[name] = free
            self.maps[name] = mp
            pos += int(free.sum())
        self.size = pos

    def positions(self, name: str, flat_idx=None) -> np.ndarray:
        mp = self.maps[name]
        return mp if flat_idx is None else mp[np.asarray(flat_idx, dtype=np.int64)]

    def slice(self, name: str) -> slice:
        return slice(self.offsets[name], self.offsets[name] + int(self.free[name].sum()))

    def binary_mask(self) -> np.ndarray:
        out = np.zeros(self.size, dtype=bool)
        for name, v in self.program.variables.items():
            if v.domain == "binary":
                out[self.slice(name)] = True
        return out

    def integer_bounds(self) -> tuple:
        """``(mask, lower, upper)`` over the flat vector: the general integer variables (grid codes) and their
        bounds (``±inf`` elsewhere)."""
        mask = np.zeros(self.size, dtype=bool)
        lo, hi = np.full(self.size, -np.inf), np.full(self.size, np.inf)
        for name, v in self.program.variables.items():
            if v.domain == "integer":
                sl = self.slice(name)
                mask[sl] = True
                if v.bounds is not None:
                    lo[sl], hi[sl] = float(v.bounds[0]), float(v.bounds[1])
        return mask, lo, hi

    def unpack(self, x) -> dict:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        vals = {}
        for name, v in self.program.variables.items():
            full = np.zeros(v.size, dtype=np.float64)
            full[self.free[name]] = x[self.slice(name)]
            vals[name] = torch.from_numpy(full.reshape(v.shape))
        return vals

    def pack(self, values: dict) -> np.ndarray:
        x = np.zeros(self.size, dtype=np.float64)
        for name in self.program.variables:
            if name in values:
                full = torch.as_tensor(values[name]).reshape(-1).to(torch.float64).cpu().numpy()
                x[self.slice(name)] = full[self.free[name]]
        return x


def linear_rows(program: Program, layout: Layout):
    """``(A, sense, rhs)``: sparse CSR ``A`` (rows × layout.size), sense array of '<=', '>=', '=='."""
    import scipy.sparse as sp
    rows, cols, data, sense, rhs = [], [], [], [], []
    r = 0
    for c in program.linear_rows():
        entries = {}
        for var, idx, coef in c.terms:
            pos = layout.positions(var, torch.as_tensor(idx).reshape(-1).cpu().numpy())
            cf = torch.as_tensor(coef, dtype=torch.float64).reshape(-1).cpu().numpy()
            for p, a in zip(pos.tolist(), cf.tolist()):
                if p >= 0 and a != 0.0:
                    entries[p] = entries.get(p, 0.0) + a
        if not entries:  # only fixed-zero entries: the row reads 0 (sense) rhs
            ok = {"<=": 0.0 <= c.rhs, ">=": 0.0 >= c.rhs, "==": c.rhs == 0.0}[c.sense]
            if not ok:
                raise ValueError(f"constraint 0 {c.sense} {c.rhs} is infeasible on the fixed entries")
            continue
        for p, a in entries.items():
            rows.append(r)
            cols.append(p)
            data.append(a)
        sense.append(c.sense)
        rhs.append(float(c.rhs))
        r += 1
    A = sp.csr_matrix((data, (rows, cols)), shape=(r, layout.size), dtype=np.float64)
    return A, np.array(sense, dtype=object), np.array(rhs, dtype=np.float64)


def objective_terms(program: Program):
    quad = [t for t in program.objective if isinstance(t, LayerObjective)]
    l1 = [t for t in program.objective if isinstance(t, L1Penalty)]
    lin = [t for t in program.objective if isinstance(t, LinearScore)]
    other = [t for t in program.objective if not isinstance(t, (LayerObjective, L1Penalty, LinearScore))]
    if other:
        raise ValueError(f"unknown objective term(s) {[type(t).__name__ for t in other]}")
    if len(quad) > 1:
        raise ValueError("at most one LayerObjective term is supported")
    return (quad[0] if quad else None), l1, lin


def dead_columns(problem, tol: float = 0.0) -> np.ndarray:
    """Inputs that carry no signal: ``Ĥ_jj = 0`` and column j of ``b = W0 C`` zero (exactly irrelevant)."""
    Hh = problem.Hh.to(torch.float64)
    B = problem.target(torch.float64)
    d = Hh.diagonal()
    scale = float(B.abs().max()) if B.numel() else 0.0
    dead = (d <= tol * float(d.max().clamp_min(0))) & (B.abs().amax(0) <= 1e-12 * max(scale, 1e-300))
    return dead.cpu().numpy()


def unconstrained_rows(problem, eig=None):
    """``W*`` (a minimiser of f without constraints, via the eigen pseudo-inverse on live inputs; 0 on dead
    ones) and ``f*`` — exact for any Gram matrices built from activations (then ``b`` lies in range(Ĥ)).
    ``eig``: ``torch.linalg.eigh(Ĥ)`` in float64 when the caller has it already."""
    Hh = problem.Hh.to(torch.float64)
    B = problem.target(torch.float64)
    e, V = torch.linalg.eigh(Hh) if eig is None else eig
    keep = e > 1e-13 * float(e.max().clamp_min(1e-300))
    Wst = ((B @ V[:, keep]) / e[keep]) @ V[:, keep].T
    dead = torch.from_numpy(dead_columns(problem))
    Wst[:, dead] = 0.0
    return Wst, problem.to(torch.float64).objective(Wst)


def row_quadratics(program: Program, layout: Layout, var: str = "W", shifted: bool = True):
    """Per output row i the layer objective on the row's free entries S (F = the fixed-zero ones).

    Returns ``(rows, shift)``: ``rows[i] = (positions in x, S, Q = Ĥ_SS, lin, const)`` and a shift vector
    ``s`` (size ``layout.size``) such that with ``d = x − s``::

        f_i = ½ d_Sᵀ Q d_S + linᵀ d_S + const.

    ``shifted=True`` takes ``s = W*`` (the unconstrained optimum): then ``lin = −Ĥ_SF w*_F`` and
    ``const = f*_i + ½ w*_Fᵀ Ĥ_FF w*_F`` — no cancellation between a large quadratic and a large linear term,
    which matters for ill-conditioned (correlated-input) layers whose pruned error is tiny next to ``f(0)``.
    ``shifted=False``: ``s = 0``, ``lin = −b_S``, ``const = c_i = ½ w0_iᵀ H w0_i``.
    """
    problem = program.problem
    Hh = problem.Hh.to(torch.float64).cpu().numpy()
    m, n = problem.shape
    mp = layout.maps[var].reshape(m, n)
    shift = np.zeros(layout.size)
    out = []
    if shifted:
        Wst, _ = unconstrained_rows(problem)
        fst = problem.to(torch.float64).objective(Wst, per_row=True).cpu().numpy()
        Wst = Wst.cpu().numpy()
        for i in range(m):
            S = np.nonzero(mp[i] >= 0)[0]
            F = np.nonzero(mp[i] < 0)[0]
            shift[mp[i, S]] = Wst[i, S]
            wF = Wst[i, F]
            lin = -(Hh[np.ix_(S, F)] @ wF)
            const = float(fst[i]) + 0.5 * float(wF @ Hh[np.ix_(F, F)] @ wF)
            out.append((mp[i, S], S, Hh[np.ix_(S, S)], lin, const))
        return out, shift
    B = problem.target(torch.float64).cpu().numpy()
    W0 = problem.W0.to(torch.float64)
    c = (0.5 * ((W0 @ problem.H.to(torch.float64)) * W0).sum(1)).cpu().numpy()
    for i in range(m):
        S = np.nonzero(mp[i] >= 0)[0]
        out.append((mp[i, S], S, Hh[np.ix_(S, S)], -B[i, S], float(c[i])))
    return out, shift


def gram_factor(problem, rel_cut: float = 1e-13):
    """``R`` (r × n) with ``RᵀR = Ĥ`` (eigenvalues ≤ rel_cut·max dropped) and ``Y`` (m × r) with ``Rᵀ y_i = b_i``."""
    Hh = problem.Hh.to(torch.float64)
    e, V = torch.linalg.eigh(Hh)
    keep = e > rel_cut * float(e.max().clamp_min(1e-300))
    e, V = e[keep], V[:, keep]
    R = (e.sqrt().unsqueeze(1) * V.T)  # r × n
    B = problem.target(torch.float64)
    Y = (B @ V) / e.sqrt().unsqueeze(0)  # m × r
    return R.cpu().numpy(), Y.cpu().numpy()


def feasible_start(program: Program) -> Optional[dict]:
    """A feasible solution of an L0 program: the pattern's projection of |W0| and the exact refit on it."""
    from ..methods.baselines import refit_weights
    problem, pattern = program.problem, program.pattern
    if problem is None or pattern is None:
        return None
    qz = program.meta.get("quantizer")
    if qz is not None:  # a grid program: round to nearest, the projection onto grid ∩ pattern
        W, mask = pattern.project_grid(problem.W0.to(torch.float64), qz.to(torch.float64))
        vals = {"W": W, "z": mask.to(torch.float64), "q": qz.to(torch.float64).codes(W)}
        return vals if program.check(vals)["feasible"] else None
    try:
        mask = pattern.project(problem.W0.to(torch.float64).abs())
    except Exception:  # a pattern without a projection (e.g. expander N:M with no hook registered)
        return None
    W = refit_weights(problem.to(torch.float64), mask)
    vals = {"W": W * mask}
    if "z" in program.variables:
        vals["z"] = mask.to(torch.float64)
    if "g" in program.variables and hasattr(pattern, "kept_groups_of"):
        vals["g"] = pattern.kept_groups_of(mask).to(torch.float64)
    if not program.check(vals)["feasible"]:
        return None
    return vals


def bigm_bounds(program: Program, safety: float = 1.05, max_ratio: float = 1e4):
    """Big-M bound on |W| (m × n float64 numpy) valid for every optimal solution, or ``(None, reason)``.

    See the module docstring for the derivation. Returns ``(M, info)``.
    """
    problem = program.problem
    start = feasible_start(program)
    if start is None:
        return None, {"bigm": "no feasible start to bound the optimum"}
    U = program.evaluate(start)
    dead = dead_columns(problem)
    live = np.nonzero(~dead)[0]
    Hh = problem.Hh.to(torch.float64)
    B = problem.target(torch.float64)
    m, n = problem.shape
    M = np.zeros((m, n))
    if live.size:
        Hl = Hh[live][:, live]
        L, info = torch.linalg.cholesky_ex(Hl)
        if int(info) != 0:
            return None, {"bigm": "Ĥ on live inputs is singular"}
        Hinv = torch.cholesky_inverse(L)
        Wl = torch.cholesky_solve(B[:, live].T, L).T  # W* on live inputs (dead ones: 0)
        Wst = torch.zeros(m, n, dtype=torch.float64)
        Wst[:, live] = Wl
        fstar = problem.to(torch.float64).objective(Wst)
        delta = max(U - fstar, 0.0) * (1 + 1e-9) + 1e-12 * max(problem.constant(), 1e-300)
        rad = torch.sqrt(2.0 * delta * Hinv.diagonal().clamp_min(0))
        M[:, live] = (safety * (Wl.abs() + rad.unsqueeze(0)) + 1e-9).cpu().numpy()
        wmax = float(Wl.abs().max())
        if not np.isfinite(M).all() or M.max() > max_ratio * (1.0 + wmax):
            return None, {"bigm": f"bound {M.max():.3g} too large (ill-conditioned Ĥ); use indicators"}
    return M, {"bigm_upper": U, "bigm_max": float(M.max()), "bigm_dead_fixed": int(dead.sum())}


@dataclass
class Translation:
    """A program as a mixed-integer backend builds it: the solver's variables are ``d = x − shift`` over the
    flat vector of :class:`Layout` (the weights expanded around the unconstrained optimum, no large-term
    cancellation), bounded by ``[lb, ub]`` (in ``x``), with the objective per output row
    ``½ d_Sᵀ Q d_S + linᵀ d_S + const`` (``rows``), the ℓ1 and linear-score terms, and the linear rows
    ``A d (sense) rhs`` (``rhs`` already shifted)."""
    layout: Layout
    quad: Optional[LayerObjective]
    l1s: list
    lins: list
    lb: np.ndarray
    ub: np.ndarray
    binary: np.ndarray     # bool mask over the flat vector
    integer: np.ndarray    # bool mask: general integers (grid codes)
    M: Optional[np.ndarray]  # big-M bound on |W| (m × n), None when the indicators are not big-M rows
    mode: str              # how indicators are modelled: 'bigm' | 'indicator' (as asked when there are none)
    rows: list             # (positions, S, Q, lin, const) per output row (:func:`row_quadratics`)
    shift: np.ndarray
    A: object              # sparse CSR of the linear rows
    sense: np.ndarray
    rhs: np.ndarray
    info: dict


def translate(program: Program, indicator: str = "auto") -> Translation:
    """Translate ``program`` for a mixed-integer backend; ``indicator``: 'auto' (big-M rows when a useful bound
    exists, else indicator constraints), 'bigm' (refuse without a bound) or 'indicator'."""
    lay = Layout(program)
    quad, l1s, lins = objective_terms(program)
    info: dict = {}
    lb, ub = np.full(lay.size, -np.inf), np.full(lay.size, np.inf)
    binary = lay.binary_mask()
    lb[binary], ub[binary] = 0.0, 1.0
    integer, ilo, ihi = lay.integer_bounds()  # grid codes
    lb[integer], ub[integer] = ilo[integer], ihi[integer]
    M, mode = None, indicator
    if program.indicators():
        if mode in ("auto", "bigm") and program.problem is not None:
            M, binfo = bigm_bounds(program)
            info.update(binfo)
            if M is None and mode == "bigm":
                raise SolverUnavailable(f"no big-M bound: {binfo.get('bigm')}")
        mode = "bigm" if M is not None else "indicator"
        info["indicator_mode"] = mode
    if M is not None:
        wpos = lay.positions("W").reshape(M.shape)
        sel = wpos >= 0
        lb[wpos[sel]] = -M[sel]
        ub[wpos[sel]] = M[sel]
    elif quad is not None:
        dead = dead_columns(program.problem)
        wpos = lay.positions(quad.var).reshape(program.problem.shape)
        for p in wpos[:, dead].reshape(-1):
            if p >= 0:
                lb[p] = ub[p] = 0.0  # dead inputs do not change f: fixing them at 0 is exact
    rows, shift = (row_quadratics(program, lay, quad.var, shifted=not l1s) if quad is not None
                   else ([], np.zeros(lay.size)))
    A, sense, rhs = linear_rows(program, lay)
    return Translation(lay, quad, l1s, lins, lb, ub, binary, integer, M, mode, rows, shift, A, sense,
                       rhs - A @ shift, info)


def warm_start_values(program: Program, tr: Translation) -> Optional[np.ndarray]:
    """The solver's variables ``d`` at :func:`feasible_start` (integer programs with a layer problem), or None."""
    if not program.is_integer or program.problem is None:
        return None
    start = feasible_start(program)
    return None if start is None else tr.layout.pack(start) - tr.shift


def bigm_ratio(M: np.ndarray, values: dict) -> float:
    """``max |W_ij| / M_ij`` of the returned weights: below 1 shows the big-M bound was not active."""
    W = values["W"].cpu().numpy()
    return float(np.where(M > 0, np.abs(W) / np.maximum(M, 1e-300), 0.0).max())


def finish_mask_solution(program: Program, values: dict, *, polish: bool = True) -> tuple[dict, dict]:
    """Round binaries, zero W where its indicator binary is 0; optionally refit W exactly on that support.

    Returns ``(values, info)``; ``info['objective_unpolished']`` is the objective of the solver's own W
    (after rounding/zeroing), ``info['polished']`` whether the refit was kept (it is kept only if not worse).
    """
    vals = {k: torch.as_tensor(v).to(torch.float64).clone() for k, v in values.items()}
    for name, v in program.variables.items():
        if v.domain == "binary" and name in vals:
            vals[name] = (vals[name] > 0.5).to(torch.float64)
        elif v.domain == "integer" and name in vals:
            vals[name] = vals[name].round()
    qz = program.meta.get("quantizer")
    if qz is not None and "q" in vals and "W" in vals:  # a grid program: W exactly from its rounded codes
        vals["W"] = qz.to(torch.float64).dequantize(vals["q"])
        polish = False  # a refit would leave the grid
    info = {}
    inds = program.indicators()
    if "W" in vals and inds:
        W = vals["W"]
        flat = W.reshape(-1)
        for ind in inds:
            b = vals[ind.binary].reshape(-1)[ind.index]
            flat[b < 0.5] = 0.0
        vals["W"] = flat.reshape(W.shape)
    if program.problem is not None and "W" in vals:
        info["objective_unpolished"] = program.evaluate(vals)
        if polish and program.is_quadratic and not any(isinstance(t, L1Penalty) for t in program.objective):
            from ..methods.baselines import refit_weights
            mask = torch.ones_like(vals["W"], dtype=torch.bool)
            flat = mask.reshape(-1)
            for ind in inds:
                flat[vals[ind.binary].reshape(-1)[ind.index] < 0.5] = False
            v = program.variables["W"]
            if v.fixed_zero is not None:
                mask &= ~v.fixed_zero
            Wr = refit_weights(program.problem.to(torch.float64), mask) * mask
            cand = dict(vals, W=Wr)
            f_new = program.evaluate(cand)
            if f_new <= info["objective_unpolished"] and program.check(cand)["feasible"]:
                vals = cand
                info["polished"] = True
            else:
                info["polished"] = False
    return vals, info


def relative_gap(value: float, reference: float) -> float:
    """``(value − reference)/max(|reference|, tiny)``: ≥ 0 when ``value`` is worse than the reference."""
    if value is None or reference is None or not np.isfinite(value) or not np.isfinite(reference):
        return float("nan")
    return (value - reference) / max(abs(reference), 1e-12)
