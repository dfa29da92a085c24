"""`alignkit eval` runs lm-evaluation-harness on a checkpoint; offline, on a tiny local
multiple-choice task this test writes itself (the paper's nine tasks need the hub)."""
import json

import pytest

pytest.importorskip("lm_eval")

from alignkit.cli import main  # noqa: E402
from alignkit.evaluate import PAPER_TASKS, resolve_model_dir  # noqa: E402
from test_text_e2e import train  # noqa: E402

QUESTIONS = [
    ("The capital of France is", ["Paris", "banana", "seven"], 0),
    ("Two plus two equals", ["a river", "four", "blue"], 1),
    ("Water freezes at zero degrees", ["Celsius", "o'clock", "north"], 0),
    ("The opposite of hot is", ["loud", "tall", "cold"], 2),
]


@pytest.mark.slow
def test_eval_command_on_a_local_multiple_choice_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert train(tmp_path, "run", "train.steps=2", "train.eval_every=0", "align.stop_step=2") == 0
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: alignkit_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\nfewshot_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    run_dir = tmp_path / "run"
    assert main(["eval", str(run_dir), "--tasks", "alignkit_tiny_mc", "--include-path", str(tasks), "--batch-size", "2"]) == 0
    saved = json.loads((run_dir / "final" / "eval" / "alignkit_tiny_mc.json").read_text())
    accuracy = saved["results"]["alignkit_tiny_mc"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0 and saved["num_fewshot"] == 1
    assert "| alignkit_tiny_mc | acc |" in (run_dir / "final" / "eval" / "alignkit_tiny_mc.md").read_text()
    assert resolve_model_dir(run_dir / "checkpoints" / "step_000002") == run_dir / "checkpoints" / "step_000002" / "model"
    assert len(PAPER_TASKS) == 9


def test_eval_of_a_folder_without_a_model_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "no Hugging Face model here" in capsys.readouterr().err
