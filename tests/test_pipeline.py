"""The sequential pruning pipeline (llm_adapters/pipeline.py) on stories260K and tiny random OPT / GPT-2."""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from optprune.formulations import ColumnGroups, PatternError  # noqa: E402
from optprune.llm_adapters.architectures import get_arch, get_module, linear_weight  # noqa: E402
from optprune.llm_adapters import pipeline as pl  # noqa: E402
from optprune.llm_adapters.pipeline import PruneConfig, prune_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ["OPTPRUNE_MODEL_DIR"])  # set by tests/conftest.py
STORIES = MODEL_DIR / "stories260K"




def stories():
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found in {MODEL_DIR}")
    m = transformers.AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32)
    return m.eval()


def calib(n=8, L=64, vocab=512, seed=0):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sublayer_weights(model, arch, bi=None):
    blocks = get_module(model, arch.blocks)
    idx = range(len(blocks)) if bi is None else [bi]
    return {f"{i}.{s}": linear_weight(get_module(blocks[i], s), s in arch.transposed).clone()
            for i in idx for s in arch.sublayer_names()}


# --------------------------------------------------------------------------------------------- 1. replay
def test_replay_reproduces_logits():
    model = stories()
    arch = get_arch(model)
    ids = calib(7, 48)
    inp = pl.capture_block_inputs(model, ids, device="cpu", batch_size=3)  # batches 3, 3, 1
    assert len(inp.batches) == 3
    # rotary tables of equal-sized batches are stored once
    assert inp.batches[0][2]["position_embeddings"] is inp.batches[1][2]["position_embeddings"]
    h = inp.hidden
    for block in get_module(model, arch.blocks):
        h = pl.forward_block(block, pl.BlockInputs(h, inp.batches))
    logits = model.get_output_embeddings()(get_module(model, arch.final_norm)(h))
    with torch.no_grad():
        ref = model(ids).logits
    assert (logits - ref).abs().max().item() < 1e-4


# --------------------------------------------------------------------------------------------- 2. sparsity
@pytest.mark.parametrize("method,pattern", [("magnitude", "unstructured"), ("wanda", "unstructured"),
                                            ("sparsegpt", "unstructured"), ("sparsegpt", "row"),
                                            ("wanda", "2:4"), ("sparsegpt", "2:4")])
def test_achieved_sparsity_per_layer(method, pattern):
    model = stories()
    arch = get_arch(model)
    special = f"{arch.blocks}.1.mlp.down_proj"
    ls = {special: 0.75} if pattern != "2:4" else None
    rep = prune_model(model, calib(), PruneConfig(method=method, pattern=pattern, layer_sparsity=ls), progress=False)
    assert len(rep["layers"]) == 5 * 7
    for r in rep["layers"]:
        mod = get_module(model, r["name"])
        W = linear_weight(mod, False)
        m, n = W.shape
        assert [m, n] == r["shape"]
        zeros = int((W == 0).sum())
        target = 0.75 if ls and r["name"] == special else 0.5
        if pattern == "unstructured" and method != "wanda":
            assert zeros == int(target * m * n), r["name"]
        else:  # per row (Wanda compares within rows; 2:4 is per row group)
            assert ((W == 0).sum(1) == int(target * n)).all(), r["name"]
            if pattern == "2:4":
                assert ((W.reshape(m, n // 4, 4) != 0).sum(2) <= 2).all()
        assert r["sparsity"] == pytest.approx(zeros / (m * n))
        assert r["sparsity_target"] == pytest.approx(target, abs=1 / n)
        assert r["error"] is not None and r["error"] >= 0 and 0 <= r["rel_error"]
    logits = model(calib(2, 32)).logits
    assert torch.isfinite(logits).all()
    assert rep["time_s"] > 0 and rep["peak_rss_mb"] > 0 and len(rep["blocks"]) == 5


def test_diag_only_statistics_for_wide_layers(monkeypatch):
    ids = calib()
    full_model, diag_model = stories(), stories()
    arch = get_arch(full_model)
    prune_model(full_model, ids, PruneConfig(method="wanda"), progress=False)
    monkeypatch.setattr(pl, "DIAG_ONLY_ABOVE", 0)
    rep = prune_model(diag_model, ids, PruneConfig(method="wanda"), progress=False)
    assert all(r["stats"] == "diag" and r["error"] is None for r in rep["layers"])
    a, b = sublayer_weights(full_model, arch), sublayer_weights(diag_model, arch)
    # Wanda needs only ‖X_j‖: the same masks (norms summed in another order may flip exact ties only)
    agree = sum(int(((a[k] != 0) == (b[k] != 0)).sum()) for k in a) / sum(a[k].numel() for k in a)
    assert agree > 0.999


# --------------------------------------------------------------------------------------------- 3. modes
def test_modes_and_error_correction():
    ids = calib()
    recs = {}
    for mode in ("sequential", "dense-input"):
        for ec in (True, False):
            model = stories()
            rep = prune_model(model, ids, PruneConfig(method="sparsegpt", mode=mode, error_correction=ec),
                              progress=False)
            assert abs(rep["sparsity"] - 0.5) < 1e-6
            assert torch.isfinite(model(ids[:2]).logits).all()
            recs[mode, ec] = {r["name"]: r for r in rep["layers"]}
    for mode in ("sequential", "dense-input"):
        on, off = recs[mode, True], recs[mode, False]
        # without correction every problem has X̂ = X: f(W0) = 0; with it the o/up/gate/down problems do not
        assert all(r["error_before"] == 0.0 for r in off.values())
        assert all(r["error_before"] == 0.0 for k, r in on.items() if "self_attn.q_proj" in k)
        assert all(r["error_before"] > 0 for k, r in on.items() if "mlp.down_proj" in k)
    # dense-input, error-correction off: block 0 sees identical problems in both modes (same dense input)
    k = "model.layers.0.self_attn.q_proj"
    assert recs["sequential", False][k]["error"] == pytest.approx(recs["dense-input", False][k]["error"])
    assert recs["sequential", True]["model.layers.4.mlp.down_proj"]["error"] != \
        recs["dense-input", True]["model.layers.4.mlp.down_proj"]["error"]


@pytest.mark.parametrize("ec", [True, False])
def test_dense_input_single_block_equals_full_run(ec):
    ids = calib()
    full = stories()
    arch = get_arch(full)
    cfg = dict(method="sparsegpt", mode="dense-input", error_correction=ec, batch_size=3)
    prune_model(full, ids, PruneConfig(**cfg), progress=False)
    for i in (0, 3):
        one = stories()
        dense = sublayer_weights(one, arch)
        rep = prune_model(one, ids, PruneConfig(**cfg, blocks=[i]), progress=False)
        assert {r["block"] for r in rep["layers"]} == {i}
        got, want = sublayer_weights(one, arch), sublayer_weights(full, arch)
        for k in got:
            if k.startswith(f"{i}."):
                assert torch.equal(got[k], want[k]), k  # bit for bit: the basis for parallel pruning
            else:
                assert torch.equal(got[k], dense[k]), k  # other blocks untouched


# --------------------------------------------------------------------------------------------- 4. quality
def test_sparsegpt_error_below_magnitude():
    ids = calib(16, 64)
    tot = {}
    for method in ("magnitude", "sparsegpt"):
        for ec in (True, False):
            model = stories()
            rep = prune_model(model, ids, PruneConfig(method=method, mode="dense-input", error_correction=ec),
                              progress=False)
            tot[method, ec] = sum(r["error"] for r in rep["layers"])
    assert tot["sparsegpt", True] < tot["magnitude", True]
    assert tot["sparsegpt", False] < 0.8 * tot["magnitude", False]  # stories260K: < 0.5; the tiny test model: ~0.6


# --------------------------------------------------------------------------------------------- 5. bad input
@pytest.mark.parametrize("kw,match", [
    (dict(method="sparsegpt", sparsity=1.2), "sparsity"),
    (dict(method="sparsegpt", pattern="3:2"), "N ≤ M"),
    (dict(method="sparsegpt", pattern="4:8"), "model.layers.0.mlp.down_proj has shape 64x172"),
    (dict(method="no-such-method"), "unknown method"),
    (dict(method="magnitude", pattern="groups"), "does not handle"),
    (dict(method="wanda", layer_sparsity={"model.layers.9.mlp.down_proj": 0.6}), "unknown sub-layers"),
    (dict(method="wanda", layer_sparsity={"model.layers.0.mlp.down_proj": 1.5}), "sparsity of"),
    (dict(method="wanda", blocks=[7]), "blocks"),
    (dict(method="wanda", mode="parallel"), "mode"),
])
def test_bad_input_changes_nothing(kw, match):
    model = stories()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match) as ei:
        prune_model(model, calib(), PruneConfig(**kw), progress=False)
    assert "\n" not in str(ei.value)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_calibration_ids():
    model = stories()
    with pytest.raises(ValueError, match="vocabulary"):
        prune_model(model, calib(vocab=10_000), PruneConfig(method="wanda"), progress=False)
    with pytest.raises(ValueError, match="nsamples, seqlen"):
        prune_model(model, torch.zeros(5, dtype=torch.long), PruneConfig(method="wanda"), progress=False)


def test_numerical_error_names_layer(monkeypatch):
    from optprune.formulations import NumericalError
    from optprune.solvers import registry
    from optprune.solvers.base import LayerResult

    def broken(problem, pattern, **_):
        W = problem.W0.clone()
        W[0, 0] = float("nan")
        return LayerResult(W, torch.ones_like(W, dtype=torch.bool), {"error": 0.0})

    registry.list_methods()
    monkeypatch.setitem(registry._METHODS, "_nan", registry.MethodSpec("_nan", broken, needs="none"))
    model = stories()
    with pytest.raises(NumericalError, match="model.layers.0.self_attn.q_proj"):
        prune_model(model, calib(), PruneConfig(method="_nan"), progress=False)


# --------------------------------------------------------------------------------------------- 6. OPT, GPT-2
def _tiny(kind):
    torch.manual_seed(0)
    if kind == "opt":
        cfg = transformers.OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
        return transformers.OPTForCausalLM(cfg)
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("kind", ["opt", "gpt2"])
@pytest.mark.parametrize("pattern", ["unstructured", "row"])
def test_tiny_opt_gpt2_end_to_end(kind, pattern):
    model = _tiny(kind)  # freshly built models are in train mode (dropout): the pipeline must use eval()
    arch = get_arch(model)
    ids = calib(6, 32, vocab=128)
    rep = prune_model(model, ids, PruneConfig(method="sparsegpt", pattern=pattern), progress=False)
    assert model.training  # training flag restored
    assert len(rep["layers"]) == 2 * len(arch.sublayer_names())
    for r in rep["layers"]:
        sub = r["name"].split(".", 3)[-1]
        mod = get_module(model, r["name"])
        W = linear_weight(mod, sub in arch.transposed)  # (out, in) whatever the storage
        assert list(W.shape) == r["shape"]
        m, n = W.shape
        if pattern == "row":  # per row of the (out, in) layout: a transposition mistake breaks this
            assert ((W == 0).sum(1) == n // 2).all(), r["name"]
        assert int((W == 0).sum()) == m * n // 2, r["name"]
        assert r["error"] < r["error"] + r["error_before"] + 1 and r["rel_error"] < 1.0
    if kind == "gpt2":
        r = next(r for r in rep["layers"] if r["name"].endswith("attn.c_attn"))
        assert r["shape"] == [96, 32]  # Conv1D stores (32, 96)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


# --------------------------------------------------------------------------------------------- structured
def _fake_surgery():
    """A stand-in for llm_adapters/surgery.py (MLP neurons only) exercising the pipeline's contract."""
    from torch import nn
    mod = types.ModuleType("optprune.llm_adapters.surgery")
    calls = []

    def structure_pattern(model, arch, bi, kind, sparsity):
        assert kind == "mlp"
        return arch.mlp.down, ColumnGroups(1, sparsity=sparsity)

    def apply_structured(model, arch, bi, kind, result, pattern):
        block = get_module(model, arch.blocks)[bi]
        keep = result.mask.any(0).nonzero().flatten()
        down = get_module(block, arch.mlp.down)
        new = nn.Linear(len(keep), down.out_features, bias=False)
        new.weight.data.copy_(result.W[:, keep])
        parent, leaf = arch.mlp.down.rsplit(".", 1)
        setattr(get_module(block, parent), leaf, new)
        for up in arch.mlp.ups:
            old = get_module(block, up)
            lin = nn.Linear(old.in_features, len(keep), bias=False)
            lin.weight.data.copy_(old.weight.data[keep])
            p, leaf = up.rsplit(".", 1)
            setattr(get_module(block, p), leaf, lin)
        calls.append(bi)
        return {"kept": len(keep)}

    mod.structure_pattern, mod.apply_structured, mod.calls = structure_pattern, apply_structured, calls
    return mod


def test_structured_method_calls_surgery(monkeypatch):
    from optprune.solvers import registry
    from optprune.solvers.methods.baselines import refit_result
    from optprune.solvers.base import LayerResult

    def neurons(problem, pattern, **_):
        mask = pattern.project(problem.W0.abs() * problem.col_norms().unsqueeze(0))
        return refit_result(problem, LayerResult(problem.W0 * mask, mask, {"error": problem.objective(problem.W0 * mask)}))

    registry.list_methods()
    monkeypatch.setitem(registry._METHODS, "_neurons",
                        registry.MethodSpec("_neurons", neurons, needs="gram", patterns=frozenset({"groups"}),
                                            structured=True))
    fake = _fake_surgery()
    monkeypatch.setitem(sys.modules, "optprune.llm_adapters.surgery", fake)
    import optprune.llm_adapters as package
    monkeypatch.setattr(package, "surgery", fake, raising=False)  # what ``from . import surgery`` reads
    model = stories()
    ids = calib()
    rep = prune_model(model, ids, PruneConfig(method="_neurons", sparsity=0.5, structure="mlp"), progress=False)
    assert fake.calls == [0, 1, 2, 3, 4]
    assert [r["name"] for r in rep["layers"]] == [f"model.layers.{i}.mlp.down_proj" for i in range(5)]
    for r in rep["layers"]:
        assert r["shape"] == [64, 172] and r["shape_after"] == [64, 86] and r["kept"] == 86
        assert r["sparsity"] == pytest.approx(0.5)
        assert r["error_before"] == 0.0 and r["error"] > 0  # nothing upstream of down is pruned here
    assert torch.isfinite(model(ids[:2]).logits).all()


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_model_on_cpu():
    ids = calib()
    cpu_model, gpu_model = stories(), stories()
    arch = get_arch(cpu_model)
    prune_model(cpu_model, ids, PruneConfig(method="sparsegpt", device="cpu"), progress=False)
    rep = prune_model(gpu_model, ids, PruneConfig(method="sparsegpt", device="cuda"), progress=False)
    assert rep["peak_cuda_mb"] > 0
    assert all(p.device.type == "cpu" for p in gpu_model.parameters())
    a, b = sublayer_weights(cpu_model, arch), sublayer_weights(gpu_model, arch)
    for k in a:
        assert int((b[k] == 0).sum()) == int((a[k] == 0).sum())


# --------------------------------------------------------------------------------------------- memory
class _WholeSetAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the tensors created with the shape of the whole calibration set's hidden states."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_tensor(out) and tuple(out.shape) == self.shape and out.data_ptr() not in \
                {a.data_ptr() for a in args if torch.is_tensor(a)}:
            self.count += 1
        return out


@pytest.mark.parametrize("mode,ec", [("sequential", True), ("sequential", False), ("dense-input", True),
                                     ("dense-input", False)])
def test_the_walk_holds_one_activation_buffer(mode, ec):
    """The calibration set's hidden states exist once: every forward writes a batch's outputs over that
    batch's inputs (no second whole-set buffer for the outputs), in every mode — and the result is that of a
    walk with separate input and output buffers (block-by-block dense-input parity is tested above)."""
    model = stories()
    ids = calib(n=6, L=32)
    d = model.config.hidden_size
    with _WholeSetAllocations((6, 32, d)) as watch:
        prune_model(model, ids, PruneConfig(method="sparsegpt", sparsity=0.5, mode=mode, error_correction=ec,
                                            batch_size=2, device="cpu"), progress=False)
    assert watch.count == 1  # the capture's buffer, and nothing else of its size


# --------------------------------------------------------------------------------------------- passes
@pytest.mark.parametrize("mode,ec", [("sequential", True), ("dense-input", True), ("sequential", False),
                                     ("dense-input", False)])
def test_each_block_forward_runs_once_where_once_suffices(mode, ec):
    """The passes the walk makes over a block, counted at the block's first sub-layer (a pass that stops at a
    group's input before it does not count): with error correction a pruned and a dense pass per later group
    (the dense outputs of dense-input mode come from the last of them, not from a pass of their own); without,
    one pass for every group's statistics; in sequential mode also the pruned block's full pass for the next
    block's inputs. Two blocks: the last one propagates nothing."""
    model = stories()
    arch = get_arch(model)
    ids = calib(n=6, L=32)
    n_batches, groups = 3, len(arch.sublayers)
    for bi in (0, 1):  # the flag travels with the pipeline's dense copy of the block (deepcopy)
        get_module(model, f"{arch.blocks}.{bi}.{arch.sublayers[0][0]}").optprune_test_count = True
    calls = [0]

    def count(mod, a, out):
        calls[0] += bool(getattr(mod, "optprune_test_count", False))

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        prune_model(model, ids, PruneConfig(method="sparsegpt", sparsity=0.5, mode=mode, error_correction=ec,
                                            batch_size=2, blocks=[0, 1], device="cpu"), progress=False)
    finally:
        handle.remove()
    stats_passes = 2 * (groups - 1) if ec else 1
    propagate = 1 if mode == "sequential" else 0
    assert calls[0] == n_batches * (2 * stats_passes + propagate)


def test_activations_held_in_the_activation_dtype():
    """``activation_dtype`` is the dtype of the one whole-set buffer (half of float32's bytes in bfloat16); each
    batch enters the block in the model's dtype, so the result stays close to the float32 walk's."""
    ids = calib(n=6, L=32)
    model = stories()
    inp = pl.capture_block_inputs(model, ids, device="cpu", batch_size=2, dtype=torch.bfloat16)
    assert inp.hidden.dtype == torch.bfloat16
    ref = pl.capture_block_inputs(model, ids, device="cpu", batch_size=2)
    assert torch.equal(inp.hidden, ref.hidden.to(torch.bfloat16))
    errs = {}
    for dt in (None, torch.bfloat16):
        m = stories()
        with _WholeSetAllocations((6, 32, m.config.hidden_size)) as watch:
            rep = prune_model(m, ids, PruneConfig(method="sparsegpt", sparsity=0.5, batch_size=2, device="cpu",
                                                  activation_dtype=dt), progress=False)
        assert watch.count == 1
        assert all(p.dtype == torch.float32 for p in m.parameters())
        errs[dt] = sum(r["error"] for r in rep["layers"])
    assert errs[torch.bfloat16] != errs[None]  # the stored inputs are rounded ...
    assert errs[torch.bfloat16] == pytest.approx(errs[None], rel=0.05)  # ... to bfloat16's precision only
