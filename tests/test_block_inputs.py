"""Every block gets its own inputs: the hidden state and every argument the engine hands block i equal what the
model's own forward gives block i, for several transformers families (tiny random models built from configs
here, nothing downloaded), in memory and block by block from a safetensors directory (low memory).

Two of the families give different blocks different arguments: Gemma 3 (alternating sliding-window / global
attention, a rotary table per layer type with different bases) and Qwen2 with sliding windows on some layers.
"""
import copy
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from optprune.llm_adapters import pipeline as pl  # noqa: E402
from optprune.llm_adapters.architectures import get_arch, get_module, linear_weight  # noqa: E402

NS, SEQ, BS = 4, 12, 2  # 4 samples of 12 tokens, batches of 2; sliding windows of 4 < 12 tokens
VOCAB = 96


def _gemma3():
    c = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=4, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    return transformers.Gemma3ForCausalLM(c)


def _qwen2():
    c = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 use_sliding_window=True, sliding_window=4, max_window_layers=1)
    return transformers.Qwen2ForCausalLM(c)


def _llama():
    c = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(c)


def _opt():
    c = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=3,
                               num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.OPTForCausalLM(c)


def _gpt2():
    c = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(c)


FAMILIES = {"gemma3": _gemma3, "qwen2-sliding": _qwen2, "llama": _llama, "opt": _opt, "gpt2": _gpt2}
PER_LAYER = ("gemma3", "qwen2-sliding")  # families whose blocks get different arguments


def build(family):
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


def calib():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (NS, SEQ), generator=g)


# --------------------------------------------------------------------------------------------- helpers
def _snap(obj):
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if pl._is_cache(obj):
        return None
    if isinstance(obj, (tuple, list)):
        return type(obj)(_snap(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _snap(v) for k, v in obj.items()}
    return obj


def _close(a, b, tol=1e-5) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not a.is_floating_point():
            return torch.equal(a, b)
        both_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())  # additive masks hold -inf
        return bool(torch.where(both_inf, torch.zeros_like(a), (a - b).abs() - tol * (1 + b.abs())).max() <= 0)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    return type(a) is type(b) and a == b


class Calls:
    """Forward pre-hooks (with kwargs) on every block: (hidden, other args, kwargs) of every call."""

    def __init__(self, blocks):
        self.calls = [[] for _ in blocks]
        self.handles = [b.register_forward_pre_hook(self._make(i), with_kwargs=True) for i, b in enumerate(blocks)]

    def _make(self, i):
        def pre(mod, args, kwargs):
            if args:
                h, rest, kw = args[0], args[1:], dict(kwargs)
            else:
                kw = dict(kwargs)
                h, rest = kw.pop("hidden_states"), ()
            self.calls[i].append((_snap(h), _snap(tuple(rest)), _snap(kw)))
        return pre

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def reference(model, ids):
    """What the model's own forward gives each block, per calibration batch: ref[i][b] = (hidden, args, kwargs)."""
    blocks = get_module(model, get_arch(model).blocks)
    rec = Calls(blocks)
    try:
        for b0 in range(0, ids.shape[0], BS):
            model(ids[b0:b0 + BS], use_cache=False)
    finally:
        rec.remove()
    assert all(len(c) == ids.shape[0] // BS for c in rec.calls)
    return rec.calls


def check_calls(calls, ref, what):
    """Every call the engine made to block i matches the model's own inputs of one batch, and every batch is seen."""
    for i, (got, want) in enumerate(zip(calls, ref)):
        assert got, f"{what}: block {i} never called"
        seen = set()
        for h, args, kw in got:
            b = next((b for b, (hr, _, _) in enumerate(want) if _close(h, hr)), None)
            assert b is not None, f"{what}: block {i} got a hidden state the model's forward never gives it"
            assert _close(args, want[b][1]), f"{what}: block {i}, batch {b}: positional arguments differ"
            for k in want[b][2]:
                assert k in kw and _close(kw[k], want[b][2][k]), f"{what}: block {i}, batch {b}: {k!r} differs"
            assert kw.keys() == want[b][2].keys(), f"{what}: block {i}: keyword names differ"
            seen.add(b)
        assert seen == set(range(len(want))), f"{what}: block {i} saw batches {sorted(seen)} only"


def config(mode, method="magnitude"):
    return pl.PruneConfig(method=method, sparsity=0.5, mode=mode, batch_size=BS, device="cpu")


# --------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("family", list(FAMILIES))
def test_capture_equals_model_forward(family):
    model, ids = build(family), calib()
    ref = reference(model, ids)
    inp = pl.capture_block_inputs(model, ids, device="cpu", batch_size=BS)
    assert len(inp.per_block) == len(ref)
    for i, want in enumerate(ref):
        assert len(inp.per_block[i]) == len(want)
        for b, ((sl, args, kw), (hr, ar, kr)) in enumerate(zip(inp.per_block[i], want)):
            assert (sl.start, sl.stop) == (b * BS, (b + 1) * BS)
            if i == 0:
                assert _close(inp.hidden[sl], hr)
            assert _close(args, ar) and kw.keys() == kr.keys(), f"block {i}"
            for k in kr:
                assert _close(kw[k], kr[k]), f"block {i}, batch {b}: {k!r}"
    if family in PER_LAYER:  # the point of the test: block 0's arguments are not block 1's
        k0, k1 = ref[0][0][2], ref[1][0][2]
        assert not _close(k0, k1), "the per-layer family gives every block the same arguments: test is void"
        assert not _close(inp.per_block[0][0][2], inp.per_block[1][0][2])
    # identical arguments are stored once: same-shaped batches share them
    kw0, kw1 = inp.per_block[0][0][2], inp.per_block[0][1][2]
    shared = [k for k in kw0 if torch.is_tensor(kw0[k]) or isinstance(kw0[k], tuple)]
    assert all(kw0[k] is kw1[k] for k in shared)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["dense-input", "sequential"])
def test_engine_hands_each_block_its_model_inputs(family, mode):
    """In memory: the calls the pipeline makes to block i, while pruning, carry the model's own arguments for
    block i; the hidden state is the dense stream (dense-input) or the pruned model's own (sequential)."""
    dense, ids = build(family), calib()
    model = copy.deepcopy(dense)
    blocks = get_module(model, get_arch(model).blocks)
    rec = Calls(blocks)
    try:
        res = pl.prune_model(model, ids, config(mode), progress=False)
    finally:
        rec.remove()
    assert res["layers"] and all(abs(r["sparsity"] - 0.5) < 0.05 for r in res["layers"])
    # dense-input: each block sees the dense model's inputs; sequential: the pruned model's own forward
    ref = reference(dense if mode == "dense-input" else model, ids)
    check_calls(rec.calls, ref, f"{family} {mode}")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["dense-input", "sequential"])
def test_low_memory_hands_each_block_its_model_inputs(family, mode, tmp_path):
    from transformers import AutoModelForCausalLM

    from optprune.llm_adapters.engine import prune_offloaded
    from optprune.llm_adapters.offload import OffloadedModel
    dense, ids = build(family), calib()
    src = tmp_path / "dense"
    dense.save_pretrained(src)
    om = OffloadedModel(src)
    rec = Calls(om.blocks)
    try:
        prune_offloaded(om, ids, config(mode), tmp_path / "out", progress=False)
    finally:
        rec.remove()
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ref = reference(dense if mode == "dense-input" else pruned, ids)
    check_calls(rec.calls, ref, f"{family} low-memory {mode}")


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_sliding_global_family_end_to_end(method):
    """Gemma 3 style (no table entry: its layout is inferred) pruned through the pipeline: every sub-layer at the
    target sparsity, finite logits, and the same result whichever batch size carries the calibration."""
    model, ids = build("gemma3"), calib()
    arch = get_arch(model)
    assert "inferred" in arch.name
    other = copy.deepcopy(model)
    res = pl.prune_model(model, ids, config("sequential", method), progress=False)
    names = {r["name"] for r in res["layers"]}
    assert len(names) == 4 * len(arch.sublayer_names())
    blocks = get_module(model, arch.blocks)
    for i, b in enumerate(blocks):
        for s in arch.sublayer_names():
            W = linear_weight(get_module(b, s), s in arch.transposed)
            assert abs(float((W == 0).float().mean()) - 0.5) < 0.02, f"block {i} {s}"
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    pl.prune_model(other, ids, dataclasses.replace(config("sequential", method), batch_size=1), progress=False)
    for b, c in zip(blocks, get_module(other, arch.blocks)):
        for s in arch.sublayer_names():
            assert torch.allclose(get_module(b, s).weight, get_module(c, s).weight, atol=1e-4)


def test_cli_prunes_sliding_global_family_in_memory_and_low_memory(stories_dir, tmp_path):
    """``optprune prune`` on a saved Gemma 3 style model (stories260K's tokenizer, vocabulary 512): the in-memory
    and the low-memory runs write the same weights, at the target sparsity."""
    import shutil

    from safetensors.torch import load_file

    from optprune.cli import main
    from optprune.llm_adapters.offload import INDEX_FILE
    torch.manual_seed(0)
    c = _gemma3().config
    c.vocab_size = 512
    src = tmp_path / "gemma"
    transformers.Gemma3ForCausalLM(c).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        if (stories_dir / f).is_file():
            shutil.copy(stories_dir / f, src / f)
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text("Once upon a time there was a little fox who liked to run in the woods. " * 60)
    common = ["prune", "--model", str(src), "--method", "wanda", "--sparsity", "0.5", "--calibration",
              str(calib_file), "--calibration-packing", "windows", "--nsamples", "4", "--seqlen", "16", "--no-eval"]
    assert main(common + ["--output", str(tmp_path / "mem")]) == 0
    assert main(common + ["--output", str(tmp_path / "low"), "--low-memory"]) == 0
    mem = load_file(str(tmp_path / "mem" / "model.safetensors"))
    low = {}
    for f in (tmp_path / "low").glob("model-*.safetensors"):
        low.update(load_file(str(f)))
    assert (tmp_path / "low" / INDEX_FILE).is_file()
    assert mem.keys() <= low.keys() | {"lm_head.weight"}
    for k, v in mem.items():
        if k in low:
            assert torch.equal(v, low[k]), k
    q = mem["model.layers.1.self_attn.q_proj.weight"]
    assert abs(float((q == 0).float().mean()) - 0.5) < 0.02


# --------------------------------------------------------------------------------------------- rows as samples
ROW_LENGTHS = (SEQ, SEQ, 7, 7, 7, 5)  # right-padded rows, longest first (calib_inputs sorts them so)


def rows_calib(pad: int):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (len(ROW_LENGTHS), SEQ), generator=g)
    for i, n in enumerate(ROW_LENGTHS):
        ids[i, n:] = pad
    return ids


def test_row_batches_group_equal_lengths_and_cut_them():
    got = pl.row_batches(len(ROW_LENGTHS), SEQ, 2, ROW_LENGTHS)
    assert got == [slice(0, 2), (slice(2, 4), slice(0, 7)), (slice(4, 5), slice(0, 7)), (slice(5, 6), slice(0, 5))]
    assert pl.row_batches(4, SEQ, 3) == [slice(0, 3), slice(3, 4)]
    with pytest.raises(pl.PipelineError, match="calib_lengths"):
        pl.row_batches(2, SEQ, 2, (SEQ + 1, 3))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rows_each_block_gets_the_models_inputs_of_the_row_alone(family):
    """Rows of different lengths: every call the pipeline makes to block i carries what the model's own forward
    gives block i on that row alone, unpadded (hidden state, mask, positions, rotary tables)."""
    dense, ids = build(family), rows_calib(pad=0)
    model = copy.deepcopy(dense)
    blocks = get_module(model, get_arch(model).blocks)
    rec = Calls(blocks)
    cfg = dataclasses.replace(config("dense-input"), batch_size=1, calib_lengths=ROW_LENGTHS)
    try:
        pl.prune_model(model, ids, cfg, progress=False)
    finally:
        rec.remove()
    ref_rec = Calls(get_module(dense, get_arch(dense).blocks))
    try:
        with torch.no_grad():
            for i, n in enumerate(ROW_LENGTHS):
                dense(ids[i:i + 1, :n], use_cache=False)
    finally:
        ref_rec.remove()
    check_calls(rec.calls, ref_rec.calls, f"{family} rows")


def test_rows_padding_never_reaches_the_statistics():
    """The tokens behind each row's length change nothing (weights bit for bit), and each layer's statistics
    count exactly the rows' real tokens."""
    out = []
    for pad in (0, 57):
        model = build("llama")
        cfg = dataclasses.replace(config("sequential", method="sparsegpt"), calib_lengths=ROW_LENGTHS)
        res = pl.prune_model(model, rows_calib(pad), cfg, progress=False)
        assert {r["nsamples"] for r in res["layers"]} == {sum(ROW_LENGTHS)} and res["tokens"] == sum(ROW_LENGTHS)
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(out[0][n], out[1][n]) for n in out[0])
    # while the same ids read as full rows (padding taken for text) give other weights: the check has teeth
    model = build("llama")
    pl.prune_model(model, rows_calib(57), config("sequential", method="sparsegpt"), progress=False)
    assert any(not torch.equal(p, out[1][n]) for n, p in model.named_parameters())
