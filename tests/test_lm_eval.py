"""``optprune eval --tasks`` through lm-evaluation-harness (llm_adapters/lm_eval_tasks.py), offline, on a tiny
custom multiple-choice task over a local jsonl file, on stories260K. The network is cut for the whole test."""
from __future__ import annotations

import json
import socket

import pytest

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from optprune.cli import main  # noqa: E402

ROWS = [
    {"question": "Once upon a", "choices": ["time", "banana"], "answer": 0},
    {"question": "The cat sat on the", "choices": ["mat", "quantum"], "answer": 0},
    {"question": "The little girl was very", "choices": ["happy", "seventeen"], "answer": 0},
    {"question": "They went to the", "choices": ["park", "algorithm"], "answer": 0},
    {"question": "He saw a big", "choices": ["dog", "integral"], "answer": 0},
]


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    d = tmp_path / "tasks"
    d.mkdir()
    data = d / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (d / "tiny.yaml").write_text(f"""task: optprune_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))

    def no_network(*a, **k):
        raise OSError("network access attempted during an offline test")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return d


def test_eval_tasks_runs_offline_on_a_local_task(stories_dir, task_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(stories_dir), "--tasks", "optprune_tiny_mc", "--include-path", str(task_dir),
               "--eval", "", "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rec = json.loads(out.read_text())
    res = rec["zero_shot"]["optprune_tiny_mc"]
    assert res["sample_len"] == len(ROWS)
    assert res["acc,none"] in [i / len(ROWS) for i in range(len(ROWS) + 1)]
    assert "perplexity" not in rec or not rec["perplexity"]
    assert "lm-eval optprune_tiny_mc" in captured.out
    # --task-limit reaches lm-eval
    rc = main(["eval", "--model", str(stories_dir), "--tasks", "optprune_tiny_mc", "--include-path", str(task_dir),
               "--eval", "", "--task-limit", "2", "--output", str(out)])
    assert rc == 0
    assert json.loads(out.read_text())["zero_shot"]["optprune_tiny_mc"]["sample_len"] == 2


def test_unknown_task_is_a_one_line_error(stories_dir, task_dir, capsys):
    rc = main(["eval", "--model", str(stories_dir), "--tasks", "no_such_task", "--include-path", str(task_dir),
               "--eval", ""])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown lm-eval task(s) no_such_task" in err[0]


def test_without_lm_eval_the_error_names_the_install(stories_dir, monkeypatch, capsys):
    from optprune.llm_adapters import lm_eval_tasks
    from optprune.llm_adapters.evaluation import zero_shot
    monkeypatch.setattr(lm_eval_tasks, "lm_eval_available", lambda: False)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        zero_shot(None, None, ["hellaswag"])
    rc = main(["eval", "--model", str(stories_dir), "--tasks", "hellaswag", "--eval", ""])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install lm-eval" in err[0]
