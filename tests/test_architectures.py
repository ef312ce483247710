"""Architectures by inference, the table as override: a model whose blocks use the usual projection names is
pruned without a table entry; an unsupported one is refused from its config, before any weight is read."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from optprune.cli import main  # noqa: E402
from optprune.llm_adapters import architectures as A  # noqa: E402
from optprune.llm_adapters import pipeline as pl  # noqa: E402
from optprune.llm_adapters.loading import check_architecture  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("blocks", "sublayers", "transposed", "mlp", "heads", "embed", "final_norm", "rotary")


def _meta(config):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _tiny(kind):
    if kind == "llama":
        return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)
    if kind == "opt":
        return transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                      num_attention_heads=4, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    if kind == "gpt_neox":  # fused query_key_value, dense_h_to_4h: inference cannot read it
        return transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, bos_token_id=1, eos_token_id=2)
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
def test_inference_reads_what_the_table_says(kind):
    """Inference on the meta-device model gives the table entry's layout, field for field."""
    cfg = _tiny(kind)
    inferred, table = A.infer_arch(_meta(cfg)), A.table_entry(cfg.model_type)
    assert table is not None and "inferred" in inferred.name
    for f in FIELDS:
        assert getattr(inferred, f) == getattr(table, f), f


def test_table_entry_overrides_inference(monkeypatch):
    monkeypatch.setattr(A, "ARCHITECTURES", dict(A.ARCHITECTURES))
    cfg = _tiny("llama")
    assert A.get_arch(cfg).name == "llama"
    monkeypatch.delitem(A.ARCHITECTURES, "llama")
    assert A.get_arch(cfg).name == "llama (inferred)"
    with pytest.raises(ValueError, match="already"):
        A.register_arch(A.table_entry("opt"))


def test_llama_like_without_table_entry_pruned_end_to_end(stories_dir, tmp_path, monkeypatch):
    """stories260K (a Llama) pruned through the CLI with and without the table's Llama entry: identical weights."""
    from safetensors.torch import load_file
    calib = tmp_path / "calib.txt"
    calib.write_text("The little dog ran to the park. She saw a big red ball and a bird in a tree. " * 80)

    def run(out):
        return main(["prune", "--model", str(stories_dir), "--method", "sparsegpt", "--sparsity", "0.5",
                     "--calibration", str(calib), "--nsamples", "4", "--seqlen", "64", "--no-eval",
                     "--output", str(out)])

    assert run(tmp_path / "table") == 0
    monkeypatch.setattr(A, "ARCHITECTURES", {k: v for k, v in A.ARCHITECTURES.items() if k != "llama"})
    assert A.table_entry("llama") is None
    assert A.get_arch(_tiny("llama")).name == "llama (inferred)"
    assert run(tmp_path / "inferred") == 0
    rec = json.loads((tmp_path / "inferred" / "run.json").read_text())
    assert rec["layers"] and all(r["sparsity"] == pytest.approx(0.5, abs=0.01) for r in rec["layers"])
    a = load_file(str(tmp_path / "table" / "model.safetensors"))
    b = load_file(str(tmp_path / "inferred" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _unsupported_dir(tmp_path, weights: str) -> Path:
    d = tmp_path / "neox"
    d.mkdir()
    _tiny("gpt_neox").save_pretrained(d)
    if weights == "corrupt":
        (d / "model.safetensors").write_bytes(b"\x00 this is not a safetensors file")
    return d


@pytest.mark.parametrize("weights", ["corrupt", "absent"])
def test_unsupported_refused_before_any_weight_is_read(tmp_path, capsys, monkeypatch, weights):
    d = _unsupported_dir(tmp_path, weights)
    opened = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda cls, *a, **k: opened.append(a) or (_ for _ in ()).throw(AssertionError)))
    with pytest.raises(A.UnknownArchitectureError, match="query_key_value"):
        check_architecture(d)
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text " * 400)
    out = tmp_path / "out"
    rc = main(["prune", "--model", str(d), "--method", "wanda", "--calibration", str(calib), "--nsamples", "2",
               "--seqlen", "16", "--no-eval", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not opened and not out.exists()
    assert len(err.splitlines()) == 1 and "gpt_neox" in err and "attention projections" in err
    assert "attention.query_key_value" in err  # names what it found instead


def test_unsupported_refused_by_the_low_memory_path_before_the_checkpoint(tmp_path):
    from optprune.llm_adapters.offload import OffloadedModel
    d = _unsupported_dir(tmp_path, "corrupt")
    with pytest.raises(A.UnknownArchitectureError, match="no attention projections"):
        OffloadedModel(d)


def test_unknown_model_type_and_non_causal_config_are_refused(tmp_path):
    d = tmp_path / "odd"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no_such_family", "hidden_size": 8}))
    with pytest.raises(A.UnknownArchitectureError, match="config"):
        check_architecture(d)
    with pytest.raises(A.UnknownArchitectureError, match="causal-LM"):
        A.arch_from_config(transformers.AutoConfig.for_model("t5"))


def test_table_override_from_the_docs_runs(monkeypatch):
    """The code of docs/extending.md's "Adding an architecture" section, executed: a table entry for a family
    inference cannot read, then a tiny random model of it pruned."""
    monkeypatch.setattr(A, "ARCHITECTURES", dict(A.ARCHITECTURES))
    doc = (REPO / "docs" / "extending.md").read_text().split("## Adding an architecture", 1)[1].split("\n## ", 1)[0]
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "extending.md", "exec"), {})
    assert any("gpt_neox" in a.model_types for a in A.ARCHITECTURES.values())


def test_inferred_heads_and_mlp_structure_prune(monkeypatch):
    """Structured pruning on an inferred layout: head and MLP groups from the config keys transformers uses."""
    monkeypatch.setattr(A, "ARCHITECTURES", {k: v for k, v in A.ARCHITECTURES.items() if k != "llama"})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_tiny("llama")).eval()
    arch = A.get_arch(model)
    assert arch.heads.kv_heads_key == "num_key_value_heads" and arch.mlp.config_key == "intermediate_size"
    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    pl.prune_model(model, ids, pl.PruneConfig(method="flap", sparsity=0.25, structure="mlp,heads:kv",
                                              device="cpu"), progress=False)
    assert model.model.layers[0].mlp.down_proj.weight.shape[1] < 48
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_gguf_architecture_read_from_the_header(tmp_path):
    """GGUF: the architecture comes from the header's metadata; an unsupported one is refused from it."""
    gguf = pytest.importorskip("gguf")
    from optprune.llm_adapters.loading import gguf_architecture
    paths = {}
    for arch in ("llama", "no_such_arch"):
        p = paths[arch] = tmp_path / f"{arch}.gguf"
        w = gguf.GGUFWriter(str(p), arch)
        w.add_block_count(2)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        assert gguf_architecture(p) == arch
    assert check_architecture(paths["llama"]).name == "llama"
    with pytest.raises(A.UnknownArchitectureError, match="no_such_arch"):
        check_architecture(paths["no_such_arch"])
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    assert gguf_architecture(tmp_path / "junk.gguf") is None
