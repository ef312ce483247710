"""The cost model of the benchmarks (benchmarks/models/cost_model.py) counts what runs: the forward FLOPs of a
Llama-shaped model and the statistics' FLOPs, checked against torch's own FLOP counter."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


def _cost_model():
    spec = importlib.util.spec_from_file_location("cost_model", REPO / "benchmarks" / "models" / "cost_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CM = _cost_model()


def test_forward_flops_are_torchs_count_of_the_model():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    cfg._attn_implementation = "eager"  # attention as matrix products, which the counter sees
    model = transformers.LlamaForCausalLM(cfg).eval()
    B, L = 3, 24
    dims = CM.llama_dims(cfg)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randint(0, 101, (B, L)), use_cache=False)
    counted = fc.get_total_flops()
    blk = CM.block_flops(dims, B, L, error_correction=False, mode="sequential", last=True)
    # with no propagation and no error correction a block runs the pass up to the down projection's input;
    # a full pass adds the down projection itself
    full = blk["forward"] + 2 * B * L * dims["ff"] * dims["d"]
    head = 2 * B * L * dims["d"] * dims["vocab"]
    assert counted == pytest.approx(dims["blocks"] * full + head, rel=1e-9)
    assert blk["params"] == sum(p.numel() for n, p in model.model.layers[0].named_parameters() if "proj" in n)


class _ProductFlops(torch.utils._python_dispatch.TorchDispatchMode):
    """2·m·k·n per matrix product (``mm``/``addmm`` and their in-place forms, which FlopCounterMode skips)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[-2], args[-1]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def test_statistics_flops_are_the_accumulators_products():
    from optprune.formulations import problem as P
    assert (CM.SYRK_BLOCK, CM.SYRK_MIN_N) == (P.SYRK_BLOCK, P.SYRK_MIN_N)
    for n, corrected in ((P.SYRK_MIN_N + 100, False), (P.SYRK_MIN_N + 100, True), (96, True)):
        T = 5
        acc = P.GramAccumulator(n, corrected=corrected)
        x = torch.randn(T, n)
        with _ProductFlops() as fc:
            acc.add(x, x if corrected else None)
        want = CM._gram(T, n) * (2 if corrected else 1) + (2 * T * n * n if corrected else 0)
        assert fc.flops == want


def test_error_correction_and_propagation_count_the_passes_the_pipeline_runs():
    dims = CM.llama_dims(dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=101))
    f = {ec: CM.block_flops(dims, 2, 16, error_correction=ec) for ec in (False, True)}
    last = {ec: CM.block_flops(dims, 2, 16, error_correction=ec, last=True) for ec in (False, True)}
    full = f[False]["forward"] - last[False]["forward"]  # the propagating pass
    assert f[True]["forward"] - last[True]["forward"] == pytest.approx(full)
    assert f[True]["forward"] > f[False]["forward"]  # a dense and a pruned partial pass per later group
    assert f[True]["statistics"] > f[False]["statistics"]  # Ĥ and C from the second group on
