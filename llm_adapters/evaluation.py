"""Perplexity exactly as docs/protocols.md measures it, and optional zero-shot tasks through lm-eval.

Perplexity: cut the token stream into non-overlapping windows of ``seqlen`` tokens (the tail shorter than a
window is dropped), run each window on its own (no carried context), and report ``exp(mean token NLL)`` over
all predicted tokens (``seqlen − 1`` per window; equal to the published mean of per-window mean losses since
every window has the same length). Logits are taken in float32 whatever the model dtype. ``max_windows``
evaluates only the first K windows (quick runs).
"""
from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .devices import model_device

__all__ = ["perplexity", "window_count", "zero_shot", "lm_eval_available", "model_context"]


def model_context(model) -> Optional[int]:
    cfg = getattr(model, "config", None)
    for k in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def window_count(n_tokens: int, seqlen: int, max_windows: Optional[int] = None) -> int:
    n = n_tokens // seqlen
    return n if max_windows is None else min(n, int(max_windows))


def _auto_batch(model, seqlen: int, device: torch.device) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", 50000) or 50000
    budget = (2 << 30) if device.type == "cuda" else (512 << 20)  # bytes of float32 logits per batch
    return max(1, min(64, budget // max(1, seqlen * vocab * 4)))


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int, *, max_windows: Optional[int] = None,
               batch_size: Optional[int] = None, device=None, progress: bool = True,
               desc: str = "perplexity") -> dict:
    """Perplexity of ``model`` on the token stream ``ids`` ((N,) or (1, N)).

    Returns ``{"ppl", "nll", "tokens", "windows", "seqlen", "time_s"}`` where ``tokens`` counts predicted
    tokens and ``nll`` is the mean token NLL (nats).
    """
    ids = torch.as_tensor(ids).reshape(-1).to(torch.long)
    seqlen = int(seqlen)
    if seqlen < 2:
        raise ValueError(f"evaluation seqlen must be ≥ 2, got {seqlen}")
    ctx = model_context(model)
    if ctx is not None and seqlen > ctx:
        raise ValueError(f"evaluation seqlen {seqlen} exceeds the model's context of {ctx} tokens; "
                         f"use --eval-seqlen {ctx} or less")
    n = window_count(ids.numel(), seqlen, max_windows)
    if n < 1:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    dev = torch.device(device) if device is not None else model_device(model)
    bs = int(batch_size) if batch_size else _auto_batch(model, seqlen, dev)
    X = ids[: n * seqlen].view(n, seqlen)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc=desc, unit="win", leave=False)
    try:
        for s in range(0, n, bs):
            x = X[s:s + bs].to(dev)
            out = model(input_ids=x, use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]
            logits = logits[:, :-1, :].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += x.shape[0] * (seqlen - 1)
            if bar is not None:
                bar.update(x.shape[0])
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    mean = total / count
    if not math.isfinite(mean):
        ppl = float("nan")
    else:
        ppl = math.exp(mean) if mean < 700 else float("inf")
    return {"ppl": ppl, "nll": mean, "tokens": count, "windows": n, "seqlen": seqlen,
            "time_s": time.perf_counter() - t0}


def lm_eval_available() -> bool:
    from .lm_eval_tasks import lm_eval_available as _available
    return _available()


def zero_shot(model, tokenizer, tasks: Sequence[str], *, batch_size: int = 8, limit: Optional[int] = None,
              device=None, include_path=None) -> dict:
    """Zero-shot accuracies through lm-eval (:func:`optprune.llm_adapters.lm_eval_tasks.run_tasks`)."""
    from .lm_eval_tasks import run_tasks
    return run_tasks(model, tokenizer, tasks, include_path=include_path, limit=limit, batch_size=batch_size,
                     device=device)
