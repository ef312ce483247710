"""Runs written down (llm_adapters/recipes.py): ``--config`` files with CLI overrides, ``--replay run.json`` with
bit-identical masks, llm-compressor recipes, and ``--targets/--ignore`` recorded in run.json."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from optprune.cli import main  # noqa: E402
from optprune.llm_adapters import recipes  # noqa: E402


def _text(path: Path) -> Path:
    rng = random.Random(1)
    words = "once upon a time the little cat and the big dog played in the sun then went home happy".split()
    path.write_text(" ".join(rng.choice(words) for _ in range(4000)))
    return path


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(d / "model.safetensors"))


def test_config_file_then_replay_gives_bit_identical_masks(stories_dir, tmp_path):
    assert torch.get_num_threads() == 1
    calib = _text(tmp_path / "calib.txt")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {stories_dir}\nmethod: sparsegpt\nsparsity: 0.5\npattern: '2:4'\ndataset: {calib}\n"
                   f"nsamples: 4\nseqlen: 64\nevaluate: false\nkl: false\nignore: ['re:.*mlp.down_proj']\n"
                   f"calibration_packing: windows\n")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["prune", "-q", "--config", str(cfg), "--output", str(a)]) == 0
    ra = json.loads((a / "run.json").read_text())
    assert ra["config"]["method"] == "sparsegpt" and ra["config"]["pattern"] == "2:4"
    assert ra["config"]["ignore"] == ["re:.*mlp.down_proj"] and len(ra["layers"]) == 30
    assert main(["prune", "-q", "--replay", str(a / "run.json"), "--output", str(b)]) == 0
    rb = json.loads((b / "run.json").read_text())
    assert rb["calibration"]["sha256"] == ra["calibration"]["sha256"]
    assert rb["protocol"]["nsamples"] == 4 and rb["protocol"]["seqlen"] == 64
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k] != 0, wb[k] != 0), k
        assert torch.equal(wa[k], wb[k]), k  # same code, same thread count: the same numbers too
    assert [r["error"] for r in ra["layers"]] == [r["error"] for r in rb["layers"]]


def test_cli_flags_override_the_config_file(stories_dir, tmp_path):
    calib = _text(tmp_path / "calib.txt")
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": str(stories_dir), "method": "wanda", "sparsity": 0.5, "calibration": str(calib),
                               "nsamples": 4, "seqlen": 32, "evaluate": False, "method-options": {}}))
    out = tmp_path / "o"
    assert main(["prune", "-q", "--config", str(cfg), "--sparsity", "0.25", "--targets", "re:.*self_attn.*",
                 "--output", str(out)]) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["sparsity"] == 0.25 and rec["config"]["targets"] == ["re:.*self_attn.*"]
    assert len(rec["layers"]) == 20 and all(r["sparsity"] == pytest.approx(0.25) for r in rec["layers"])


LLMC_RECIPE = """
sparsity_stage:
  run_type: oneshot
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      targets: ["Linear"]
      ignore: ["re:.*lm_head", "re:model.layers.0.*"]
      dampening_frac: 0.02
      block_size: 128
      sequential_targets: ["LlamaDecoderLayer"]
"""


def test_llm_compressor_recipe_runs_as_the_equivalent_optprune_run(stories_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(LLMC_RECIPE)
    kw, info = recipes.config_kwargs(recipe)
    assert kw == {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4", "targets": ["Linear"],
                  "ignore": ["re:.*lm_head", "re:model.layers.0.*"], "damp": 0.02}
    assert info["modifier"] == "SparseGPTModifier" and info["not_applicable"]["block_size"] == 128
    calib = _text(tmp_path / "calib.txt")
    out = tmp_path / "o"
    assert main(["prune", "-q", "--config", str(recipe), "--model", str(stories_dir), "--dataset", str(calib),
                 "--nsamples", "4", "--seqlen", "64", "--no-eval", "--output", str(out)]) == 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["method"] == "sparsegpt" and rec["config"]["damp"] == 0.02
    assert {r["name"].split(".")[2] for r in rec["layers"]} == {"1", "2", "3", "4"}
    w = _weights(out)
    for k, v in w.items():
        if ".layers.0." in k or not k.endswith("proj.weight"):
            continue
        assert int((v.reshape(-1, 4) != 0).sum(1).max()) <= 2 and (v == 0).float().mean() == 0.5, k


@pytest.mark.parametrize("text,msg", [
    ("quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      scheme: W4A16\n"
     "sparsity_stage:\n  sparsity_modifiers:\n    WandaPruningModifier:\n      sparsity: 0.5\n",
     "QuantizationModifier .* not available in optprune; it reads SparseGPTModifier, WandaPruningModifier"),
    ("SparseGPTModifier:\n  sparsity: 0.5\nWandaPruningModifier:\n  sparsity: 0.5\n", "one pruning modifier per run"),
    ("WandaPruningModifier:\n  sparsity: 0.5\n  owl_m: 5\n", "owl_m"),
    ("method: wanda\nsparsity: 0.5\nsparsty: 0.3\n", "unknown option 'sparsty'; valid: model, method"),
    ("method: [unclosed\n", "not valid YAML"),
])
def test_bad_recipes_are_one_line_errors_and_nothing_is_written(tmp_path, capsys, text, msg, stories_dir):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    out = tmp_path / "o"
    rc = main(["prune", "--config", str(f), "--model", str(stories_dir), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and not out.exists(), err
    import re
    assert re.search(msg, err[0]), err[0]


def test_wanda_recipe_in_a_modifiers_list():
    kw, info = recipes.recipe_kwargs({"modifiers": [{"type": "WandaPruningModifier", "sparsity": 0.6,
                                                     "mask_structure": "0:0"}]})
    assert kw == {"method": "wanda", "sparsity": 0.6, "pattern": "unstructured"}


def test_replay_refuses_in_memory_calibration(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"command": "prune", "config": {"model": "m", "method": "wanda"},
                             "protocol": {"calibration": "list of strings"}}))
    with pytest.raises(recipes.RecipeError, match="in-memory list of strings"):
        recipes.replay_kwargs(f)
