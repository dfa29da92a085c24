"""Time-series LET end to end on BasicMotions with tiny models: TimesNet teacher pre-trained
(then reused from its cache), tiny LLaMA student aligned to it; same engine and trainer classes
as the text task."""
import json
from pathlib import Path

import pytest
import torch

from alignkit.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configs" / "ts" / "japanese_vowels.yaml")
TINY = [
    "student.preset=llama-tiny-ts", "task.uea.datasets=[BasicMotions]", "teacher.options.d_model=16",
    "teacher.options.d_ff=16", "teacher.options.num_kernels=2", "task.teacher_pretrain.steps=30",
    "task.teacher_pretrain.eval_every=10", "task.teacher_pretrain.micro_batch_size=8",
    "train.steps=30", "train.micro_batch_size=8", "train.lr=3e-3", "train.eval_every=10", "align.stop_step=15",
    "align.early_layer=1",
]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ts_let_end_to_end_on_basic_motions(tmp_path, monkeypatch):
    torch.set_num_threads(1)  # small convolutions: threads only add contention on 2 cores
    import alignkit.core.trainer as trainer_module
    from alignkit.core.engine import AlignmentEngine
    from alignkit.tasks.text_pretrain import TextPretrainTask
    from alignkit.tasks.ts_classify import TSClassifyTask

    seen = []
    original = trainer_module.Trainer.__init__

    def spy(self, **kwargs):
        seen.append((type(kwargs["engine"]), type(kwargs["task"])))
        original(self, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "__init__", spy)
    assert main(["train", RECIPE, f"output_dir={tmp_path}", "run_name=ts", *TINY, "--no-progress"]) == 0
    run_dir = tmp_path / "ts"
    train = [r for r in rows(run_dir) if "ce" in r]
    assert len(train) == 30
    assert sum(r["ce"] for r in train[-5:]) / 5 < sum(r["ce"] for r in train[:5]) / 5
    assert train[0]["teacher_active"] and not train[-1]["teacher_active"] and "cos/t-1-s1" in train[0]
    assert any("val_accuracy" in r for r in rows(run_dir))
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["test_size"] == 40 and len(results["confusion_matrix"]) == 4
    assert (run_dir / "confusion_matrix.png").is_file()
    # the teacher pre-training and the LET run went through the one trainer, with the text
    # task's sibling classes: the same engine class the text task uses
    assert seen[0] == (type(None), TSClassifyTask) and seen[1] == (AlignmentEngine, TSClassifyTask)
    assert TextPretrainTask.__mro__[1] is TSClassifyTask.__mro__[1]
    teacher_dirs = list((tmp_path / "teachers").glob("timesnet-BasicMotions-*/final"))
    assert len(teacher_dirs) == 1 and (teacher_dirs[0] / "timesnet.json").is_file()
    # a second run reuses the cached teacher instead of pre-training again
    seen.clear()
    assert main(["train", RECIPE, f"output_dir={tmp_path}", "run_name=ts2", *TINY, "train.steps=2",
                 "align.stop_step=2", "--no-progress"]) == 0
    assert [t for _, t in seen] == [TSClassifyTask]


def test_teacher_pretrained_on_several_datasets_guides_a_student_on_one(tmp_path):
    torch.set_num_threads(1)
    overrides = [*TINY, "task.teacher_datasets=[JapaneseVowels,BasicMotions]", "task.teacher_pretrain.steps=10",
                 "train.steps=4", "align.stop_step=2", "train.eval_every=2"]
    assert main(["train", RECIPE, f"output_dir={tmp_path}", "run_name=multi", *overrides, "--no-progress"]) == 0
    teacher = next((tmp_path / "teachers").glob("timesnet-JapaneseVowels+BasicMotions-*"))
    saved = json.loads((teacher / "final" / "timesnet.json").read_text())
    assert saved["num_channels"] == 12 and saved["num_classes"] == 9 + 4  # joint label space, padded channels
    first = rows(tmp_path / "multi")[0]
    assert first["teacher_active"] and "cos/t-1-s1" in first  # a 6-channel student batch fed the 12-channel teacher


def test_interrupted_teacher_pretraining_continues_with_the_run(tmp_path, monkeypatch, capsys):
    import os
    import signal

    import alignkit.core.trainer as trainer_module

    torch.set_num_threads(1)
    finish = trainer_module.Trainer._finish_step

    def sigterm_at_step_6_of_the_teacher(self):
        finish(self)
        if self.engine is None and self.step == 6 and not hasattr(self, "_fired"):
            self._fired = True
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(trainer_module.Trainer, "_finish_step", sigterm_at_step_6_of_the_teacher)
    overrides = [*TINY, "task.teacher_pretrain.steps=12", "task.teacher_pretrain.save_every=4",
                 "train.steps=2", "align.stop_step=2"]
    assert main(["train", RECIPE, f"output_dir={tmp_path}", "run_name=ts", *overrides, "--no-progress"]) == 143
    err = capsys.readouterr().err
    assert "teacher pre-training SIGTERM at step 6" in err and f"--resume {tmp_path / 'ts'}" in err
    teacher = next((tmp_path / "teachers").glob("timesnet-BasicMotions-*"))
    assert (teacher / "checkpoints" / "step_000006").is_dir()  # kept, never deleted
    assert main(["train", "--resume", str(tmp_path / "ts"), "--no-progress"]) == 0
    assert "continuing the timesnet teacher" in capsys.readouterr().out
    assert [r["step"] for r in rows(teacher) if "ce" in r] == list(range(1, 13))
    assert (teacher / "final" / "timesnet.json").is_file()


def test_teacher_pretraining_has_its_own_seed_and_leaves_the_run_rng_alone(tmp_path):
    torch.set_num_threads(1)
    overrides = [*TINY, "task.teacher_pretrain.steps=6", "train.steps=3", "align.stop_step=2", "align.projection=linear",
                 "train.eval_every=3"]
    strip = lambda rows_: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_mb", "teacher_s")} for r in rows_]  # noqa: E731
    for name in ("miss", "hit"):  # the first run pre-trains the teacher, the second reuses it
        assert main(["train", RECIPE, f"output_dir={tmp_path}", f"run_name={name}", *overrides, "--no-progress"]) == 0
    assert strip(rows(tmp_path / "miss")) == strip(rows(tmp_path / "hit"))  # same student RNG (linear projection init)
    assert main(["train", RECIPE, f"output_dir={tmp_path}", "run_name=seed1", *overrides,
                 "task.teacher_pretrain.seed=1", "--no-progress"]) == 0
    teachers = sorted((tmp_path / "teachers").glob("timesnet-BasicMotions-*/final/model.safetensors"))
    from safetensors.torch import load_file

    first, second = (load_file(str(t)) for t in teachers)
    assert len(teachers) == 2 and any(not torch.equal(first[k], second[k]) for k in first)
