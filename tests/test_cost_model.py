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


def test_dense_input_error_correction_counts_one_full_pass_less():
    """Dense-input mode with error correction: the last group's dense pass runs on to the block's outputs (the
    pipeline's pass count is tested in test_pipeline), so a block costs a full pass less the last group's prefix
    more than the last block, not a whole full pass more."""
    dims = CM.llama_dims(dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=101))
    seq = CM.block_flops(dims, 2, 16, error_correction=True)
    den = CM.block_flops(dims, 2, 16, error_correction=True, mode="dense-input")
    last = CM.block_flops(dims, 2, 16, error_correction=True, last=True)
    down = 2 * 2 * 16 * dims["ff"] * dims["d"]  # the down projection: what a full pass adds to the last prefix
    assert den["forward"] - last["forward"] == pytest.approx(down)
    assert seq["forward"] > den["forward"]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / "models" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scale_report_counts_a_models_parameters_and_predicts_from_the_flop_model(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks" / "models"))
    SR = _script("scale_report")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=101, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert SR.n_params(CM.llama_dims(cfg)) == sum(p.numel() for p in model.parameters()) - norms
    for name, shape in CM.PREDICT_MODELS.items():
        g = CM.gpu_prediction(shape, 50e12, 1.5)
        total = CM.model_flops(CM.llama_dims(shape), 128, 2048, error_correction=True, cpu=False)["total"]
        assert g["one_s"] == pytest.approx(total / 50e12 * 1.5)
        assert g["many_s"] < g["one_s"]  # eight ranks, each its own eighth of the blocks
