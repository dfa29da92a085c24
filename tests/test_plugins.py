"""The README's "Extend alignkit" plug-in, run as written: a teacher adapter with typed options
and an objective, plus (written here) a task, all registered by plug-in modules and used end to end."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alignkit.core.errors import MissingFile, MissingPackage
from alignkit.plugins import load_plugins
import torch

ROOT = Path(__file__).resolve().parents[1]
ARCH = ("{model_type: llama, hidden_size: %d, intermediate_size: 64, num_hidden_layers: 3, num_attention_heads: 4,"
        " num_key_value_heads: 4, vocab_size: 64, max_position_embeddings: 64}")

REPEAT_TASK = '''
"""A synthetic task: sequences whose second half repeats the first (only that half is learnable)."""
from dataclasses import dataclass

import torch

from alignkit.core.adapter import DataInfo
from alignkit.core.registry import TASKS
from alignkit.tasks.base import TaskBase, TaskConfig, TaskSpec


@dataclass
class RepeatConfig(TaskConfig):
    vocab: int = 64
    seq_len: int = 16
    eval_batches: int = 2


class RepeatTask(TaskBase):
    loss_name = "nll"

    def _batch(self, generator, size):
        half = torch.randint(0, self.section.vocab, (size, self.section.seq_len // 2), generator=generator)
        ids = torch.cat([half, half], 1)
        return {"input_ids": ids, "labels": ids}

    def describe_data(self, teachers):
        return DataInfo(vocab_size=self.section.vocab, seq_len=self.section.seq_len)

    def build_data(self, teachers):
        self.position = 0
        return self.describe_data(teachers)

    def train_batches(self, micro_batch_size):
        while True:
            generator = torch.Generator().manual_seed(self.position)
            self.position += 1
            yield self._batch(generator, micro_batch_size)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]

    def evaluate(self, student, device):
        generator = torch.Generator().manual_seed(10**6)
        losses = [float(student(self._batch(generator, 4), []).loss) for _ in range(self.section.eval_batches)]
        return {"eval_loss": sum(losses) / len(losses)}

    def export(self, student, directory):
        student.save_pretrained(directory)


TASKS.register("repeat", TaskSpec(RepeatConfig, RepeatTask, ("eval_loss",)))
'''


def readme_plugin() -> str:
    text = (ROOT / "docs" / "extending.md").read_text()
    match = re.search(r"```python\n# my_alignkit_plugin.py\n(.*?)```", text, re.S)
    assert match, "docs/extending.md lost its plug-in example"
    return match.group(1)


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plugins")
    (folder / "my_alignkit_plugin.py").write_text(readme_plugin())
    (folder / "repeat_task.py").write_text(REPEAT_TASK)
    return folder


def test_readme_plugin_teacher_and_objective_compute_what_they_say(plugin_dir, monkeypatch):
    from alignkit.core import registry

    load_plugins()
    for table in (registry.ADAPTERS, registry.OBJECTIVES):  # the plug-in's names leave with this test
        monkeypatch.setattr(table, "_items", dict(table._items))
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.delitem(sys.modules, "my_alignkit_plugin", raising=False)
    import my_alignkit_plugin as plugin

    from alignkit.adapters.hf_causal import HFCausalTeacher
    from alignkit.core.config import ModelConfig
    from alignkit.core.registry import OBJECTIVES, build_teacher

    arch = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 64}
    torch.manual_seed(0)
    teacher = build_teacher(ModelConfig(kind="hf_layer_average", options={"arch": arch, "average_last": 2}))
    plain = HFCausalTeacher(teacher.model, "post_norm")
    batch = {"input_ids": torch.randint(0, 64, (2, 8))}
    blocks = plain.features(batch, [2, 3])
    assert torch.allclose(teacher.features(batch, [-1])[-1], (blocks[2] + blocks[3]) / 2)
    with pytest.raises(ValueError, match=r"teacher.options.average_last=5 must be in 1..3"):
        build_teacher(ModelConfig(kind="hf_layer_average", options={"arch": arch, "average_last": 5}))
    s = torch.randn(2, 8, 16)
    centered = OBJECTIVES.get("centered_cosine", "objective")
    assert float(centered(s, s + 5.0)) == pytest.approx(-1.0, abs=1e-5)  # a shared offset does not count
    assert float(OBJECTIVES.get("cosine", "objective")(s, s + 5.0)) > -0.9  # the plain cosine sees it
    assert plugin.LayerAverageOptions().average_last == 4
    del sys.modules["my_alignkit_plugin"]


def test_a_plugin_task_is_built_from_its_section_and_a_context(plugin_dir, monkeypatch):
    """A task sees its typed section and a TaskContext, never the whole experiment."""
    from alignkit.core import registry
    from alignkit.core.distributed import DistInfo
    from alignkit.tasks import TaskContext, build_task

    monkeypatch.setattr(registry.TASKS, "_items", dict(registry.TASKS._items))  # "repeat" leaves with this test
    monkeypatch.syspath_prepend(str(plugin_dir))
    monkeypatch.delitem(sys.modules, "repeat_task", raising=False)
    import repeat_task

    section = repeat_task.RepeatConfig(name="repeat", vocab=8, seq_len=6)
    task = build_task(section, TaskContext(eval_batch_size=2), dist=DistInfo(), device=torch.device("cpu"))
    assert task.section is section and not hasattr(task, "cfg")
    assert task.build_data({}).vocab_size == 8
    batch = next(iter(task.train_batches(3)))
    assert batch["input_ids"].shape == (3, 6) and int(batch["input_ids"].max()) < 8
    del sys.modules["repeat_task"]


@pytest.mark.slow
def test_plugin_adapter_task_and_objective_train_end_to_end(plugin_dir, tmp_path):
    recipe = tmp_path / "plugged.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        output_dir: {tmp_path / 'runs'}
        run_name: plugged
        student: {{kind: hf_causal, source: config, options: {{arch: {ARCH % 32}}}}}
        teacher: {{kind: hf_layer_average, source: config, options: {{average_last: 2, arch: {ARCH % 24}}}}}
        task: {{name: repeat, seq_len: 16}}
        align: {{objective: centered_cosine, early_layer: 2, stop_step: 4}}
        train: {{steps: 6, micro_batch_size: 4, eval_every: 3, lr: 3.0e-3, select_metric: eval_loss, select_mode: min}}
        """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(ROOT)]),
           "ALIGNKIT_PLUGINS": "my_alignkit_plugin,repeat_task", "OMP_NUM_THREADS": "1"}
    for command in (["check", str(recipe)], ["train", str(recipe), "--no-progress"]):
        done = subprocess.run([sys.executable, "-m", "alignkit", *command], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "runs" / "plugged"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    aligned = [r for r in rows if "align/t-1-s2" in r]
    assert [r["step"] for r in aligned] == [1, 2, 3, 4] and all(-1.0 <= r["align/t-1-s2"] <= 1.0 for r in aligned)
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    assert json.loads((run / "results.json").read_text())["best_eval_loss"] > 0
    saved = (run / "config.yaml").read_text()
    assert "name: repeat" in saved and "average_last: 2" in saved and "eval_batches: 2" in saved
    bad = subprocess.run([sys.executable, "-m", "alignkit", "check", str(recipe), "teacher.options.average_lst=2"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "teacher.options.average_lst" in bad.stderr and "average_last" in bad.stderr


def readme_plugin_command() -> list[str]:
    """The docs' command that trains with the plug-in, as argv (env assignments first)."""
    text = (ROOT / "docs" / "extending.md").read_text()
    match = re.search(r"```bash\n(ALIGNKIT_PLUGINS=my_alignkit_plugin alignkit .*?)```", text, re.S)
    assert match, "docs/extending.md lost its command that trains with the plug-in"
    return shlex.split(match.group(1).replace("\\\n", " "))


def console_script(folder: Path) -> list[str]:
    """``alignkit`` as the installed console script runs it: the import path starts at the
    script's folder, not at the working directory (unlike ``python -m``)."""
    script = folder / "bin" / "alignkit"
    script.parent.mkdir(exist_ok=True)
    script.write_text("import sys\nfrom alignkit.cli import main\nsys.exit(main())\n")
    return [sys.executable, str(script)]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["module name from the working directory", "--plugin path/to/file.py"])
def test_readme_plugin_command_runs_from_the_plugin_folder_without_pythonpath(tmp_path, form):
    (tmp_path / "my_alignkit_plugin.py").write_text(readme_plugin())
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "debug.yaml", tmp_path / "configs")
    words = readme_plugin_command()
    env = {k: v for k, v in os.environ.items() if k not in ("ALIGNKIT_PLUGINS", "PYTHONPATH")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # alignkit itself, not the plug-in's folder
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    assert words[:2] == ["alignkit", "train"]
    args = words[1:] + ["train.steps=2", "align.stop_step=1", "train.eval_every=2", "--no-progress"]
    if form.startswith("--plugin"):
        del env["ALIGNKIT_PLUGINS"]
        args = ["--plugin", "my_alignkit_plugin.py"] + args
    done = subprocess.run(console_script(tmp_path) + args, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    [run] = (tmp_path / "runs").iterdir()
    assert json.loads((run / "results.json").read_text())["eval_loss"] > 0
    assert "objective: centered_cosine" in (run / "config.yaml").read_text()


def test_plugin_file_errors_are_one_line(tmp_path):
    with pytest.raises(MissingFile, match=r"plug-in 'nowhere/mine.py' .*: no such file"):
        load_plugins(["nowhere/mine.py"])
    with pytest.raises(MissingPackage, match=r"plug-in 'no_such_plugin_module' .*--plugin path/to/plugin.py"):
        load_plugins(["no_such_plugin_module"])
