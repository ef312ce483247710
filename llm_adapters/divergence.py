"""Data-free quality measure: how far the pruned model's next-token distributions moved from the dense model's.

:func:`kl_eval` runs both models over the same token windows (held-out self-generated sequences when no text
is available — see :func:`optprune.llm_adapters.selfcalib.heldout_sequences` — or any text windows such as
WikiText-2) and reports, per predicted position,

* ``kl``   — mean KL(P_dense ‖ P_pruned) in nats, ``Σ_v p_ref(v) (log p_ref(v) − log p(v))``, from
  ``log_softmax`` in float32 (``dtype=torch.float64`` on request) with the per-position sums in float64;
* ``top1`` — the fraction of positions where both models' most likely next token agree;
* ``nll``/``ref_nll`` — mean next-token negative log-likelihood of the window's own tokens under the
  evaluated/reference model (for self-generated windows: ``exp(nll)`` is the "self-perplexity");
* ``tokens`` — the number of positions compared.

Logits are never held for more than a slice of positions: the final hidden states of a batch of windows are
computed once per model, and the output head + ``log_softmax`` is applied to position chunks whose logits
fit in ~``chunk_bytes``. Models whose config rescales or soft-caps logits outside the output head fall back
to full logits per batch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .devices import model_device
from .selfcalib import SMALL_MODEL_PARAMS

__all__ = ["kl_eval", "heldout_divergence", "DivergenceError", "HELDOUT_TOKENS"]

_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logit_softcapping")


class DivergenceError(ValueError):
    """Bad input to :func:`kl_eval` (one line)."""


def _split_head(model):
    """(body, head) such that ``head(body(ids).last_hidden_state) == model(ids).logits``; None when unsure."""
    cfg = getattr(model, "config", None)
    if cfg is not None and any(getattr(cfg, a, None) is not None for a in _LOGIT_POSTPROCESSING):
        return None
    try:
        head = model.get_output_embeddings()
        body = model.base_model
    except (AttributeError, NotImplementedError):
        return None
    if head is None or body is None or body is model:
        return None
    return body, head


class _Logits:
    """Per-batch access to logit slices of one model, without materialising (B, T, V) when avoidable."""

    def __init__(self, model, ids: torch.Tensor):
        self.split = _split_head(model)
        dev = model_device(model)
        x = ids.to(dev)
        if self.split is None:
            self.full = model(input_ids=x, use_cache=False).logits
            self.h = None
        else:
            body, self.head = self.split
            self.h = body(input_ids=x, use_cache=False).last_hidden_state
            self.full = None

    def slice(self, t0: int, t1: int) -> torch.Tensor:
        if self.full is not None:
            return self.full[:, t0:t1]
        return self.head(self.h[:, t0:t1])


def _checked_windows(model, reference_model, ids, batch_size, max_windows) -> tuple:
    """(ids as a (windows, seqlen) LongTensor cut to ``max_windows``, (model vocab, reference vocab)); bad input
    raises a one-line :class:`DivergenceError`."""
    if not torch.is_tensor(ids):
        try:
            ids = torch.as_tensor(ids, dtype=torch.long)
        except (ValueError, TypeError) as e:
            raise DivergenceError(f"kl_eval: ids must be a (windows, seqlen) array of token ids ({e})") from None
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] < 1 or ids.shape[0] < 1:
        raise DivergenceError(f"kl_eval: ids must have shape (windows, seqlen), got {tuple(ids.shape)}")
    ids = ids.long()
    if max_windows is not None:
        ids = ids[: int(max_windows)]
    if int(batch_size) < 1:
        raise DivergenceError(f"kl_eval: batch_size must be ≥ 1, got {batch_size}")
    if int(ids.min()) < 0:
        raise DivergenceError(f"kl_eval: negative token id {int(ids.min())}")
    for m, nm in ((model, "model"), (reference_model, "reference")):
        vs = getattr(getattr(m, "config", None), "vocab_size", None)
        if vs is not None and int(ids.max()) >= int(vs):
            raise DivergenceError(f"kl_eval: token id {int(ids.max())} ≥ the {nm}'s vocab size {vs}")
    vocab = tuple(getattr(getattr(m, "config", None), "vocab_size", None) for m in (model, reference_model))
    if None not in vocab and vocab[0] != vocab[1]:
        raise DivergenceError(f"kl_eval: vocab sizes differ (model {vocab[0]}, reference {vocab[1]})")
    return ids, vocab


@torch.inference_mode()
def kl_eval(model, reference_model, ids, batch_size: int = 4, *, dtype=torch.float32,
            chunk_bytes: int = 64 * 2 ** 20, max_windows: Optional[int] = None, progress: bool = False,
            num_threads: Optional[int] = None) -> dict:
    """KL(reference ‖ model) of next-token distributions and top-1 agreement over token windows ``ids``
    (LongTensor (N, T), or a list of equal-length id lists), streamed ``batch_size`` windows at a time.

    Returns ``{"kl", "top1", "tokens", "nll", "ref_nll", "windows", "seqlen", "kl_max_window"}``.
    """
    ids, vocab = _checked_windows(model, reference_model, ids, batch_size, max_windows)

    old_threads = torch.get_num_threads()
    if num_threads is None and model_device(model).type == "cpu" and \
            sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        num_threads = 1  # tiny matmuls: thread synchronisation dominates (see selfcalib.self_calibration)
    if num_threads:
        torch.set_num_threads(int(num_threads))
    states = [(m, m.training) for m in (model, reference_model)]
    for m, _ in states:
        m.eval()
    N, T = ids.shape
    kl_sum = nll_sum = ref_nll_sum = 0.0
    agree = 0
    n_pos = n_lab = 0
    kl_max_window = 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=N, desc="KL vs reference", unit="win", leave=False)
    try:
        for b0 in range(0, N, int(batch_size)):
            x = ids[b0:b0 + int(batch_size)]
            B = x.shape[0]
            ref = _Logits(reference_model, x)
            cur = _Logits(model, x)
            V = vocab[1] or vocab[0] or 50_000
            chunk = max(1, int(chunk_bytes) // (B * int(V) * (8 if dtype == torch.float64 else 4) * 4))
            win_kl = torch.zeros(B, dtype=torch.float64)
            for t0 in range(0, T, chunk):
                t1 = min(T, t0 + chunk)
                lr = ref.slice(t0, t1).to(dtype).log_softmax(-1)
                lm = cur.slice(t0, t1).to(lr.device, dtype).log_softmax(-1)
                if lr.shape[-1] != lm.shape[-1]:
                    raise DivergenceError(f"kl_eval: output sizes differ ({lm.shape[-1]} vs {lr.shape[-1]})")
                p = lr.exp()
                kl = torch.where(p > 0, p * (lr - lm), 0.0).sum(-1, dtype=torch.float64).cpu()  # (B, t1-t0)
                del p
                win_kl += kl.sum(1)
                kl_sum += float(kl.sum())
                agree += int((lr.argmax(-1) == lm.argmax(-1)).sum())
                n_pos += kl.numel()
                tl = min(t1, T - 1)  # positions with a next token inside the window
                if tl > t0:
                    y = x[:, t0 + 1:tl + 1].to(lr.device).unsqueeze(-1)
                    ref_nll_sum -= float(lr[:, : tl - t0].gather(-1, y).sum(dtype=torch.float64))
                    nll_sum -= float(lm[:, : tl - t0].gather(-1, y).sum(dtype=torch.float64))
                    n_lab += B * (tl - t0)
                del lr, lm
            kl_max_window = max(kl_max_window, float((win_kl / T).max()))
            del ref, cur
            if bar is not None:
                bar.update(B)
    finally:
        if bar is not None:
            bar.close()
        for m, tr in states:
            m.train(tr)
        torch.set_num_threads(old_threads)
    kl_mean = kl_sum / n_pos
    if not math.isfinite(kl_mean):
        raise DivergenceError("kl_eval: the KL divergence is not finite (a model produced NaN/Inf logits)")
    return {"kl": kl_mean, "top1": agree / n_pos, "tokens": n_pos, "windows": N, "seqlen": T,
            "nll": nll_sum / n_lab if n_lab else float("nan"),
            "ref_nll": ref_nll_sum / n_lab if n_lab else float("nan"),
            "kl_max_window": kl_max_window}


#: default size of the held-out self-generated evaluation set (tokens); windows of at most 512 tokens
HELDOUT_TOKENS = 4096


def heldout_divergence(model, dense, tokenizer, *, seed: int = 0, seqlen: int = 512,
                       nsamples: Optional[int] = None, tokens: int = HELDOUT_TOKENS, cache_dir=None,
                       batch_size: Optional[int] = None, progress: bool = False,
                       num_threads: Optional[int] = None) -> dict:
    """The data-free quality measure: KL(dense ‖ model) and top-1 agreement on held-out sequences sampled from
    ``dense`` with seed ``seed + HELDOUT_SEED_OFFSET`` (never the calibration draw; cached like calibration).

    ``nsamples`` windows of ``min(seqlen, 512, context)`` tokens; default enough windows for ``tokens`` tokens
    (at least 8). Returns :func:`kl_eval`'s dict plus ``text``, ``seed`` and ``generation`` (cache hit, time)."""
    from .selfcalib import HELDOUT_SEED_OFFSET, heldout_sequences
    ctx = getattr(getattr(dense, "config", None), "max_position_embeddings", None)
    L = int(min(int(seqlen), 512, int(ctx) if ctx else 512))
    n = int(nsamples) if nsamples else max(8, -(-int(tokens) // L))
    info: dict = {}
    ids = heldout_sequences(dense, tokenizer, n, L, seed=seed, cache_dir=cache_dir, progress=progress,
                            num_threads=num_threads, info=info)
    bs = int(batch_size) if batch_size else max(1, 2048 // L)
    r = kl_eval(model, dense, ids, batch_size=bs, progress=progress, num_threads=num_threads)
    r.update(text="self-generated (held-out)", seed=int(seed) + HELDOUT_SEED_OFFSET,
             generation={k: info.get(k) for k in ("cache_hit", "generation_time_s", "key", "temperature", "top_p",
                                                  "prompts")})
    return r
