"""The instances the cross-check draws: the k-th instance of a shape comes from family ``FAMILIES[k % 4]`` —
random Gaussian inputs, ill-conditioned (correlated, outlier features, log-spaced spectrum), low-rank (some
dead inputs) and slices of real layers (stories260K's block-0 q/k/v with their exact inputs when
``$OPTPRUNE_MODEL_DIR`` holds it, otherwise a synthetic LLM-like layer and a note saying so)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from ...formulations.problem import LayerProblem

__all__ = ["FAMILIES", "InstanceFactory"]

FAMILIES = ("random", "ill-conditioned", "low-rank", "real-slice")


def _model_dir(model_dir=None) -> Optional[Path]:
    d = model_dir or os.environ.get("OPTPRUNE_MODEL_DIR")
    return Path(d) if d else None


def _data_dir(data_dir=None) -> Optional[Path]:
    d = data_dir or os.environ.get("OPTPRUNE_DATA_DIR")
    return Path(d) if d else None


def _stories_layers(model_dir: Optional[Path], data_dir: Optional[Path], seed: int, ntok: int = 512):
    """Block-0 q/k/v of stories260K with their exact inputs RMSNorm(embed(tokens))·input_layernorm, as
    ``(list of (name, W), X, how)``. Tokens: the TinyStories sample through the model's tokenizer when both are
    there, otherwise seeded random ids. Never imports transformers."""
    if model_dir is None:
        raise FileNotFoundError("no model directory ($OPTPRUNE_MODEL_DIR unset)")
    from safetensors.torch import load_file
    d = model_dir / "stories260K"
    st = load_file(str(d / "model.safetensors"))
    emb = st["model.embed_tokens.weight"].to(torch.float64)
    ids, how = None, None
    tok_file = d / "tokenizer.json"
    text_file = None if data_dir is None else data_dir / "tinystories" / "tinystories_sample.txt"
    if tok_file.exists() and text_file is not None and text_file.exists():
        try:
            from tokenizers import Tokenizer
            ids = Tokenizer.from_file(str(tok_file)).encode(text_file.read_text()).ids[:ntok]
            how = f"stories260K block-0 inputs of {len(ids)} TinyStories tokens"
        except ImportError:
            ids = None
    if ids is None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, emb.shape[0], (ntok,), generator=g).tolist()
        how = f"stories260K block-0 inputs of {ntok} random token ids"
    x = emb[torch.tensor(ids)]
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * st["model.layers.0.input_layernorm.weight"].double()
    layers = [(f"stories260K.layers.0.self_attn.{k}_proj", st[f"model.layers.0.self_attn.{k}_proj.weight"].double())
              for k in ("q", "k", "v")]
    return layers, x, how


class InstanceFactory:
    """Draws the k-th instance of a given shape: family ``FAMILIES[k % 4]``, seeded by (seed, k, shape)."""

    def __init__(self, seed: int = 0, model_dir=None, data_dir=None):
        self.seed = seed
        self.notes: list[str] = []
        self._real = None
        try:
            self._real = _stories_layers(_model_dir(model_dir), _data_dir(data_dir), seed)
        except (ImportError, FileNotFoundError, OSError, KeyError) as e:
            self.notes.append(f"real-slice family: stories260K not available ({type(e).__name__}: {e}); "
                              "using a synthetic LLM-like layer (heavy-tailed weights, outlier input features)")

    def generator(self, k: int, m: int, n: int) -> torch.Generator:
        """The random generator of instance ``k`` of shape ``m × n`` (seeded by the factory's seed, k and the shape)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + k * 7919 + m * 131 + n)

    def problem(self, k: int, m: int, n: int) -> tuple[LayerProblem, str, str]:
        """``(problem, family, description)``."""
        fam = FAMILIES[k % len(FAMILIES)]
        g = self.generator(k, m, n)
        s = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        f64 = torch.float64
        if fam == "random":
            corr = (k // len(FAMILIES)) % 2 == 1
            p = LayerProblem.random(m, n, kind="random", corrected=corr, seed=s)
            return p, fam, "Gaussian inputs" + (", error-corrected X̂" if corr else "")
        if fam == "ill-conditioned":
            sub = (k // len(FAMILIES)) % 3
            if sub == 0:
                return LayerProblem.random(m, n, kind="correlated", corrected=True, seed=s), fam, \
                    "correlated inputs (rank n/4 + 5% noise), error-corrected X̂"
            if sub == 1:
                return LayerProblem.random(m, n, kind="outliers", seed=s), fam, "outlier input features (20×)"
            from ..methods.fista import ill_conditioned_problem
            return ill_conditioned_problem(m, n, 1e4, seed=s, scale=10.0), fam, "Gram spectrum log-spaced, κ = 1e4"
        if fam == "low-rank":
            r = max(1, n // 4)
            N = max(4 * n, 64)
            X = torch.randn(N, r, generator=g, dtype=f64) @ torch.randn(r, n, generator=g, dtype=f64)
            X += 1e-3 * torch.randn(N, n, generator=g, dtype=f64)
            if k % 2:
                X[:, int(torch.randint(0, n, (1,), generator=g))] = 0.0
            W0 = torch.randn(m, n, generator=g, dtype=f64)
            return (LayerProblem.from_activations(W0, X, dtype=f64, name=f"low-rank-{m}x{n}"), fam,
                    f"rank-{r} inputs + 1e-3 noise" + (", one dead input" if k % 2 else ""))
        # real slices
        if self._real is not None:
            layers, X, how = self._real
            name, W = layers[(k // len(FAMILIES)) % len(layers)]
            rows = torch.randperm(W.shape[0], generator=g)[:m]
            cols = torch.randperm(W.shape[1], generator=g)[:n]
            p = LayerProblem.from_activations(W[rows][:, cols], X[:, cols], dtype=f64, name=f"{name}[slice]")
            return p, fam, f"{name} rows {rows.tolist()} × cols {cols.tolist()}; {how}"
        W0 = 0.05 * torch.randn(m, n, generator=g, dtype=f64) * torch.exp(torch.randn(m, n, generator=g, dtype=f64))
        N = max(4 * n, 64)
        X = torch.randn(N, n, generator=g, dtype=f64)
        X[:, torch.randperm(n, generator=g)[: max(1, n // 8)]] *= 30.0
        return (LayerProblem.from_activations(W0, X, dtype=f64, name=f"llm-like-{m}x{n}"), fam,
                "synthetic LLM-like layer (log-normal-scaled weights, outlier features)")

