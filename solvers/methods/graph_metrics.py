"""Connectivity of a pruned layer seen as a bipartite graph (EGGS-PTP, docs/methods.md §5).

A 0/1 mask ``A`` of shape (m, n) (m outputs × n inputs, ``nn.Linear`` layout; ``True`` = kept) is the
biadjacency matrix of a bipartite graph between the n **inputs** (columns) and the m **outputs** (rows).
:func:`graph_metrics` measures, as a JSON-serialisable dict:

* degrees — input degree of column j = Σ_i A_ij (how many outputs still read input j), output degree of
  row i = Σ_j A_ij; min / mean / max of each, and the number of isolated inputs/outputs (degree 0);
* ``components`` — connected components of the bipartite graph (``scipy.sparse.csgraph``; an isolated node
  is its own component), and the share of nodes in the largest one;
* spectrum — the largest singular value σ1 and the second σ2 of ``A``. For a (d_L, d_R)-biregular bipartite
  graph σ1 = √(d_L·d_R) and the graph is *Ramanujan* when σ2 ≤ √(d_L−1) + √(d_R−1). Masks are usually not
  biregular (N:M fixes the output degree d_out = n·N/M, but input degrees vary), so the bound is evaluated
  with the **average** degrees d_L = mean output degree and d_R = mean input degree (a documented
  convention, not a theorem for irregular graphs). Reported: ``ramanujan_bound``, ``sigma2_over_bound``
  (≤ 1: within the Ramanujan bound), ``spectral_gap`` = σ1 − σ2 and ``relative_gap`` = 1 − σ2/σ1.
* with ``M`` given, ``tile_min_degree`` — the smallest column degree inside any M×M tile (rows grouped by M,
  columns by M), i.e. the expander N:M guarantee that EGGS enforces (``≥ B``).

Singular values: up to ``dense_max`` entries (and a smaller side ≤ 2048), the eigenvalues of the smaller
Gram matrix ``AᵀA`` or ``AAᵀ`` in float64 (a 1536×576 mask: ~0.1 s); above it a Lanczos solve (``scipy.sparse.linalg.svds``, k = 2, relative tolerance 1e-4)
on the sparse mask — σ2 sits at the edge of the bulk of the spectrum (σ2 ≈ σ3), so this is the costly part:
about 10 s for a 4096×4096 2:4 mask on one busy CPU core. ``spectral=False`` skips it.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..base import torch_threads

__all__ = ["graph_metrics", "degree_stats", "tile_min_degree", "top_singular_values", "ramanujan_bound"]

DENSE_SVD_MAX = 4_000_000
GRAM_MAX_SIDE = 2048  # dense path: eigenvalues of the min(m, n)-sided Gram matrix
LANCZOS_TOL = 1e-4   # relative accuracy of σ1, σ2 from svds: ample for a ratio to a bound; 1e-8 costs ~2× more


def _np_mask(mask) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().to("cpu")
        if mask.dtype != torch.bool:
            mask = mask != 0
        return mask.numpy()
    a = np.asarray(mask)
    return a if a.dtype == bool else a != 0


def _stats(d: np.ndarray) -> dict:
    if d.size == 0:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": int(d.min()), "mean": float(d.mean()), "max": int(d.max())}


def degree_stats(mask) -> dict:
    """Input (column) and output (row) degree statistics of a 0/1 mask."""
    A = _np_mask(mask)
    din = A.sum(0)
    dout = A.sum(1)
    return {"in_degree": _stats(din), "out_degree": _stats(dout), "isolated_inputs": int((din == 0).sum()),
            "isolated_outputs": int((dout == 0).sum())}


def tile_min_degree(mask, M: int) -> Optional[int]:
    """min over M×M tiles of the per-tile column degree (None when the shape is not tiled by M)."""
    A = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(_np_mask(mask))
    m, n = A.shape
    if M < 1 or m % M or n % M:
        return None
    t = A.reshape(m // M, M, n // M, M).sum(1)  # (row tile, col tile, col in tile)
    return int(t.min())


def ramanujan_bound(d_left: float, d_right: float) -> float:
    """√(d_L − 1) + √(d_R − 1) (terms clamped at 0 for degrees below 1)."""
    return math.sqrt(max(d_left - 1.0, 0.0)) + math.sqrt(max(d_right - 1.0, 0.0))


def top_singular_values(mask, k: int = 2, *, dense_max: int = DENSE_SVD_MAX) -> tuple[list, str]:
    """The k largest singular values of the 0/1 mask (descending) and the method used."""
    A = _np_mask(mask)
    m, n = A.shape
    if min(m, n) == 0:
        return [0.0] * k, "empty"
    if min(m, n) <= k + 1:
        s = torch.linalg.svdvals(torch.from_numpy(A.astype(np.float64)))
        vals = s[:k].tolist()
        return vals + [0.0] * (k - len(vals)), "dense"
    if m * n <= dense_max and min(m, n) <= GRAM_MAX_SIDE:
        # eigenvalues of the smaller Gram AᵀA (or AAᵀ) in float64: σ_i = √λ_i, absolute error of σ2 about
        # eps·σ1²/(2σ2) (~1e-12 for pruning masks; an exactly-zero σ2 reads as ~1e-8·σ1); ~10× faster than an SVD
        # one thread: on the shared 2-core machines two threads made this 4–20× slower (0.05 s → 0.2–5 s for
        # 1536×576 in a busy pipeline run), as for the other small dense kernels (see llm_adapters/selfcalib.py)
        with torch_threads(1):
            T = torch.from_numpy(A.astype(np.float32))  # Gram entries are integer counts < 2^24: exact in float32
            G = (T.T @ T if n <= m else T @ T.T).to(torch.float64)
            lam = torch.linalg.eigvalsh(G).flip(0)[:k].clamp_min(0)
        return lam.sqrt().tolist(), "dense"
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    S = sp.csr_matrix(A.astype(np.float64))
    rng = np.random.default_rng(0)
    v0 = rng.standard_normal(min(m, n))
    s = svds(S, k=k, return_singular_vectors=False, v0=v0, tol=LANCZOS_TOL)
    return sorted((float(x) for x in s), reverse=True), "lanczos"


def _components(A: np.ndarray) -> tuple[int, float]:
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    m, n = A.shape
    r, c = np.nonzero(A)
    adj = sp.coo_matrix((np.ones(r.size, dtype=np.int8), (r, m + c)), shape=(m + n, m + n)).tocsr()
    k, labels = connected_components(adj, directed=False)
    largest = int(np.bincount(labels).max()) if labels.size else 0
    return int(k), largest / max(m + n, 1)


def graph_metrics(mask, *, M: Optional[int] = None, spectral: bool = True,
                  dense_max: int = DENSE_SVD_MAX) -> dict:
    """Degrees, components and spectral gap of a layer's mask (see module docstring); a JSON-ready dict."""
    A = _np_mask(mask)
    if A.ndim != 2:
        raise ValueError(f"a mask is 2-D (outputs × inputs), got shape {A.shape}")
    m, n = A.shape
    out = {"shape": [int(m), int(n)], "edges": int(A.sum()), "density": float(A.mean()) if A.size else 0.0}
    out.update(degree_stats(A))
    out["components"], out["largest_component_frac"] = _components(A)
    if M is not None:
        out["tile_M"] = int(M)
        out["tile_min_degree"] = tile_min_degree(torch.from_numpy(A), int(M))
    if spectral:
        (s1, s2), how = top_singular_values(A, 2, dense_max=dense_max)
        dL, dR = out["out_degree"]["mean"], out["in_degree"]["mean"]
        bound = ramanujan_bound(dL, dR)
        out.update(sigma1=s1, sigma2=s2, ramanujan_bound=bound,
                   sigma2_over_bound=(s2 / bound) if bound > 0 else None,
                   spectral_gap=s1 - s2, relative_gap=(1.0 - s2 / s1) if s1 > 0 else 0.0,
                   biregular_sigma1=math.sqrt(dL * dR), svd=how)
    return out
