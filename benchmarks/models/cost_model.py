"""A FLOP model of the block walk (``optprune prune``) for Llama-shaped models, and the machine's matmul rate.

Per block and calibration set of ``B`` samples × ``L`` tokens (``T = B·L``), counted as the pipeline runs it
(llm_adapters/pipeline.py):

* **forward**: the block's passes. A full pass costs ``2·T·P`` for the ``P`` weights of the linear sub-layers
  plus attention, ``4·B·h·L²·d_head`` (scores and weighted values, the whole square: the CPU kernels compute
  it). A partial pass up to a group's input costs the part of the block before it. Without error correction:
  one partial pass up to the last group's input collects every group's statistics (a full pass in
  dense-input mode, which also gives the outputs), plus one full pass of the pruned block for the next
  block's inputs (sequential mode, not after the last block). With error correction, per group: a partial
  pass of the pruned-so-far block and, from the second group on, one of the dense copy; then the full pass
  (sequential mode), or in dense-input mode the last group's dense pass runs on to the block's end.
* **statistics**: per group of input width ``n``: ``H`` as a symmetric rank-k update, about ``2·T·n²·(k+1)/(2k)``
  with ``k = ⌈n/512⌉`` row blocks on the CPU from ``n ≥ 1024`` on (counted block by block; ``2·T·n²``
  otherwise); with error
  correction from the second group on also ``Ĥ`` (the same) and ``C`` (``2·T·n²``).
* **solve** (SparseGPT) per sub-layer of ``m`` outputs and ``n`` inputs: the damped inverse's factorisations
  (``≈ 4/3·n³``: Cholesky, its inverse, the Cholesky of the inverse) and the column sweep with its lazy block
  updates (``≈ 2·m·n²``), plus the pipeline's error report (``LayerProblem.report``: two products of ``2·m·n²``
  where ``X̂ = X``, five where error correction gives ``X̂ ≠ X``).

``predict(flops, rate)`` is seconds at a measured rate; :func:`matmul_rate` measures the rate of a float32
matrix product on this machine (wall clock, so it sees the machine's load as the prune does).
"""
from __future__ import annotations

import math
import time

__all__ = ["llama_dims", "block_layers", "block_flops", "model_flops", "matmul_rate", "gpu_prediction",
           "PREDICT_MODELS", "SYRK_BLOCK", "SYRK_MIN_N"]

SYRK_BLOCK = 512   # as optprune.formulations.problem.SYRK_BLOCK / SYRK_MIN_N (kept in step by a test)
SYRK_MIN_N = 1024

#: published shapes (vocabulary included) for the prediction: Llama-3-8B and -70B
PREDICT_MODELS = {
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256),
}


def llama_dims(config) -> dict:
    """The shape parameters of a Llama-shaped transformers config (or a dict with the same keys)."""
    g = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    d, heads = int(g("hidden_size")), int(g("num_attention_heads"))
    return {"d": d, "ff": int(g("intermediate_size")), "heads": heads,
            "kv_heads": int(g("num_key_value_heads") or heads), "head_dim": int(g("head_dim") or d // heads),
            "blocks": int(g("num_hidden_layers")), "vocab": int(g("vocab_size"))}


def block_layers(dims: dict) -> list:
    """The groups of a block in the pipeline's order, each a list of (name, m, n) sharing one input."""
    d, ff, hd = dims["d"], dims["ff"], dims["head_dim"]
    q, kv = dims["heads"] * hd, dims["kv_heads"] * hd
    return [[("q", q, d), ("k", kv, d), ("v", kv, d)], [("o", d, q)], [("gate", ff, d), ("up", ff, d)],
            [("down", d, ff)]]


def _gram(T: int, n: int, cpu: bool = True) -> float:
    if cpu and n >= SYRK_MIN_N:  # row blocks [a0, a1) × columns [a0, n)
        return 2.0 * T * sum((min(n, a0 + SYRK_BLOCK) - a0) * (n - a0) for a0 in range(0, n, SYRK_BLOCK))
    return 2.0 * T * n * n


def block_flops(dims: dict, nsamples: int, seqlen: int, *, error_correction: bool = True,
                mode: str = "sequential", last: bool = False, method: str = "sparsegpt", cpu: bool = True) -> dict:
    """FLOPs of pruning one block: ``forward``, ``statistics``, ``solve`` and their ``total`` (module doc).
    ``solve`` is counted for SparseGPT (and Wanda: 0); other methods get ``None``."""
    T, groups = nsamples * seqlen, block_layers(dims)
    attn = 4.0 * nsamples * dims["heads"] * seqlen * seqlen * dims["head_dim"]
    lin = [2.0 * T * sum(m * n for _, m, n in g) for g in groups]
    # the cost of the block before each group's input: attention runs between the q/k/v and o groups
    prefix = [0.0, lin[0] + attn, lin[0] + attn + lin[1], lin[0] + attn + lin[1] + lin[2]]
    full = sum(lin) + attn
    if error_correction:  # dense-input: the last group's dense pass runs on to the block's outputs
        fwd = sum(prefix) + sum(prefix[1:]) + (0.0 if last else full if mode == "sequential" else full - prefix[-1])
    else:
        fwd = (full if (mode == "dense-input" and not last) else prefix[-1]) + \
              (full if (mode == "sequential" and not last) else 0.0)
    stats = 0.0
    for gi, g in enumerate(groups):
        n = g[0][2]
        stats += _gram(T, n, cpu)
        if error_correction and gi:
            stats += _gram(T, n, cpu) + 2.0 * T * n * n

    def report(gi, m, n):  # LayerProblem.report: 5 products of m·n² where X̂ ≠ X (corrected later groups), else 2
        return (10.0 if error_correction and gi else 4.0) * m * n * n

    if method == "sparsegpt":
        solve = sum(4.0 / 3.0 * n ** 3 + 2.0 * m * n * n + report(gi, m, n)
                    for gi, g in enumerate(groups) for _, m, n in g)
    elif method in ("wanda", "magnitude"):
        solve = sum(report(gi, m, n) for gi, g in enumerate(groups) for _, m, n in g)  # the error report only
    else:
        solve = None
    return {"forward": fwd, "statistics": stats, "solve": solve,
            "total": None if solve is None else fwd + stats + solve,
            "params": sum(m * n for g in groups for _, m, n in g)}


def model_flops(dims: dict, nsamples: int, seqlen: int, **kw) -> dict:
    """Sum of :func:`block_flops` over the blocks (the last block runs no propagating forward)."""
    nb = dims["blocks"]
    one = block_flops(dims, nsamples, seqlen, **kw)
    last = block_flops(dims, nsamples, seqlen, last=True, **kw)
    return {k: (None if one[k] is None else one[k] * (nb - 1) + last[k]) for k in one}


def matmul_rate(n: int = 1536, reps: int = 3) -> float:
    """FLOP/s of an n×n float32 matrix product on this machine, best of ``reps`` (torch's thread setting)."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def gpu_prediction(config, rate_flops: float, ratio: float = 1.0, nsamples: int = 128, seqlen: int = 2048,
                   nproc: int = 8) -> dict:
    """Predicted SparseGPT prune time (error correction) of a Llama-shaped model on GPUs at ``rate_flops`` each,
    times ``ratio`` (measured/limit): one GPU (sequential), and ``nproc`` GPUs (``--nproc``, dense-input: ranks
    own contiguous blocks, a rank first forwards the dense blocks before its own, so the last rank waits
    longest). Seconds, with the FLOPs per block and the sizes a rank holds (float32)."""
    dims = llama_dims(config)
    kw = dict(error_correction=True, method="sparsegpt", cpu=False)
    blk = block_flops(dims, nsamples, seqlen, **kw)
    one = model_flops(dims, nsamples, seqlen, **kw)["total"] / rate_flops * ratio
    fwd = 2.0 * nsamples * seqlen * blk["params"] / rate_flops * ratio
    per = block_flops(dims, nsamples, seqlen, mode="dense-input", **kw)["total"] / rate_flops * ratio
    own = math.ceil(dims["blocks"] / nproc)
    return {"blocks": dims["blocks"], "flops_per_block": blk["total"], "one_s": one,
            "many_s": (dims["blocks"] - own) * fwd + own * per, "nproc": nproc,
            "activations_bytes": nsamples * seqlen * dims["d"] * 4, "block_bytes": blk["params"] * 4}
