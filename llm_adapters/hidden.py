"""Slicing the hidden dimension: a smaller residual stream that stock transformers loads (docs/methods.md §11).

``optprune prune --structure hidden --sparsity s`` makes the residual stream ``k`` wide instead of ``d``
(``k ≈ (1 − s)·d``, rounded to a multiple of the number of attention heads, which a stock config requires):
the embeddings, every layer that writes into the stream (attention output, MLP down), every layer that reads
it (q/k/v, up/gate, lm_head) and every RMSNorm shrink, and the config's ``hidden_size`` becomes ``k``.

**What is removed is chosen on the residual statistics.** One forward pass of the dense model over the
calibration sequences records, at every RMSNorm that reads the stream (two per block and the final one —
exactly the inputs the model's own forward gives them), the covariance of the token vectors scaled to unit RMS
(what the norm passes on, before its weight): ``Σ_j`` (each batch's product in float32, summed in float64),
and ``Σ = Σ_j Σ_j`` (each site weighs the same).
The layer problem of the stream is ``W0 = I_d`` with ``H = Σ``: ``f(W) = ½ tr((W − I) Σ (W − I)ᵀ)`` is the
energy lost when the stream ``x`` is replaced by ``Wx``.

* **Rotation** (``--method slicegpt``): the eigen-program on that problem — ``Q`` = the ``k`` principal
  directions of ``Σ`` (``formulations/subspace.py``). One rotation for the whole stream (not one per block),
  so no extra matrices are needed between blocks and the config stays standard.
* **Column selection** (``--method`` any structured method: ``spap``, ``group_obs``, ``flap``,
  ``group_magnitude``): the group-selection MIQP on the same problem with one group per hidden channel —
  keep ``k`` channels ``S``, and the least-squares reconstruction ``R = W_{:,S}`` (``d × k``) of the whole
  stream from them (``R_{S,:} = I``).

Both are written as a *write map* ``U`` (``d × k``: the new stream is ``Uᵀx``; ``U = Q``, or the identity
columns of ``S``) and a *read map* ``T`` (``d × k``: readers see ``T·(Uᵀx) ≈ x``; ``T = Q`` or ``R``). Then,
computing in float64 and saving in the model's dtype:

* RMSNorm weights ``w`` are folded into the readers: ``W_read ← W_read diag(w) T``;
* writers: ``W_write ← Uᵀ W_write`` (and their biases), embeddings ``E ← E U``;
* every RMSNorm now normalises the ``k``-vector ``y = Uᵀx`` over ``k`` entries while the model was trained on
  ``x`` over ``d``: its weight becomes the constant ``α_j = sqrt((d/k)·tr(UᵀΣ_jU)/tr Σ_j)``, which makes the
  mean scale right (``‖y‖ < ‖x‖`` token by token is the approximation this variant pays);
* the head: untied, ``lm_head ← lm_head diag(w_f) T``. **Tied** embeddings stay one matrix ``E U`` under
  column selection, with the final norm's weight ``α_f · diag(Uᵀ diag(w_f) T)`` = ``α_f·w_f`` on ``S`` (exact
  on the kept channels). A rotation cannot keep the tie (the same diagonal is only an approximation, and on
  SmolLM2-135M it alone took the WikiText-2 loss from 3.09 to 19.1 at full width), so :func:`prune_hidden`
  gives a tied model's rotation its own head ``E diag(w_f) Q`` (``tie_word_embeddings`` false: a standard
  config, ``V·k`` more parameters).

Only RMSNorm models with two norms per block (LLaMA-style pre-norm blocks) are sliced; a LayerNorm subtracts
the mean, which no rotation preserves, and is refused.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from ..formulations.patterns import ColumnGroups, check_sparsity
from ..formulations.problem import LayerProblem
from .architectures import ArchSpec, get_arch, get_module
from .loading import count_parameters
from .surgery import SurgeryError

__all__ = ["HiddenError", "hidden_plan", "residual_statistics", "stream_problem", "slice_hidden", "prune_hidden",
           "hidden_width", "count_parameters"]

#: methods that choose a rotation (the eigen-program); every structured (groups) method selects columns
ROTATION_METHODS = ("slicegpt",)


class HiddenError(SurgeryError):
    """A model or option the hidden-dimension slicing cannot take."""


def _is_rmsnorm(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return ("rmsnorm" in type(mod).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1
            and getattr(mod, "bias", None) is None)


def _norm_children(block: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in block.named_children() if "norm" in type(m).__name__.lower() or "norm" in n.lower()]


def hidden_plan(model: nn.Module, arch: Optional[ArchSpec] = None) -> dict:
    """Where the residual stream is read and written; :class:`HiddenError` (one line) if it cannot be sliced."""
    arch = arch or get_arch(model)
    if arch.heads is None or arch.heads.fused_qkv or arch.mlp is None:
        raise HiddenError(f"--structure hidden needs separate q/k/v projections and an MLP table; architecture "
                          f"{arch.name!r} has neither")
    cfg = model.config
    d = int(getattr(cfg, "hidden_size"))
    blocks = get_module(model, arch.blocks)
    plan = {"d": d, "blocks": []}
    for i, b in enumerate(blocks):
        norms = _norm_children(b)
        if len(norms) != 2 or not all(_is_rmsnorm(m) for _, m in norms):
            kinds = ", ".join(f"{n} ({type(m).__name__})" for n, m in norms) or "none"
            raise HiddenError(f"--structure hidden needs pre-norm blocks with two RMSNorms (attention, MLP); block "
                              f"{i} has: {kinds} (a LayerNorm subtracts the mean, which no rotation preserves)")
        plan["blocks"].append({"attn_norm": norms[0][0], "mlp_norm": norms[1][0]})
    final = get_module(model, arch.final_norm) if arch.final_norm else None
    if final is None or not _is_rmsnorm(final):
        raise HiddenError(f"--structure hidden needs a final RMSNorm; found {type(final).__name__}")
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, nn.Linear) or getattr(head, "bias", None) is not None:
        raise HiddenError("--structure hidden needs a bias-free linear lm_head")
    emb = model.get_input_embeddings()
    plan["tied"] = head.weight is emb.weight
    plan["heads"] = int(getattr(cfg, arch.heads.heads_key))
    plan["head_dim"] = int(getattr(get_module(blocks[0], arch.heads.q.rsplit(".", 1)[0]), "head_dim"))
    return plan


def hidden_width(d: int, sparsity: float, heads: int) -> int:
    """``k``: ``(1 − s)·d`` rounded to the nearest multiple of the head count (a stock config needs
    ``hidden_size % num_attention_heads == 0``), at least one multiple, at most ``d``."""
    s = check_sparsity(sparsity)
    k = int(round((1.0 - s) * d / heads)) * heads
    return max(heads, min(k, d - (d % heads) if d % heads else d))


@torch.no_grad()
def residual_statistics(model: nn.Module, calib: torch.Tensor, *, arch: Optional[ArchSpec] = None,
                        batch_size: int = 8, device=None, progress: bool = False) -> dict:
    """Per RMSNorm reading the stream, ``Σ_j = Σ_t x̃_t x̃_tᵀ`` of the token vectors scaled to unit RMS
    (float64), from one dense forward over ``calib`` (``(B, T)`` token ids). ``{"sites": [names], "sigmas":
    [Σ_j], "tokens": N}``."""
    arch = arch or get_arch(model)
    plan = hidden_plan(model, arch)
    blocks = get_module(model, arch.blocks)
    mods, names = [], []
    for i, (b, p) in enumerate(zip(blocks, plan["blocks"])):
        for key in ("attn_norm", "mlp_norm"):
            mods.append(getattr(b, p[key]))
            names.append(f"{arch.blocks}.{i}.{p[key]}")
    mods.append(get_module(model, arch.final_norm))
    names.append(arch.final_norm)
    d = plan["d"]
    sig = [torch.zeros(d, d, dtype=torch.float64) for _ in mods]
    count = {"n": 0}
    hooks = []
    for j, m in enumerate(mods):
        def hook(module, args, j=j):
            x = args[0].detach().reshape(-1, d).to(torch.float32)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp_min(1e-30))
            sig[j].add_((x.T @ x).cpu().to(torch.float64))  # per batch in float32, summed in float64
            if j == 0:
                count["n"] += x.shape[0]
        hooks.append(m.register_forward_pre_hook(hook))
    dev = device or next(model.parameters()).device
    model.to(dev)
    try:
        for b0 in range(0, calib.shape[0], batch_size):
            model(calib[b0:b0 + batch_size].to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {"sites": names, "sigmas": sig, "tokens": count["n"]}


def stream_problem(stats: dict) -> LayerProblem:
    """The layer problem of the residual stream: ``W0 = I_d``, ``H = Σ_j Σ_j``."""
    S = sum(stats["sigmas"])
    S = 0.5 * (S + S.T)
    d = S.shape[0]
    return LayerProblem(torch.eye(d, dtype=torch.float64), S, name="residual stream",
                        nsamples=int(stats["tokens"]) * len(stats["sigmas"]))


def _maps(model, method: str, problem: LayerProblem, k: int, method_options: dict) -> tuple:
    """``(U, T, result info)`` for the chosen method."""
    from ..solvers import get_method
    from ..formulations.subspace import Subspace
    spec = get_method(method)
    d = problem.n
    if spec.name in ROTATION_METHODS or "subspace" in spec.patterns:
        res = spec(problem, Subspace(keep=k), **method_options)
        Q = res.info["Q"].to(torch.float64).cpu()
        return Q, Q, res, "rotation"
    if not spec.structured:
        raise HiddenError(f"--structure hidden takes a rotation method ({', '.join(ROTATION_METHODS)}) or a "
                          f"structured (column-group) method; {spec.name!r} prunes single weights")
    res = spec(problem, ColumnGroups(1, keep=k), **method_options)
    mask = torch.as_tensor(res.mask).bool().cpu()
    cols = mask.any(0)
    S = cols.nonzero().squeeze(1)
    if S.numel() != k:
        raise HiddenError(f"{spec.name} kept {S.numel()} channels, expected {k}")
    W = res.W.detach().to(torch.float64).cpu()
    U = torch.zeros(d, k, dtype=torch.float64)
    U[S, torch.arange(k)] = 1.0
    T = W[:, S].clone()
    return U, T, res, "selection"


def _set_weight(mod: nn.Module, W: torch.Tensor, dtype) -> None:
    mod.weight = nn.Parameter(W.to(dtype).contiguous(), requires_grad=False)
    if isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = W.shape
    elif isinstance(mod, nn.Embedding):
        mod.embedding_dim = W.shape[1]


@torch.no_grad()
def slice_hidden(model: nn.Module, stats: dict, U: torch.Tensor, T: torch.Tensor,
                 arch: Optional[ArchSpec] = None, *, untie: bool = False) -> dict:
    """Rewrite ``model`` in place to the stream ``Uᵀx`` (module doc); returns what was done. ``untie``: give a
    tied model its own ``lm_head = E diag(w_f) T`` (exact, but ``V·k`` more parameters; for measuring what the
    tied head's diagonal approximation costs)."""
    arch = arch or get_arch(model)
    plan = hidden_plan(model, arch)
    d, k = U.shape
    if d != plan["d"] or tuple(T.shape) != (d, k):
        raise HiddenError(f"maps of shape {tuple(U.shape)}/{tuple(T.shape)} do not fit the stream width {plan['d']}")
    if k % plan["heads"]:
        raise HiddenError(f"width {k} is not a multiple of the {plan['heads']} attention heads")
    f64 = torch.float64
    sig = stats["sigmas"]

    def alpha(j):
        tot = float(torch.trace(sig[j]))
        kept = float(torch.trace(U.T @ sig[j] @ U))
        return (d / k * kept / tot) ** 0.5 if tot > 0 else 1.0

    def read(paths, block, norm):
        w = norm.weight.detach().to(f64).cpu()
        for p in paths:
            lin = get_module(block, p)
            W = lin.weight.detach().to(f64).cpu()
            _set_weight(lin, (W * w) @ T, lin.weight.dtype)

    def write(paths, block):
        for p in paths:
            lin = get_module(block, p)
            W = lin.weight.detach().to(f64).cpu()
            _set_weight(lin, U.T @ W, lin.weight.dtype)
            if getattr(lin, "bias", None) is not None:
                lin.bias = nn.Parameter((U.T @ lin.bias.detach().to(f64).cpu()).to(lin.bias.dtype),
                                        requires_grad=False)

    alphas = []
    h, m = arch.heads, arch.mlp
    for i, (block, names) in enumerate(zip(get_module(model, arch.blocks), plan["blocks"])):
        attn_norm, mlp_norm = getattr(block, names["attn_norm"]), getattr(block, names["mlp_norm"])
        read((h.q, h.k, h.v), block, attn_norm)
        read(m.ups, block, mlp_norm)
        write((h.o,), block)
        write((m.down,), block)
        for j, nrm in ((2 * i, attn_norm), (2 * i + 1, mlp_norm)):
            a = alpha(j)
            alphas.append(a)
            nrm.weight = nn.Parameter(torch.full((k,), a, dtype=nrm.weight.dtype), requires_grad=False)
    final = get_module(model, arch.final_norm)
    af = alpha(len(sig) - 1)
    alphas.append(af)
    tied, head_fit = _map_embeddings_and_head(model, plan, final, af, U, T, untie)
    cfg = model.config
    cfg.head_dim = plan["head_dim"]
    cfg.hidden_size = k
    return {"hidden_before": d, "hidden_after": k, "tied_embeddings": tied, "untied": bool(plan["tied"] and untie),
            "norm_scales": alphas,
            "tied_head_rel_misfit": head_fit}


def _map_embeddings_and_head(model: nn.Module, plan: dict, final: nn.Module, af: float, U: torch.Tensor,
                             T: torch.Tensor, untie: bool) -> tuple[bool, float]:
    """Embeddings ``E → E U``; an untied head ``H → (H diag(w_f)) T`` with the final norm set to ``af``; a tied
    head stays ``E U`` with the final norm ``af · diag(Uᵀ diag(w_f) T)`` (the diagonal fit of the tied map).
    Returns (tied, relative misfit of that diagonal fit; 0 untied)."""
    f64 = torch.float64
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    dt = emb.weight.dtype
    k = U.shape[1]
    wf = final.weight.detach().to(f64).cpu()
    E = emb.weight.detach().to(f64).cpu()
    tied = plan["tied"] and not untie
    if plan["tied"] and untie:
        head.weight = nn.Parameter(E.clone().to(dt), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    if tied:
        c = (U * (wf[:, None] * T)).sum(0)  # diag(Uᵀ diag(w_f) T)
        _set_weight(emb, E @ U, dt)
        head.weight = emb.weight
        head.out_features, head.in_features = head.weight.shape
        final.weight = nn.Parameter((af * c).to(final.weight.dtype), requires_grad=False)
        head_fit = float(torch.linalg.matrix_norm(U * c - wf[:, None] * T) /
                         torch.linalg.matrix_norm(wf[:, None] * T))
    else:
        Hh = head.weight.detach().to(f64).cpu()
        _set_weight(emb, E @ U, dt)
        if head.weight is emb.weight:  # (untie: the head had no separate matrix until now)
            head.weight = nn.Parameter(Hh.to(dt), requires_grad=False)
        _set_weight(head, (Hh * wf) @ T, head.weight.dtype)
        final.weight = nn.Parameter(torch.full((k,), af, dtype=final.weight.dtype), requires_grad=False)
        head_fit = 0.0
    return tied, head_fit


def prune_hidden(model: nn.Module, calib: torch.Tensor, *, method: str, sparsity: float,
                 method_options: Optional[dict] = None, batch_size: int = 8, device=None,
                 progress: bool = False) -> dict:
    """Slice the hidden dimension of ``model`` in place (statistics, program, rewrite); returns the record
    (``layers``: one row for the stream's problem; ``hidden``: widths, parameters, the program's values)."""
    arch = get_arch(model)
    plan = hidden_plan(model, arch)
    k = hidden_width(plan["d"], sparsity, plan["heads"])
    t0 = time.perf_counter()
    n_before = count_parameters(model)
    stats = residual_statistics(model, calib, arch=arch, batch_size=batch_size, device=device, progress=progress)
    model.to("cpu")
    t_stats = time.perf_counter() - t0
    problem = stream_problem(stats)
    t1 = time.perf_counter()
    U, T, res, form = _maps(model, method, problem, k, dict(method_options or {}))
    t_solve = time.perf_counter() - t1
    W = T @ U.T  # the stream map x ↦ T Uᵀ x
    err, err0 = problem.objective(W), problem.objective(torch.zeros_like(W))
    from ..formulations.subspace import fan_optimum
    total = float(torch.trace(problem.H))
    bound = 0.5 * (total - fan_optimum(problem.H, k))  # no rank-k map of the stream loses less (Eckart–Young)
    # a rotation cannot keep a tied head: its diagonal approximation alone collapsed SmolLM2-135M (WikiText-2 loss
    # 3.09 → 19.1 at full width), so a tied model gets its own head (exact; V·k parameters, a standard config)
    info = slice_hidden(model, stats, U, T, arch, untie=form == "rotation" and plan["tied"])
    n_after = count_parameters(model)
    layer = {"name": "residual stream", "block": "stream", "kind": "hidden", "shape": [plan["d"], plan["d"]],
             "shape_after": [plan["d"], k], "sparsity_target": check_sparsity(sparsity),
             "sparsity": 1 - k / plan["d"], "error": err, "error_before": err0,
             "rel_error": err / err0 if err0 > 0 else None, "time_s": t_solve, "method": method}
    hidden = dict(info, form=form, method=method, kept_fraction=k / plan["d"], sites=len(stats["sigmas"]),
                  tokens=stats["tokens"], lost_energy=2 * err / total if total > 0 else None,
                  lost_energy_rank_bound=2 * bound / total if total > 0 else None,
                  params_before=n_before, params_after=n_after, statistics_s=t_stats, solve_s=t_solve,
                  solver_info={kk: v for kk, v in (res.info or {}).items()
                               if isinstance(v, (int, float, str, bool)) or v is None})
    return {"layers": [layer], "blocks": [], "time_s": time.perf_counter() - t0, "hidden": hidden}


def save_sliced(model: nn.Module, tok, out_dir, dtype=None) -> dict:
    """``save_pretrained`` of the sliced model: a standard config with the smaller ``hidden_size``."""
    from pathlib import Path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu")
    if dtype is not None:
        model.to(dtype)
    cfg = model.config
    from .surgery import drop_quantization_config
    drop_quantization_config(model)
    model.save_pretrained(str(out))
    if tok is not None:
        tok.save_pretrained(str(out))
    return {"path": str(out.resolve()), "format": "hf", "stock_loadable": True,
            "hidden_size": int(cfg.hidden_size), "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
