"""Deployable outputs (llm_adapters/export.py): the saved dtype follows the input model, the dense default carries
no sparsity_config and loads with the installed transformers, every output says how to load it, and the legacy
compressed-tensors format (sparse-24-bitmask / sparse-bitmask) reloads through compressed-tensors 0.14 to the same
weights — or is refused up front where that library is not installed. The GGUF format: tests/test_export_gguf.py."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import optprune  # noqa: E402
from optprune.cli import main  # noqa: E402
from optprune.llm_adapters import export as E  # noqa: E402
from optprune.llm_adapters import export_legacy_sparse as L  # noqa: E402

PRUNABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj")


def _text_file(path: Path, words: int = 3000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    vocab = ("the cat dog sat ran on a mat park little girl boy happy sun tree house played with ball and then "
             "saw big red blue friend went home said hello time once upon there was").split()
    path.write_text(" ".join(rng.choice(vocab) + ("." if rng.random() < 0.1 else "") for _ in range(words)))
    return path


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """stories260K converted to bfloat16 (config.json says so): an input model that is not float32."""
    from conftest import STORIES
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found at {STORIES}")
    d = tmp_path_factory.mktemp("bf16") / "stories-bf16"
    m = transformers.AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.bfloat16)
    m.save_pretrained(str(d))
    transformers.AutoTokenizer.from_pretrained(str(STORIES)).save_pretrained(str(d))
    assert json.loads((d / "config.json").read_text())["dtype"] == "bfloat16"
    return d


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _masks(sd: dict) -> dict:
    return {k: (v != 0) for k, v in sd.items() if any(p in k for p in PRUNABLE)}


def test_bfloat16_model_comes_out_bfloat16_with_the_same_mask(bf16_dir, tmp_path):
    calib = _text_file(tmp_path / "calib.txt")
    outs = {}
    for dt in ("auto", "float32"):
        out = tmp_path / f"out-{dt}"
        rc = main(["prune", "-q", "--model", str(bf16_dir), "--method", "wanda", "--sparsity", "0.5",
                   "--dataset", str(calib), "--nsamples", "4", "--seqlen", "64", "--no-eval", "--dtype", dt,
                   "--output", str(out)])
        assert rc == 0
        outs[dt] = out
    auto, f32 = _weights(outs["auto"]), _weights(outs["float32"])
    assert {v.dtype for v in auto.values()} == {torch.bfloat16}
    assert {v.dtype for v in f32.values()} == {torch.float32}
    assert json.loads((outs["auto"] / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((outs["float32"] / "config.json").read_text())["dtype"] == "float32"
    rec = json.loads((outs["auto"] / "run.json").read_text())
    assert rec["model"]["source_dtype"] == "bfloat16" and rec["saved"]["dtype"] == "bfloat16"
    ma, mf = _masks(auto), _masks(f32)
    assert ma.keys() == mf.keys() and len(ma) == 35
    for k in ma:
        assert torch.equal(ma[k], mf[k]), k
        assert ma[k].float().mean().item() == pytest.approx(0.5, abs=1e-6), k
    # the bf16 file holds the float32 result rounded once
    for k in auto:
        assert torch.equal(auto[k], f32[k].to(torch.bfloat16)), k


@pytest.fixture(scope="module")
def pruned_pair(bf16_dir, tmp_path_factory):
    """(2:4 model, record), (unstructured model, record) pruned through the API from the bfloat16 model."""
    if L.sparse_compressors_available():
        pytest.skip(f"the legacy sparse format needs compressed-tensors 0.14: {L.sparse_compressors_available()}")
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    res = {}
    for pat in ("2:4", "unstructured"):
        res[pat] = optprune.prune(str(bf16_dir), method="wanda", sparsity=0.5, pattern=pat, dataset=ids,
                                  ignore=["re:model.layers.4.*"], progress=False)
    return res


@pytest.mark.parametrize("pattern,fmt", [("2:4", "sparse-24-bitmask"), ("unstructured", "sparse-bitmask")])
def test_compressed_export_reloads_with_compressed_tensors_to_the_same_weights(pruned_pair, tmp_path, pattern, fmt):
    from compressed_tensors import ModelCompressor
    model, record = pruned_pair[pattern]
    dense, comp = tmp_path / "dense", tmp_path / "compressed"
    info_d = optprune.save(model, dense, format="dense")
    info_c = optprune.save(model, comp, format="compressed-sparse-legacy")
    assert info_d["dtype"] == info_c["dtype"] == "bfloat16"

    q = json.loads((comp / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors"
    sc = q["sparsity_config"]
    assert sc["format"] == fmt
    assert sc["sparsity_structure"] == ("2:4" if pattern == "2:4" else "unstructured")
    assert sc["targets"] == ["Linear"]
    pruned = {r["name"] for r in record["layers"]}
    assert len(pruned) == 28 and not any(n.startswith("model.layers.4.") for n in pruned)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(sc["ignore"]) == linears - pruned and "lm_head" in sc["ignore"]
    assert sc["global_sparsity"] == pytest.approx(0.5, abs=1e-6)

    # decompress with the library itself into a fresh skeleton, and through optprune's loader
    cfg = transformers.AutoConfig.from_pretrained(str(comp))
    del cfg.quantization_config
    skeleton = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    ModelCompressor.from_pretrained(str(comp)).decompress(str(comp), skeleton)
    skeleton.tie_weights()  # (as from_pretrained does after loading: the tied lm_head follows the embedding)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.bfloat16)
    from optprune.llm_adapters.loading import load_model
    via_loader, _, meta = load_model(str(comp), dtype=torch.bfloat16)
    assert meta["format"] == "hf-dir (compressed-tensors)"
    sd_ref = ref.state_dict()
    for other in (skeleton.state_dict(), via_loader.state_dict()):
        assert other.keys() == sd_ref.keys()
        for k in sd_ref:
            assert torch.equal(other[k], sd_ref[k]), k
    # the bitmask files are smaller than the dense ones (values of the pruned layers halved + 1 bit per entry)
    dense_b, comp_b = info_d["weights_bytes"], info_c["weights_bytes"]
    print(f"\n{pattern}: dense {dense_b} B, compressed ({fmt}) {comp_b} B, ratio {comp_b / dense_b:.3f}")
    assert comp_b < dense_b


def test_legacy_format_with_a_structured_method_or_without_its_library_is_refused_up_front(tmp_path, capsys,
                                                                                           monkeypatch, stories_dir):
    out = tmp_path / "o"
    monkeypatch.setattr(L, "sparse_compressors_available", lambda: None)  # as if compressed-tensors 0.14 were here
    rc = main(["prune", "--model", str(stories_dir), "--method", "spap", "--structure", "mlp", "--save-format",
               "compressed-sparse-legacy", "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "structurally pruned" in err[0] and not out.exists()
    monkeypatch.setattr(L, "sparse_compressors_available", lambda: "compressed-tensors is missing (test)")
    rc = main(["prune", "--model", str(stories_dir), "--method", "wanda", "--save-format", "compressed-sparse-legacy",
               "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["optprune prune: error: compressed-tensors is missing (test)"] and not out.exists()
    monkeypatch.undo()
    # the real check on this machine: the legacy format is written only where compressed-tensors 0.14 is installed
    why = L.sparse_compressors_available()
    rc = main(["prune", "--model", str(stories_dir), "--method", "wanda", "--save-format", "compressed-sparse-legacy",
               "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    if why:
        assert rc == 2 and err == [f"optprune prune: error: {why}"] and not out.exists()
    # the old name is gone: an unknown format is refused by the command line, before any work
    with pytest.raises(SystemExit) as e:
        main(["prune", "--model", str(stories_dir), "--method", "wanda", "--save-format", "compressed",
              "--output", str(out)])
    assert e.value.code == 2 and not out.exists()


def test_cli_offers_exactly_the_registered_formats():
    from optprune.cli import SAVE_FORMAT_HELP
    assert tuple(SAVE_FORMAT_HELP) == E.save_formats() == E.SAVE_FORMATS
    assert E.save_formats()[0] == "dense"


def test_dense_default_has_no_sparsity_config_loads_with_transformers_and_says_how(stories_dir, tmp_path):
    """The default output of a 2:4 prune: a plain checkpoint that the installed transformers loads to the same
    weights, with no quantization/sparsity config, and a LOADING.md."""
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    model, record = optprune.prune(str(stories_dir), method="wanda", sparsity=0.5, pattern="2:4", dataset=ids,
                                   progress=False)
    info = optprune.save(model, tmp_path / "out")
    assert info["save_format"] == "dense" and info["stock_loadable"] is True
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and "sparsity_config" not in json.dumps(cfg)
    assert "from_pretrained" in (tmp_path / "out" / E.LOADING_FILE).read_text()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    sd = model.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k].to(v.dtype)), k
    down = back.model.layers[0].mlp.down_proj.weight
    assert int((down.reshape(-1, 4) != 0).sum(1).max()) == 2  # the 2:4 zeros are there, stored densely


def test_detect_structure():
    W = torch.tensor([[1.0, 0, 2, 0, 0, 3, 4, 0]])
    assert E.detect_structure([W]) == "2:4"
    assert E.detect_structure([W, torch.tensor([[1.0, 1, 1, 0]])]) == "unstructured"
    assert E.resolve_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert E.resolve_dtype("float16", torch.bfloat16) == torch.float16
    with pytest.raises(E.ExportError, match="choose from auto, float32, float16, bfloat16"):
        E.check_save_options("dense", "int8")
    with pytest.raises(E.ExportError, match="choose from dense, gguf, compressed-sparse-legacy"):
        E.check_save_options("compressed")
    with pytest.raises(E.ExportError, match="--gguf-type is not an option of --save-format dense"):
        E.check_save_options("dense", gguf_type="q8_0")


def test_saved_files_are_readable_by_others_under_the_umask(tmp_path):
    """Outputs get plain-copy permissions (0666/0777 & ~umask) although transformers writes model.safetensors
    owner-only: a server running as another user can read them."""
    import os
    import stat
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4)
    model = transformers.LlamaForCausalLM(cfg)
    old = os.umask(0o022)
    try:
        optprune.save(model, tmp_path / "out")
    finally:
        os.umask(old)
    out = tmp_path / "out"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".safetensors") for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, (p.name, oct(p.stat().st_mode))
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_equal_widths_gives_a_stock_config_and_per_block_widths_say_how_to_load(stories_dir, tmp_path):
    """SPAP on heads (GQA: 8 query, 4 key/value heads) and MLP. With --equal-widths every block has the same
    widths, the dense output's config states them and stock transformers loads it to the pruned model's logits;
    a per-block output (block 0 left dense) is not stock-loadable, and its LOADING.md says how to load it."""
    from optprune.llm_adapters import surgery
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    model, rec = optprune.prune(str(stories_dir), method="spap", sparsity=0.5, structure="mlp,heads", dataset=ids,
                                equal_widths=True, progress=False)
    assert rec["config"]["equal_widths"] is True and rec["config"]["structure"] == "mlp,heads:kv"
    w = surgery.layer_widths(model)
    assert all(r == w[0] for r in w) and w[0]["mlp"] == 86 and (w[0]["heads"], w[0]["kv_heads"]) == (4, 2)
    info = optprune.save(model, tmp_path / "eq")
    assert info["stock_loadable"] and info["uniform"]
    assert "stock tools load it" in (tmp_path / "eq" / E.LOADING_FILE).read_text()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "eq"))
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, model(ids).logits, atol=1e-5)

    per, _ = optprune.prune(str(stories_dir), method="spap", sparsity=0.5, structure="mlp", dataset=ids,
                            ignore=["re:model.layers.0\\..*"], progress=False)
    info = optprune.save(per, tmp_path / "per")
    assert not info["stock_loadable"]
    note = (tmp_path / "per" / E.LOADING_FILE).read_text()
    assert "load_shrunk" in note and "--equal-widths" in note
    back = surgery.load_shrunk(str(tmp_path / "per"))
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, per(ids).logits, atol=1e-5)


def test_equal_widths_that_the_config_refuses_say_so_in_the_loading_note(stories_dir, tmp_path):
    """Equal widths whose head count the config class refuses (LlamaConfig wants hidden_size 64 divisible by the
    6 query heads kept): the folder is optprune's per-block form, and its LOADING.md gives the real reason
    instead of claiming the blocks differ."""
    from optprune.llm_adapters import surgery
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    model, _ = optprune.prune(str(stories_dir), method="spap", sparsity=0.3, structure="heads", dataset=ids,
                              equal_widths=True, progress=False)
    info = optprune.save(model, tmp_path / "o")
    assert info["uniform"] and not info["stock_loadable"]
    note = (tmp_path / "o" / E.LOADING_FILE).read_text()
    assert "same widths in every block that a stock config cannot state" in note and "multiple" in note
    assert "different widths" not in note and "load_shrunk" in note
    with torch.no_grad():
        assert torch.allclose(surgery.load_shrunk(str(tmp_path / "o"))(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.parametrize("extra,msg", [
    ({"method": "wanda"}, "constrains structured methods"),
    ({"method": "spap", "allocation": "owl"}, "--allocation owl gives blocks different sparsities"),
    ({"method": "spap", "ignore": ["re:model.layers.0\\..*"]}, "--targets/--ignore"),
])
def test_equal_widths_refuses_what_would_give_blocks_other_widths(stories_dir, extra, msg):
    with pytest.raises(ValueError, match=msg):
        optprune.prune(str(stories_dir), equal_widths=True, dataset=torch.zeros((1, 8), dtype=torch.long),
                       progress=False, **extra)


def test_2of4_acceleration_is_refused_in_one_line_without_cuda(monkeypatch):
    from optprune.llm_adapters import semistructured as S
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(E.ExportError, match="^2:4 acceleration runs torchao's semi-structured sparse kernels on an "
                                            "NVIDIA GPU .*no CUDA device$"):
        S.accelerate_2of4(model, "int8")
    with pytest.raises(E.ExportError, match="choose from plain, int8, int4"):
        S.check_accelerate("int2")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["plain", "int8", "int4"])
def test_dense_2of4_output_runs_on_torchao_semi_structured_kernels(tmp_path, kind):
    """The dense 2:4 output, reloaded in fp16 on the GPU, converted by torchao: the same next tokens and close
    logits (int8/int4 quantize too, so the tolerance is theirs), and the 2:4 layers really are converted."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("torchao")
    from optprune.llm_adapters import semistructured as S
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=8)
    ids = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(0))
    model, _ = optprune.prune(transformers.LlamaForCausalLM(cfg), tokenizer=None, method="magnitude",
                              pattern="2:4", dataset=ids, progress=False)
    optprune.save(model, tmp_path / "o", dtype="float16")
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"), dtype=torch.float16).cuda().eval()
    fast = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"), dtype=torch.float16).cuda().eval()
    names = S.accelerate_2of4(fast, kind)
    assert len(names) == 2 * 7
    w = dict(fast.named_modules())[names[0]].weight  # a torchao tensor subclass now, not a plain tensor
    assert not (type(w) in (torch.Tensor, torch.nn.Parameter) and type(w.data) is torch.Tensor)
    x = ids.cuda()
    with torch.no_grad():
        a, b = dense(x).logits.float(), fast(x).logits.float()
    tol = {"plain": 2e-2, "int8": 0.5, "int4": 1.0}[kind]
    assert (a - b).abs().max().item() < tol * a.abs().max().item()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > {"plain": 0.99, "int8": 0.9, "int4": 0.8}[kind]


# One prune per format the CLI offers; a format added to the registry must be added here.
OFFERED = {"dense": ["--method", "wanda", "--pattern", "2:4"],
           "gguf": ["--method", "wanda", "--pattern", "2:4", "--gguf-type", "f32"],
           "compressed-sparse-legacy": ["--method", "wanda", "--pattern", "2:4"],
           "pack-quantized": ["--method", "rtn", "--quant", "w8"]}


@pytest.mark.parametrize("fmt", E.save_formats())
def test_every_offered_format_loads_with_the_installed_transformers_or_is_refused_up_front(fmt, stories_dir,
                                                                                          tmp_path, capsys):
    """`optprune prune --save-format F` for every F the CLI offers: either the output folder loads with stock
    `AutoModelForCausalLM.from_pretrained` (a GGUF output with `gguf_file=`) of the transformers installed here
    and computes the logits of the same prune made in memory, or the run stops before any work (exit 2, one
    line, nothing written) — which of the two depends on the libraries installed."""
    assert set(OFFERED) == set(E.save_formats()), "a registered --save-format has no case here"
    from conftest import tiny_stories
    stories_dir = tiny_stories()  # a byte-level BPE tokenizer (GGUF's), also when the real stories260K is used
    text = _text_file(tmp_path / "calib.txt")
    opts = OFFERED[fmt]
    out = tmp_path / "o"
    rc = main(["prune", "-q", "--model", str(stories_dir), *opts, "--dataset", str(text), "--nsamples", "4",
               "--seqlen", "64", "--no-eval", "--save-format", fmt, "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    if rc == 2:
        assert len(err) == 1 and err[0].startswith("optprune prune: error: ") and not out.exists(), err
        return
    assert rc == 0, err
    ggufs = sorted(out.glob("*.gguf"))
    kw = {"gguf_file": ggufs[0].name} if ggufs else {}
    stock = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, **kw).eval()
    api = {o.lstrip("-").replace("-", "_"): v for o, v in zip(opts[::2], opts[1::2]) if o != "--gguf-type"}
    model, _ = optprune.prune(str(stories_dir), dataset=str(text), nsamples=4, seqlen=64, evaluate=False,
                              progress=False, **api)
    ids = torch.randint(3, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = stock(ids).logits, model.float()(ids).logits
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=1e-4), \
        (fmt, float((got - want).abs().max()))
