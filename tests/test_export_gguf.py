"""--save-format gguf (llm_adapters/export_gguf.py): the file transformers' GGUF loader reads back holds the same
weights (exactly in f32/f16/bf16, to q8_0's rounding in q8_0) and gives the same logits and tokens, for two
families (the tiny Llama of conftest, a tiny Qwen2 built here) and three kinds of output (dense, unstructured,
MLP/heads removed); per-block widths become per-layer arrays; what the writer cannot express is refused before
pruning."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import optprune  # noqa: E402
from optprune.cli import main  # noqa: E402
from optprune.llm_adapters import export as E  # noqa: E402
from optprune.llm_adapters import surgery  # noqa: E402

PROMPTS = ["the cat sat on the mat.", "once upon a time there was a little girl", "happy dog ran home"]
CHAT = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def _tokenizer(stories_dir):
    tok = transformers.AutoTokenizer.from_pretrained(str(stories_dir))
    tok.chat_template = CHAT
    return tok


def _family(name, stories_dir):
    tok = _tokenizer(stories_dir)
    if name == "llama":  # 8 query heads, 4 key/value heads, MLP 172, tied embeddings
        return transformers.AutoModelForCausalLM.from_pretrained(str(stories_dir), dtype=torch.float32), tok
    torch.manual_seed(0)  # Qwen2: q/k/v biases, untied lm_head, no Q/K permutation in GGUF
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # norms away from exactly one, biases away from zero
    return model, tok


#: (family, kind) → structure of the structured output: Qwen2's GGUF config has no head_dim key that transformers
#: reads, so its heads are kept (llama.cpp reads attention.key_length)
STRUCTURE = {"llama": "mlp,heads:kv", "qwen2": "mlp"}
#: half of the key/value groups: transformers' LlamaConfig wants hidden_size (64) divisible by the head count


@pytest.fixture
def stories_dir():
    """The GGUF writer takes byte-level BPE tokenizers: the tiny model's, also when the real stories260K (a
    SentencePiece-style tokenizer, refused up front: tests/test_export_gguf.py's refusal test) is used."""
    from conftest import tiny_stories
    return tiny_stories()


@pytest.fixture(scope="module")
def outputs():
    """(family, kind) → (model, tokenizer)."""
    from conftest import tiny_stories
    stories_dir = tiny_stories()
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    res = {}
    for fam in ("llama", "qwen2"):
        model, tok = _family(fam, stories_dir)
        res[fam, "dense"] = (copy.deepcopy(model), tok)
        un = copy.deepcopy(model)  # half of every block matrix zeroed (the smallest entries), as a pruner leaves it
        with torch.no_grad():
            for name, mod in un.model.layers.named_modules():
                if isinstance(mod, torch.nn.Linear):
                    W = mod.weight
                    W[W.abs() <= W.abs().flatten().kthvalue(W.numel() // 2).values] = 0
        res[fam, "unstructured"] = (un, tok)
        st, _ = optprune.prune(copy.deepcopy(model), tokenizer=tok, method="group_magnitude", sparsity=0.5,
                               structure=STRUCTURE[fam], dataset=ids, progress=False)
        res[fam, "structured"] = (st, tok)
    return res


def _expected(W: torch.Tensor, gtype: str) -> torch.Tensor:
    """What a GGUF reader must give back for the HF tensor ``W``: 1-D tensors are F32; matrices in the type
    (q8_0 through gguf's reference quantizer; rows not a multiple of 32 long in f16)."""
    W = W.detach().float()
    if W.dim() < 2 or gtype == "f32":
        return W
    if gtype == "f16" or (gtype == "q8_0" and W.shape[-1] % 32):
        return W.half().float()
    if gtype == "bf16":
        return W.bfloat16().float()
    q = gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).copy()).reshape(W.shape)


@pytest.mark.parametrize("gtype", ["f32", "q8_0", pytest.param("f16", marks=pytest.mark.slow),
                                   pytest.param("bf16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["dense", "unstructured", "structured"])
def test_gguf_round_trip_through_transformers_gives_the_same_weights_tokens_and_logits(outputs, tmp_path, family,
                                                                                        kind, gtype):
    model, tok = outputs[family, kind]
    sd = {k: v.float() for k, v in model.state_dict().items()}
    if kind == "unstructured":
        assert float((model.model.layers[0].mlp.down_proj.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    if kind == "structured":
        w = surgery.layer_widths(model)
        assert w[0]["mlp"] < model.config.intermediate_size and len({json.dumps(r) for r in w}) == 1
    enc = [tok(p, return_tensors="pt").input_ids for p in PROMPTS]
    if True:
        out = tmp_path / gtype
        info = optprune.save(model, out, tok, format="gguf", gguf_type=gtype)
        f = out / info["gguf_file"]
        assert sorted(p.name for p in out.iterdir()) == sorted([f.name, E.LOADING_FILE] +
                                                              (["run.json"] if kind == "structured" else []))
        assert info["stock_loadable"] and info["gguf_type"] == gtype and f.stat().st_size == info["weights_bytes"]
        assert "gguf_file=" in (out / E.LOADING_FILE).read_text()
        back = transformers.AutoModelForCausalLM.from_pretrained(str(out), gguf_file=f.name, dtype=torch.float32)
        sdb = back.state_dict()
        assert set(sdb) == set(sd), (set(sdb) ^ set(sd))
        for k, W in sd.items():
            exp = _expected(W, gtype)
            assert sdb[k].shape == W.shape, k
            assert torch.equal(sdb[k], exp), (gtype, k, (sdb[k] - exp).abs().max())
            if gtype == "q8_0" and W.dim() == 2 and W.shape[-1] % 32 == 0:
                # q8_0's own bound, computed here: per block of 32, x̂ = round(x/d)·d16 with d = max|x|/127 and
                # d16 its f16 rounding, so |x − x̂| ≤ d/2 + 127·|d − d16|
                blocks = W.reshape(-1, 32)
                d = blocks.abs().amax(1, keepdim=True) / 127
                bound = d / 2 + 127 * (d - d.half().float()).abs() + 1e-6 * d + 1e-12
                assert bool(((sdb[k].reshape(-1, 32) - blocks).abs() <= bound).all()), k
                assert bool((sdb[k][W == 0] == 0).all()), k  # pruned weights stay exactly zero
        # the same logits as the model with the expected weights, on the file's own tokenizer's ids
        ref = copy.deepcopy(model).float()
        ref.load_state_dict({k: _expected(W, gtype) for k, W in sd.items()})
        gtok = transformers.AutoTokenizer.from_pretrained(str(out), gguf_file=f.name)
        with torch.no_grad():
            for p, ids in zip(PROMPTS, enc):
                assert gtok(p, return_tensors="pt").input_ids.tolist() == ids.tolist(), p
                a, b = back(ids).logits, ref(ids).logits
                assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (gtype, (a - b).abs().max())
                if gtype == "f32":
                    assert torch.allclose(a, model.float()(ids).logits, atol=1e-4, rtol=1e-4)


def test_gguf_metadata_tokenizer_and_chat_template(outputs, tmp_path):
    model, tok = outputs["llama", "unstructured"]
    info = optprune.save(model, tmp_path / "o", tok, format="gguf", gguf_type="q8_0")
    r = gguf.GGUFReader(str(tmp_path / "o" / info["gguf_file"]))
    val = {k: f.contents() for k, f in r.fields.items() if k != "tokenizer.ggml.merges" and
           k != "tokenizer.ggml.tokens" and k != "tokenizer.ggml.token_type"}
    assert val["general.architecture"] == "llama" and val["tokenizer.ggml.model"] == "gpt2"
    assert val["tokenizer.chat_template"] == CHAT
    assert val["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert val["llama.block_count"] == 5 and val["llama.feed_forward_length"] == 172
    assert val["llama.attention.head_count"] == 8 and val["llama.attention.head_count_kv"] == 4
    assert val["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert val["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert tokens == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert len(r.fields["tokenizer.ggml.merges"].contents()) > 100
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert "output.weight" not in types  # tied embeddings: the absence of output.weight says so
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "F16" and info["f16_fallback"]  # rows of 172: not blocks of 32


def test_per_block_widths_become_per_layer_arrays(stories_dir, tmp_path):
    """Block 0 kept dense, the others shrunk (MLP and query heads): the file carries per-layer arrays, each
    block's tensors at its width, and Q/K rows in llama.cpp's pair order (checked with transformers' own
    inverse permutation)."""
    model, tok = _family("llama", stories_dir)
    ids = torch.randint(3, 300, (4, 64), generator=torch.Generator().manual_seed(1))
    model, _ = optprune.prune(model, tokenizer=tok, method="spap", sparsity=0.25, structure="mlp,heads", dataset=ids,
                              ignore=["re:model.layers.0\\..*"], progress=False)
    widths = surgery.layer_widths(model)
    assert len({json.dumps(w) for w in widths}) > 1
    info = optprune.save(model, tmp_path / "o", tok, format="gguf", gguf_type="f32")
    assert not info["stock_loadable"] and "feed_forward_length" in info["per_layer_keys"]
    assert "per-layer arrays" in (tmp_path / "o" / E.LOADING_FILE).read_text()
    r = gguf.GGUFReader(str(tmp_path / "o" / info["gguf_file"]))
    assert r.fields["llama.feed_forward_length"].contents() == [w["mlp"] for w in widths]
    assert r.fields["llama.attention.head_count"].contents() == [w["heads"] for w in widths]
    assert r.fields["llama.attention.head_count_kv"].contents() == [w["kv_heads"] for w in widths]
    assert r.fields["llama.attention.key_length"].contents() == widths[0]["head_dim"]
    t = {x.name: np.array(x.data) for x in r.tensors}
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    unperm = LlamaTensorProcessor(config={})._reverse_permute_weights
    for i, (blk, w) in enumerate(zip(model.model.layers, widths)):
        assert t[f"blk.{i}.ffn_down.weight"].shape == (model.config.hidden_size, w["mlp"])
        q, k = blk.self_attn.q_proj.weight.detach().numpy(), blk.self_attn.k_proj.weight.detach().numpy()
        assert np.array_equal(unperm(t[f"blk.{i}.attn_q.weight"], w["heads"], w["heads"]), q)
        assert np.array_equal(unperm(t[f"blk.{i}.attn_k.weight"], w["heads"], w["kv_heads"]), k)
        assert np.array_equal(t[f"blk.{i}.attn_v.weight"], blk.self_attn.v_proj.weight.detach().numpy())


def test_what_gguf_cannot_express_is_refused_before_pruning(stories_dir, tmp_path, capsys):
    # an architecture the writer does not know (GPT-2), from its config.json: exit 2, one line, nothing written
    gdir = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=1,
                                  eos_token_id=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(gdir))
    transformers.AutoTokenizer.from_pretrained(str(stories_dir)).save_pretrained(str(gdir))
    out = tmp_path / "o"
    capsys.readouterr()
    rc = main(["prune", "-q", "--model", str(gdir), "--method", "wanda", "--save-format", "gguf", "--output",
               str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "'gpt2'" in err[0] and "llama, qwen2" in err[0] and not out.exists()
    # rotary scaling the writer does not write
    sdir = tmp_path / "scaled"
    m = transformers.AutoModelForCausalLM.from_pretrained(str(stories_dir))
    m.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    m.save_pretrained(str(sdir))
    transformers.AutoTokenizer.from_pretrained(str(stories_dir)).save_pretrained(str(sdir))
    capsys.readouterr()
    rc = main(["prune", "-q", "--model", str(sdir), "--method", "wanda", "--save-format", "gguf", "--output",
               str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "rotary scaling 'linear'" in err[0] and not out.exists()
    # a GGUF type with another format, an unknown type, --gguf-type with --dtype
    for extra, msg in ((["--gguf-type", "q8_0"], "not an option of --save-format dense"),
                       (["--save-format", "gguf", "--gguf-type", "q8_0", "--dtype", "float16"], "not both")):
        rc = main(["prune", "-q", "--model", str(stories_dir), "--method", "wanda", "--output", str(out)] + extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and msg in err[0] and not out.exists(), err
    with pytest.raises(E.ExportError, match="unknown --gguf-type 'q4_k'; choose from f32, f16, bf16, q8_0, q4_0"):
        E.check_save_options("gguf", gguf_type="q4_k", config={"model_type": "llama"})


def test_cli_writes_a_gguf_that_optprune_eval_reads(stories_dir, tmp_path, capsys):
    """The main command writes the file (2:4, q8_0) and `optprune eval` loads the output folder."""
    out = tmp_path / "o"
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(PROMPTS * 200))
    rc = main(["prune", "-q", "--model", str(stories_dir), "--method", "wanda", "--pattern", "2:4", "--dataset",
               str(text), "--nsamples", "4", "--seqlen", "64", "--no-eval", "--save-format", "gguf", "--gguf-type",
               "q8_0", "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "run.json").read_text())
    assert rec["saved"]["save_format"] == "gguf" and rec["config"]["gguf_type"] == "q8_0"
    assert (out / "model.Q8_0.gguf").is_file()
    rc = main(["eval", "-q", "--model", str(out), "--eval", str(text), "--eval-seqlen", "64", "--eval-windows", "2"])
    assert rc == 0, capsys.readouterr().err


def test_a_gguf_source_keeps_its_pre_tokenizer_name(outputs, tmp_path):
    """llama.cpp's pre-tokenizer name is not part of the tokenizer transformers rebuilds from a GGUF file: the
    loader keeps the source's, and the writer writes it back."""
    from optprune.llm_adapters.loading import load_model
    model, tok = outputs["llama", "dense"]
    info = optprune.save(model, tmp_path / "a", tok, format="gguf", gguf_type="f32")
    assert gguf.GGUFReader(str(tmp_path / "a" / info["gguf_file"])).fields["tokenizer.ggml.pre"].contents() == "gpt2"
    tok2 = copy.deepcopy(tok)
    tok2.gguf_pre = "smollm"
    optprune.save(model, tmp_path / "b", tok2, format="gguf", gguf_type="f32")
    m, t, meta = load_model(str(tmp_path / "b"))
    assert "gguf" in meta["format"] and t.gguf_pre == "smollm"
    info = optprune.save(m, tmp_path / "c", t, format="gguf", gguf_type="f32")
    assert gguf.GGUFReader(str(tmp_path / "c" / info["gguf_file"])).fields["tokenizer.ggml.pre"].contents() == \
        "smollm"


#: (family, --quant, --gguf-type): grids the block type represents exactly — per channel on the tiny Llama, whose
#: MLP width 172 takes no group of 32 (its down_proj rows, 172 long, are written in f16)
EXACT = [("qwen2", "w4g32", "q4_0"), ("llama", "w4", "q4_0"), ("qwen2", "w4a", "q4_1"), ("qwen2", "w5", "q5_0"),
         ("qwen2", "w5g64a", "q5_1"), ("llama", "w8", "q8_0")]


@pytest.mark.parametrize("family,quant,gtype", EXACT)
def test_a_grid_the_gguf_type_represents_is_written_exactly(stories_dir, tmp_path, family, quant, gtype):
    """A model quantized on the grid of a GGUF block type: transformers' GGUF loader gives back our codes times
    our scales rounded to f16 (asymmetric: plus the f16 offset −s·z) — no other rounding; Q/K rows permuted."""
    model, tok = _family(family, stories_dir)
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    model, rec = optprune.prune(model, tokenizer=tok, method="rtn", quant=quant, dataset=ids, progress=False)
    info = optprune.save(model, tmp_path / "g", tok, format="gguf", gguf_type=gtype)
    mods = dict(model.named_modules())
    layers = [r for r in rec["layers"] if mods[r["name"]].weight.shape[1] % 32 == 0]
    assert len(info["grid_exact"]) == len(layers) > 0
    assert len(info["f16_fallback"]) == len(rec["layers"]) - len(layers)
    # rounded again by gguf: only what we left dense (the embeddings, an untied output)
    assert not [g for g in info["requantized"] if g.startswith("blk.")]
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "g"), gguf_file=info["gguf_file"],
                                                            dtype=torch.float32).state_dict()
    for r in layers:
        qz = mods[r["name"]].optprune_quant
        W = mods[r["name"]].weight.detach().double()
        S, Z = qz.scales_full(dtype=torch.float64), qz.zeros_full(dtype=torch.float64)
        k = torch.round(W / S)  # W = s·(c − z): k = c − z
        S16 = S.half().double()
        exp = S16 * k if qz.spec.symmetric else S16 * (k + Z) + (-(S * Z)).half().double()
        got = back[r["name"] + ".weight"].double()
        assert float((got - exp).abs().max()) <= 1e-6 * float(W.abs().max()), r["name"]
        # i.e. ours up to the f16 rounding of the scale (and offset)
        slack = (S16 - S).abs() * k.abs() + (0 if qz.spec.symmetric else (S16 - S).abs() * (k + Z).abs() +
                                                     ((-(S * Z)).half().double() + S * Z).abs())
        assert bool(((got - W).abs() <= slack + 1e-6 * float(W.abs().max())).all()), r["name"]
    assert "exactly" in (tmp_path / "g" / E.LOADING_FILE).read_text()


def test_a_grid_the_gguf_type_does_not_represent_is_rounded_again_and_says_so(stories_dir, tmp_path):
    model, tok = _family("qwen2", stories_dir)
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    model, rec = optprune.prune(model, tokenizer=tok, method="rtn", quant="w4g64", dataset=ids, progress=False)
    info = optprune.save(model, tmp_path / "g", tok, format="gguf", gguf_type="q5_0")
    assert not info["grid_exact"] and len(info["requantized"]) >= len(rec["layers"])
    assert "rounded again" in (tmp_path / "g" / E.LOADING_FILE).read_text()
