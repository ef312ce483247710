"""Quantized outputs (llm_adapters/export_quant.py): ``--save-format pack-quantized`` reloads with stock
transformers, and the weights the loaded model computes with are the weights optprune chose."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import optprune  # noqa: E402
from optprune.cli import main  # noqa: E402
from optprune.llm_adapters import export_quant as EQ  # noqa: E402

if EQ.pack_quantized_available():
    pytest.skip(EQ.pack_quantized_available(), allow_module_level=True)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """{label: (model, record)}: stories260K quantized through the API — dense W4 per 4 inputs (the model's
    widths 64 and 172 divide by 4), per-channel W8, and 50% unstructured + W4."""
    from conftest import STORIES
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found at {STORIES}")
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    out = {}
    for label, kw in {"w4g4": dict(method="gptq", quant="w4g4"), "w8": dict(method="rtn", quant="w8"),
                      "sparse": dict(method="sparsegpt", quant="w4g4", sparsity=0.5)}.items():
        out[label] = optprune.prune(str(STORIES), dataset=ids, ignore=["re:model.layers.4.*"], progress=False, **kw)
    return out


@pytest.mark.parametrize("label", ["w4g4", "w8", "sparse"])
def test_pack_quantized_reloads_with_transformers_to_our_weights(quantized, tmp_path, label):
    model, record = quantized[label]
    assert record["config"]["quant"] == label.replace("sparse", "w4g4")
    pruned = {r["name"] for r in record["layers"]}
    assert all(r["on_grid"] for r in record["layers"])
    out = tmp_path / "pq"
    info = optprune.save(model, out, format="pack-quantized")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    w = cfg["config_groups"]["group_0"]["weights"]
    assert w["num_bits"] == int(label[1]) if label != "sparse" else w["num_bits"] == 4
    assert "lm_head" in cfg["ignore"] and "model.layers.4.mlp.down_proj" in cfg["ignore"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    mods, ours = dict(loaded.named_modules()), dict(model.named_modules())
    for name in pruned:
        assert hasattr(mods[name], "weight_packed"), name  # stored as packed codes, not dense weights
        W = EQ.dequantized_weight(mods[name])
        assert torch.equal(W, ours[name].weight.detach().float()), name
    for name in ("model.layers.4.mlp.down_proj", "lm_head"):  # left alone: stored dense, unchanged
        assert torch.equal(mods[name].weight, ours[name].weight)
    # and the loaded model computes what ours computes
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    if label == "w4g4":  # 4-bit codes + one scale per 4 inputs: well under the float32 size
        dense = tmp_path / "dense"
        optprune.save(model, dense, format="dense")
        size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
        assert info["weights_bytes"] == size(out) < 0.75 * size(dense)


def test_pack_quantized_refusals_are_one_line_before_anything_runs(tmp_path, capsys, stories_dir):
    out = tmp_path / "o"
    for argv, words in ((["--method", "wanda"], "--quant"), (["--method", "gptq", "--quant", "w4g4a"], "symmetric"),
                        (["--method", "spap", "--structure", "mlp", "--quant", "w4"], "structured")):
        rc = main(["prune", "--model", str(stories_dir), *argv, "--save-format", "pack-quantized", "--output",
                   str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and words in err[0] and not out.exists(), err


def test_quant_options_refused_up_front(tmp_path, capsys, stories_dir):
    out = tmp_path / "o"
    cases = ((["--method", "gptq"], "--quant"), (["--method", "wanda", "--quant", "w4"], "grid"),
             (["--method", "gptq", "--quant", "w4g5"], "does not divide"), (["--method", "gptq", "--quant", "q4"],
                                                                            "unknown quantization"))
    for argv, words in cases:
        rc = main(["prune", "--model", str(stories_dir), *argv, "--no-eval", "--output", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and words in err[0] and not out.exists(), err


def test_mixed_precision_saves_one_group_per_width_and_reloads_to_our_weights(tmp_path):
    """``--quant w3g4 --allocation alpha``: per-block widths averaging 3 bits; the pack-quantized checkpoint has
    one config group per width naming its layers, and stock transformers reloads our weights exactly."""
    from conftest import STORIES
    if not STORIES.is_dir():
        pytest.skip(f"stories260K not found at {STORIES}")
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    model, record = optprune.prune(str(STORIES), dataset=ids, method="gptq", quant="w3g4", allocation="alpha",
                                   progress=False)
    bits = {r["name"]: r["bits"] for r in record["layers"]}
    assert set(bits) == set(record["allocation"]["layer_bits"])
    assert all(bits[n] == b for n, b in record["allocation"]["layer_bits"].items())
    numel = {n: m.weight.numel() for n, m in model.named_modules() if n in bits}
    assert sum(numel[n] * b for n, b in bits.items()) / sum(numel.values()) == pytest.approx(3.0)
    assert len(set(bits.values())) > 1  # stories260K's α differ between blocks: not uniform
    out = tmp_path / "mixed"
    optprune.save(model, out, format="pack-quantized")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    saved = {t: g["weights"]["num_bits"] for g in cfg["config_groups"].values() for t in g["targets"]}
    assert saved == bits
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    mods, ours = dict(loaded.named_modules()), dict(model.named_modules())
    for name in bits:
        assert torch.equal(EQ.dequantized_weight(mods[name]), ours[name].weight.detach().float()), name
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
