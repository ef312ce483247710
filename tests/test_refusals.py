"""Never a wrong success: a run that cannot give the model asked for stops with exit code 2 and one line that
names the file or option and the remedy — before the weights load wherever the files' headers or the options
say enough, and otherwise (a missed sparsity target, a full disk) before anything is saved — with nothing
written (no output, no temporary folder, no checkpoint that would block the next run) and the inputs as they
were.

Each row damages a copy of the tiny stories260K-shaped model (``stories_dir``) or the data folder, runs the
command line in this process and checks all of that."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from optprune.cli import main  # noqa: E402
from optprune.solvers.base import LayerResult  # noqa: E402
from optprune.solvers.registry import isolated, list_methods, register_method  # noqa: E402


# ------------------------------------------------------------------------------------------------ damage
def _state(model: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(model / "model.safetensors"))


def _save_state(model: Path, sd: dict, name: str = "model.safetensors") -> None:
    from safetensors.torch import save_file
    save_file(sd, str(model / name), metadata={"format": "pt"})


def _drop_tensor(model: Path, name="model.layers.2.self_attn.q_proj.weight"):
    sd = _state(model)
    del sd[name]
    _save_state(model, sd)


def _add_tensor(model: Path):
    sd = _state(model)
    sd["model.layers.2.self_attn.extra_proj.weight"] = torch.zeros(8, 8)
    _save_state(model, sd)


def _layers(model: Path, n: int):
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_hidden_layers"] = n
    (model / "config.json").write_text(json.dumps(cfg))


def _sharded_without(model: Path, name="model.layers.4.mlp.down_proj.weight"):
    """two shards and their index, neither of which holds ``name``"""
    sd = _state(model)
    del sd[name]
    keys = sorted(sd)
    half = {k: sd[k] for k in keys[: len(keys) // 2]}, {k: sd[k] for k in keys[len(keys) // 2:]}
    (model / "model.safetensors").unlink()
    wm = {}
    for i, part in enumerate(half, 1):
        f = f"model-0000{i}-of-00002.safetensors"
        _save_state(model, part, f)
        wm.update({k: f for k in part})
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _as_bin(model: Path, drop=None):
    sd = _state(model)
    if drop:
        del sd[drop]
    (model / "model.safetensors").unlink()
    torch.save(sd, model / "pytorch_model.bin")


def _bin_bytes(model: Path, body: bytes):
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(body)


class _Code:
    """an object whose unpickling would call a function: what weights_only refuses"""

    def __reduce__(self):
        return (print, ("unpickled",))


def _bin_with_code(model: Path):
    (model / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": _Code()}, model / "pytorch_model.bin")


def _gguf(tmp: Path, *, blocks=3, block_count=3, drop=(), extra=None) -> None:
    """a small llama GGUF file (header and float32 tensors, no tokenizer: the checks come first)"""
    import numpy as np
    gguf = pytest.importorskip("gguf")
    (tmp / "gguf").mkdir(exist_ok=True)
    w = gguf.GGUFWriter(str(tmp / "gguf" / "m.gguf"), "llama")
    w.add_block_count(block_count)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_tensor("token_embd.weight", np.zeros((32, 8), np.float32))
    for i in range(blocks):
        for s in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up", "ffn_gate", "ffn_down", "attn_norm",
                  "ffn_norm") + tuple((extra or {}).get(i, ())):
            if f"blk.{i}.{s}.weight" not in drop:
                w.add_tensor(f"blk.{i}.{s}.weight", np.zeros((8, 8) if "norm" not in s else (8,), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


TOY_MISSES = "toy-keeps-everything"


def _keeps_everything(problem, pattern):
    """a method that ignores its pattern: the safety net must catch it, whatever the method"""
    return LayerResult(problem.W0.clone(), torch.ones_like(problem.W0, dtype=torch.bool), {})


def _full_disk_on_save(monkeypatch):
    from safetensors import SafetensorError

    def fail(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')
    import transformers.modeling_utils as mu
    monkeypatch.setattr(mu, "safe_save_file", fail)


def _full_disk_on_checkpoint(monkeypatch):
    from optprune.llm_adapters import checkpoint

    def fail(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")  # what a write cut short leaves
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    monkeypatch.setattr(checkpoint.torch if hasattr(checkpoint, "torch") else torch, "save", fail)


def _write(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _tokenizer_model_only(model: Path):
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.model").write_bytes(bytes(range(256)) * 8)


LATIN1 = "The café served crème brûlée to the committee.\n".encode("latin-1") * 40
UTF16 = "The committee met on Tuesday.\n".encode("utf-16") * 40
BINARY = bytes(range(256)) * 16


# (id, option changes {flag: value | True | None (drop)} — with "cmd" for eval/verify —, setup(tmp, model,
#  monkeypatch) or None, expected text (or several), text that must not appear). Rows whose id ends in
#  "(early)" must be refused before any weight is read.
CASES = [
    # complete-model checks, before any weight is read
    ("safetensors-missing-tensor", {}, lambda t, m, mp: _drop_tensor(m),
     "missing model.layers.2.self_attn.q_proj.weight", None),
    ("safetensors-surplus-tensor", {}, lambda t, m, mp: _add_tensor(m),
     "surplus model.layers.2.self_attn.extra_proj.weight", None),
    ("config-more-layers-than-stored", {}, lambda t, m, mp: _layers(m, 6), "missing model.layers.5.", None),
    ("config-fewer-layers-than-stored", {}, lambda t, m, mp: _layers(m, 3), "surplus model.layers.3.", None),
    ("sharded-missing-tensor", {}, lambda t, m, mp: _sharded_without(m), "missing model.layers.4.mlp.down_proj",
     None),
    ("bin-missing-tensor", {}, lambda t, m, mp: _as_bin(m, drop="model.norm.weight"),
     "pytorch_model.bin: the weights are not those of the model config.json describes — missing model.norm.weight",
     None),
    *[(f"bin-random-bytes-{seed}", {}, lambda t, m, mp, seed=seed: _bin_bytes(m, random.Random(seed).randbytes(4096)),
       "pytorch_model.bin: not a PyTorch weight file", "weights_only") for seed in range(4)],
    ("bin-zip-of-garbage", {}, lambda t, m, mp: _bin_bytes(m, b"PK\x03\x04" + random.Random(9).randbytes(4096)),
     "pytorch_model.bin: not a PyTorch weight file", "weights_only"),
    ("bin-with-code", {}, lambda t, m, mp: _bin_with_code(m), "could run code", "weights_only=False"),
    ("gguf-missing-tensor", {"--model": "{tmp}/gguf/m.gguf"}, lambda t, m, mp: _gguf(t, drop=("blk.1.attn_q.weight",)),
     "missing blk.1.attn_q.weight", None),
    ("gguf-surplus-block", {"--model": "{tmp}/gguf/m.gguf"}, lambda t, m, mp: _gguf(t, blocks=4), "surplus blk.3.", None),
    ("gguf-missing-block", {"--model": "{tmp}/gguf/m.gguf"}, lambda t, m, mp: _gguf(t, block_count=4), "missing blk.3.*",
     None),
    # the safety net after pruning: a layer that kept more than its pattern allows is never saved
    ("method-missed-its-target", {"--method": TOY_MISSES, "--sparsity": "0.5"}, "toy",
     "toy-keeps-everything kept 4096 of 4096 weights (sparsity 0.0000); its pattern unstructured allows at most "
     "2048", None),
    # a full disk: one line naming the file, the reason and the remedy; no partial output or checkpoint left
    ("disk-full-while-saving", {}, lambda t, m, mp: _full_disk_on_save(mp),
     ("out failed (No space left on device); nothing was replaced — free disk space, then the checkpoint in ",
      ".out.optprune-checkpoint is kept: run the same command with --resume to continue"), "SafetensorError"),
    # (the first checkpoint file written is calib.pt, or calib_partial.pt when a slow self-calibration saves
    # its rows first)
    ("disk-full-while-checkpointing", {"--method": "wanda"}, lambda t, m, mp: _full_disk_on_checkpoint(mp),
     ".pt failed (the write was cut short, disk full?); nothing was replaced — free "
     "disk space, then run the command again", "enforce fail"),
    ("foreign-folder-where-the-checkpoint-goes (early)", {},
     lambda t, m, mp: _write(t / ".out.optprune-checkpoint" / "notes.txt", b"x"),
     "the checkpoint folder of --output, ", "--checkpoint-dir"),
    # what the config / GGUF header and the command line say, refused before the weights load
    ("seqlen-beyond-context (early)", {"--method": "wanda", "--seqlen": "100000"}, None,
     "--seqlen 100000 exceeds the model's context of 512 tokens", None),
    ("gguf-seqlen-beyond-context (early)", {"--model": "{tmp}/gguf/m.gguf", "--method": "wanda", "--seqlen": "1000"}, lambda t, m, mp: _gguf(t),
     "--seqlen 1000 exceeds the model's context of 64 tokens", None),
    ("output-empty (early)", {"--output": ""}, None, "--output is empty", None),
    ("output-name-too-long (early)", {"--output": "{tmp}/" + "x" * 300}, None, "has 300 bytes", None),
    ("output-name-leaves-no-room-for-the-checkpoint (early)", {"--output": "{tmp}/" + "y" * 240}, None,
     "has 240 bytes; this file system allows", None),
    ("output-not-utf8 (early)", {"--output": "{tmp}/out-\udcff"}, None, "is not valid UTF-8", None),
    ("calibration-latin1 (early)", {"--calibration": "{tmp}/calib.txt"},
     lambda t, m, mp: _write(t / "calib.txt", LATIN1), ("calib.txt: not UTF-8 text (byte 0xe9", "iconv"), None),
    ("calibration-utf16 (early)", {"--calibration": "{tmp}/calib.txt"},
     lambda t, m, mp: _write(t / "calib.txt", UTF16), ("calib.txt: UTF-16 text", "iconv -f UTF-16"), None),
    ("calibration-binary (early)", {"--calibration": "{tmp}/calib.txt"},
     lambda t, m, mp: _write(t / "calib.txt", BINARY), "calib.txt: not a text file", "codec"),
    ("eval-text-latin1 (early)", {"--no-eval": None, "--eval": "{tmp}/held_out.txt"},
     lambda t, m, mp: _write(t / "held_out.txt", LATIN1), "held_out.txt: not UTF-8 text", None),
    ("run-config-latin1 (early)", {"--config": "{tmp}/run.yaml"},
     lambda t, m, mp: _write(t / "run.yaml", "method: wanda  # café\n".encode("latin-1")),
     "run.yaml: not UTF-8 text", None),
    ("model-config-utf16 (early)", {}, lambda t, m, mp: _write(m / "config.json", (m / "config.json").read_text()
                                                                 .encode("utf-16")), "config.json: UTF-16 text", None),
    ("tokenizer-model-random (early)", {}, lambda t, m, mp: _tokenizer_model_only(m),
     "tokenizer.model: not a SentencePiece tokenizer model", "tiktoken"),
    ("data-dir-files-at-the-wrong-level (early)", {"--data-dir": "{tmp}/data", "--calibration": None},
     lambda t, m, mp: [_write(t / "data" / f, b"Some text.\n") for f in ("wiki.test.raw", "wiki.valid.raw")],
     ("data/wiki.test.raw is not where optprune looks for it (", "wikitext-2-raw/wiki.test.raw)",
      "docs/protocols.md"), None),
    ("c4-parquet-damaged (early)", {"--no-eval": None, "--eval": "c4", "--data-dir": "{tmp}/data"},
     lambda t, m, mp: _write(t / "data" / "c4" / "c4_validation_2k.parquet", b"PAR1" + BINARY),
     "c4_validation_2k.parquet: not a readable Parquet file", None),
    ("eval-batch-size-negative (early)", {"cmd": "eval", "--batch-size": "-3"}, None,
     "--batch-size=-3 is out of range", "ZeroDivision"),
    ("eval-batch-size-zero (early)", {"cmd": "eval", "--batch-size": "0"}, None,
     "--batch-size=0 is out of range", None),
    ("eval-seqlen-beyond-context (early)", {"cmd": "eval", "--eval-seqlen": "4096"}, None,
     "--eval-seqlen 4096 exceeds the model's context of 512 tokens", None),
    ("verify-negative-time-limit (early)", {"cmd": "verify", "--time-limit": "-5"}, None,
     "--time-limit must be a positive number of seconds", "failed"),
    ("verify-output-unwritable (early)", {"cmd": "verify", "--output": "/proc/optprune-x/v.json"}, None,
     "/proc is not writable", None),
    ("verify-output-a-directory (early)", {"cmd": "verify", "--output": "{tmp}/model"}, None, "is a directory",
     None),
]


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_refused_with_one_line_nothing_written(case, stories_dir, data_dir, tmp_path, capfd, monkeypatch):
    name, opts, setup, expected, absent = case
    model = tmp_path / "model"
    shutil.copytree(stories_dir, model)
    out = tmp_path / "out"
    if callable(setup):
        setup(tmp_path, model, monkeypatch)
    before = {p: _digest(p) for p in (model, data_dir)}
    siblings = sorted(p.name for p in tmp_path.iterdir())
    opts = dict(opts)
    cmd = opts.pop("cmd", "prune")
    base = {"prune": {"--model": str(model), "--method": "magnitude", "--output": str(out), "--no-eval": True,
                      "--calibration": "self", "--nsamples": "2", "--seqlen": "16", "-q": True},
            "eval": {"--model": str(model), "--eval": "wikitext2", "--data-dir": str(data_dir),
                     "--output": str(tmp_path / "eval.json"), "-q": True},
            "verify": {"--quick": True, "-q": True}}[cmd]
    base.update(opts)
    argv = [cmd]
    for k, v in base.items():
        if v is not None:
            argv += [k] if v is True else [k, str(v).replace("{tmp}", str(tmp_path))]
    if name.endswith("(early)"):  # nothing may be read beyond headers: loading the weights fails the test
        import transformers

        def loads(*a, **k):
            raise AssertionError("the weights were loaded before the refusal")
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loads)
    capfd.readouterr()
    if setup == "toy":
        list_methods()  # load the registry before isolated() saves it
        with isolated():
            register_method(TOY_MISSES, needs="none", patterns=("unstructured",))(_keeps_everything)
            rc = main(argv)
    else:
        rc = main(argv)
    err = capfd.readouterr().err
    errors = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert rc == 2, err[-2000:]
    assert len(errors) == 1 and errors[0].startswith(f"optprune {cmd}: error:"), err[-2000:]
    for text in (expected,) if isinstance(expected, str) else expected:
        assert text in errors[0], errors[0]
    assert absent is None or absent not in err, errors[0]
    assert "Traceback" not in err
    assert {p: _digest(p) for p in (model, data_dir)} == before  # inputs untouched
    kept = [".out.optprune-checkpoint"] if "--resume" in errors[0] else []  # only where the line says so
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(siblings + kept)  # no output, no temporary folder


def test_a_run_stopped_by_a_full_disk_resumes_from_its_checkpoint(stories_dir, tmp_path, capfd, monkeypatch):
    """The --resume the line advises works: once there is space, the same command with --resume completes
    from the kept checkpoint, without pruning again."""
    out = tmp_path / "out"
    argv = ["prune", "--model", str(stories_dir), "--method", "wanda", "--output", str(out), "--no-eval",
            "--calibration", "self", "--nsamples", "2", "--seqlen", "16", "-q"]
    with monkeypatch.context() as mp:
        _full_disk_on_save(mp)
        assert main(argv) == 2
    assert not out.exists() and (tmp_path / ".out.optprune-checkpoint" / "manifest.json").is_file()
    capfd.readouterr()
    assert main(argv + ["--resume"]) == 0, capfd.readouterr().err[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["pipeline"]["resumed_blocks"] == [0, 1, 2, 3, 4]
    assert not (tmp_path / ".out.optprune-checkpoint").exists()


def test_a_complete_bin_and_a_tied_head_are_not_refused(stories_dir, tmp_path):
    """The checks name only what is wrong: tied output heads (absent from the files) and a weights-only
    pytorch_model.bin of the right tensors pass."""
    from optprune.llm_adapters.preflight import check_model_source
    model = tmp_path / "model"
    shutil.copytree(stories_dir, model)
    assert "lm_head.weight" not in _state(model)  # the tiny model ties its head to the embedding
    check_model_source(str(model))
    _as_bin(model)
    assert check_model_source(str(model))["config"]["num_hidden_layers"] == 5


def test_blocks_of_another_kind_in_a_gguf_are_not_missing_tensors(tmp_path):
    """A dense first block among mixture-of-experts blocks (each kind holding tensors the other lacks) is a
    legitimate layout, not a damaged file; a block lacking a tensor all others have, and nothing else, is."""
    from optprune.llm_adapters.preflight import PreflightError, check_model_source
    _gguf(tmp_path, blocks=4, block_count=4, extra={0: ("ffn_dense",), 1: ("ffn_gate_inp",), 2: ("ffn_gate_inp",),
                                                    3: ("ffn_gate_inp",)})
    assert check_model_source(str(tmp_path / "gguf" / "m.gguf"))["config"]["num_hidden_layers"] == 4
    _gguf(tmp_path, blocks=4, block_count=4, extra={1: ("ffn_gate_inp",), 2: ("ffn_gate_inp",), 3: ("ffn_gate_inp",)})
    with pytest.raises(PreflightError, match=r"missing blk\.0\.ffn_gate_inp\.weight"):
        check_model_source(str(tmp_path / "gguf" / "m.gguf"))


def test_the_loader_refuses_what_the_preflight_did_not_see(stories_dir, tmp_path):
    """transformers' own load report is the second check: a caller of load_model, which skips the preflight,
    still never gets a model whose missing tensors were filled with random values."""
    from optprune.llm_adapters.loading import load_model
    from optprune.llm_adapters.model_files import IncompleteModelError
    model = tmp_path / "model"
    shutil.copytree(stories_dir, model)
    _drop_tensor(model, "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(IncompleteModelError, match=r"missing model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(str(model))
    shutil.copytree(stories_dir, tmp_path / "intact")
    assert load_model(str(tmp_path / "intact"))[2]["num_layers"] == 5
