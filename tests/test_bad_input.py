"""Bad input to ``optprune prune`` / ``optprune eval``: exit code 2, one line on stderr, no traceback, and the
output folder exactly as it was (an earlier optprune output sits there in every case), before any pruning.

The model is a copy of stories260K (``stories_dir`` fixture) that each case may damage."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections import namedtuple
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from optprune.cli import main  # noqa: E402
from optprune.llm_adapters import preflight  # noqa: E402
from optprune.llm_adapters.checkpoint import Checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ damage
def _rewrite_config(model: Path, **changes):
    cfg = json.loads((model / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (model / "config.json").write_text(json.dumps(cfg))


def _truncate(f: Path, keep: float):
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


def _mismatched_shard(model: Path):
    """a complete, readable safetensors file whose embedding has a shape the config does not give"""
    from safetensors.torch import load_file, save_file
    sd = load_file(str(model / "model.safetensors"))
    k = next(k for k in sd if k.endswith("embed_tokens.weight"))
    sd[k] = sd[k][:, :32].contiguous()
    save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})


def _shard_index(model: Path):
    """an index naming a second shard that is not there"""
    from safetensors import safe_open
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    wm = {n: "model-00001-of-00002.safetensors" for n in names[:-1]}
    wm[names[-1]] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def _gguf(tmp: Path, body: bytes) -> Path:
    f = tmp / "m.gguf"
    f.write_bytes(body)
    return f


def _checkpoint(path: Path, **settings):
    """a checkpoint of a run with other settings"""
    ck = Checkpoint(path, settings or {"method": "magnitude"}, resume=False, explicit=True)
    ck._write_manifest()


# (id, option changes {flag: value | True | None (drop)}, setup(tmp, model, out) -> None, expected in the message)
CASES = [
    # combinations that used to be ignored silently
    ("structured-with-pattern", {"--method": "spap", "--pattern": "2:4"}, None, "structured method"),
    ("structure-with-unstructured", {"--structure": "heads"}, None, "applies to structured"),
    ("nm-with-other-sparsity", {"--pattern": "2:4", "--sparsity": "0.7"}, None, "contradicts"),
    ("min-degree-without-nm", {"--min-degree": "2"}, None, "min_degree does not apply"),
    ("min-degree-structured", {"--method": "spap", "--min-degree": "2"}, None, "--min-degree"),
    ("allocation-eps-uniform", {"--allocation-eps": "0.1"}, None, "--allocation-eps"),
    ("eval-with-no-eval", {"--eval": "wikitext2"}, None, "--no-eval"),
    ("eval-seqlen-with-no-eval", {"--eval-seqlen": "64"}, None, "--no-eval"),
    ("eggs-unknown-mask", {"--method": "eggs", "--pattern": "2:4", "-O": "mask=errors"}, None,
     "option mask='errors'; choose one of score, error"),
    # ranges and shapes from config.json
    ("structured-0.999-mlp", {"--method": "spap", "--sparsity": "0.999"}, None, "one group kept"),
    ("structured-heads-0.9", {"--method": "spap", "--structure": "heads", "--sparsity": "0.9"}, None, "8 attention"),
    ("nm-width-172", {"--pattern": "4:8"}, None, "divisible by M=8"),
    ("nm-width-hidden", {"--pattern": "2:3"}, None, "input width 64"),
    ("negative-sparsity", {"--sparsity": "-0.1"}, None, "sparsity"),
    ("n-above-m", {"--pattern": "6:4"}, None, "N ≤ M"),
    ("unknown-method", {"--method": "no_such_method"}, None, "unknown method"),
    ("unknown-protocol", {"--protocol": "nope", "--no-eval": None}, None, "unknown protocol"),
    ("unknown-eval-text", {"--eval": "no_such_text", "--no-eval": None}, None, "no_such_text"),
    ("nproc-sequential", {"--nproc": "2"}, None, "dense-input"),
    ("resume-with-low-memory", {"--resume": True, "--low-memory": True}, None, "--low-memory"),
    # files and folders
    ("data-dir-missing", {"--data-dir": "{tmp}/nodata"}, None, "--data-dir"),
    ("calibration-text-missing", {"--calibration": "ptb", "--data-dir": "{tmp}/empty"},
     lambda tmp, m, o: (tmp / "empty").mkdir(), "ptb"),
    ("reference-missing", {"--reference": "{tmp}/no_ref"}, None, "--reference"),
    ("reference-damaged", {"--reference": "{tmp}/ref"},
     lambda tmp, m, o: (shutil.copytree(m, tmp / "ref"), (tmp / "ref" / "config.json").write_text("{")),
     "malformed JSON"),
    ("model-missing", {"--model": "{tmp}/no_model"}, None, "no model"),
    ("output-is-a-file", {"--output": "{tmp}/afile"}, lambda tmp, m, o: (tmp / "afile").write_text("x"),
     "not a directory"),
    ("output-under-a-file", {"--output": "{tmp}/afile/sub"}, lambda tmp, m, o: (tmp / "afile").write_text("x"),
     "not a directory"),
    ("output-unwritable", {"--output": "/proc/optprune-test-out"}, None, "not writable"),
    ("output-exists-no-overwrite", {"--overwrite": None}, None, "--overwrite"),
    ("output-foreign", {"--output": "{tmp}/foreign"},
     lambda tmp, m, o: ((tmp / "foreign").mkdir(), (tmp / "foreign" / "precious.txt").write_text("x")),
     "not an optprune output"),
    ("output-inside-input", {"--output": "{model}/pruned"}, None, "inside the input"),
    ("disk-full", {}, "disk", "not enough disk space"),
    ("config-malformed", {}, lambda tmp, m, o: (m / "config.json").write_text('{"model_type": "llama",'),
     "malformed JSON"),
    ("config-not-an-object", {}, lambda tmp, m, o: (m / "config.json").write_text("[1, 2]"), "JSON object"),
    ("config-no-model-type", {}, lambda tmp, m, o: _rewrite_config(m, model_type=None), "model_type"),
    ("config-unknown-architecture", {}, lambda tmp, m, o: _rewrite_config(m, model_type="mamba"),
     "model type 'mamba'"),
    ("safetensors-truncated", {}, lambda tmp, m, o: _truncate(m / "model.safetensors", 0.6), "truncated"),
    ("safetensors-header-garbage", {},
     lambda tmp, m, o: (m / "model.safetensors").write_bytes(struct.pack("<Q", 12) + b"not json!!!!" + b"\0" * 64),
     "damaged safetensors header"),
    ("safetensors-mismatched", {}, lambda tmp, m, o: _mismatched_shard(m), "another model"),
    ("shard-missing", {}, lambda tmp, m, o: _shard_index(m), "is missing"),
    ("weights-missing", {}, lambda tmp, m, o: (m / "model.safetensors").unlink(), "no weights"),
    ("tokenizer-missing", {},
     lambda tmp, m, o: [(m / f).unlink() for f in ("tokenizer.json", "tokenizer.model") if (m / f).exists()],
     "no tokenizer"),
    ("tokenizer-config-malformed", {}, lambda tmp, m, o: (m / "tokenizer_config.json").write_text("{x"),
     "tokenizer_config.json"),
    ("gguf-bad-magic", {"--model": "{tmp}/m.gguf"}, lambda tmp, m, o: _gguf(tmp, b"GGML" + b"\0" * 64),
     "not a GGUF"),
    ("gguf-truncated", {"--model": "{tmp}/m.gguf"},
     lambda tmp, m, o: _gguf(tmp, b"GGUF" + struct.pack("<IQQ", 3, 1, 5) + struct.pack("<Q", 200) + b"general"),
     "truncated GGUF"),
    # checkpoints
    ("resume-without-checkpoint", {"--resume": True}, None, "nothing to resume"),
    ("resume-other-settings", {"--resume": True, "--checkpoint-dir": "{tmp}/ck"},
     lambda tmp, m, o: _checkpoint(tmp / "ck"), "other settings"),
    ("checkpoint-exists-no-resume", {"--checkpoint-dir": "{tmp}/ck"},
     lambda tmp, m, o: _checkpoint(tmp / "ck"), "--resume"),
    ("checkpoint-dir-foreign", {"--checkpoint-dir": "{tmp}/foreign"},
     lambda tmp, m, o: ((tmp / "foreign").mkdir(), (tmp / "foreign" / "precious.txt").write_text("x")),
     "not an optprune checkpoint"),
    ("checkpoint-dir-inside-output", {"--checkpoint-dir": "{out}/ck"}, None, "must not be inside"),
    # eval
    ("eval-config-malformed", "eval", lambda tmp, m, o: (m / "config.json").write_text("{"), "malformed JSON"),
    ("eval-data-dir-missing", "eval-data", None, "--data-dir"),
]


def _digest(root: Path) -> dict:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_one_line_output_unchanged(case, stories_dir, tmp_path, capfd, monkeypatch):
    name, opts, setup, expected = case
    data = tmp_path / "data"
    data.mkdir()
    model = tmp_path / "model"
    shutil.copytree(stories_dir, model)
    out = tmp_path / "out"  # an earlier optprune output
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"command": "prune", "status": "done"}))
    (out / "model.safetensors").write_bytes(b"earlier weights")
    if setup == "disk":
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10 ** 6, 10 ** 6 - 1000, 1000))
    elif setup is not None:
        setup(tmp_path, model, out)
    before = {p: _digest(p) for p in (out, model)}
    siblings = sorted(p.name for p in tmp_path.iterdir())

    def fill(v):
        return str(v).replace("{tmp}", str(tmp_path)).replace("{model}", str(model)).replace("{out}", str(out))

    if opts in ("eval", "eval-data"):
        argv = ["eval", "--model", str(model), "--eval", "wikitext2", "--output", str(out / "eval.json")]
        argv += ["--data-dir", str(tmp_path / "nodata" if opts == "eval-data" else data)]
    else:
        base = {"--model": str(model), "--method": "wanda", "--output": str(out), "--overwrite": True,
                "--data-dir": str(data), "--no-eval": True, "--calibration": "self", "--nsamples": "2",
                "--seqlen": "16"}
        base.update(opts)
        argv = ["prune"]
        for k, v in base.items():
            if v is None:
                continue
            argv += [k] if v is True else [k, fill(v)]
    capfd.readouterr()
    rc = main(argv)
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(f"optprune {argv[0]}: error:") and expected in err[0], err[0]
    assert "Traceback" not in err[0]
    assert {p: _digest(p) for p in (out, model)} == before  # nothing written, nothing changed
    assert sorted(p.name for p in tmp_path.iterdir()) == siblings  # no temporary folder, no checkpoint left


def test_at_least_thirty_cases():
    assert len(CASES) >= 30
