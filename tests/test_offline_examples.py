"""The documented examples run offline as written ("Add your own teacher" in its offline form: the
GGUF teacher and the built-in corpus), and a hub id that is neither cached nor reachable fails
with one line and no retries (the hub is looked for once), leaving no run folder behind."""
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alignkit.core import hub

ROOT = Path(__file__).resolve().parents[1]

# The example's files, read from the docs page that gives them (so the test runs what users read).
PAGE = (ROOT / "docs" / "teachers.md").read_text()
MY_TEACHER, MY_RUN = (re.search(rf"```yaml\n(# {name}\n.*?)```", PAGE, re.S).group(1)
                      for name in ("adapters/my-teacher.yaml", "configs/my-run.yaml"))
COMMANDS = ["alignkit check configs/my-run.yaml", "alignkit train configs/my-run.yaml"]
SMALL = ["train.steps=2", "align.stop_step=1", "train.micro_batch_size=2", "task.seq_len=32",
         "task.text.max_train_docs=20", "task.text.eval_batches=1", "--no-progress"]


def alignkit(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "alignkit", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_add_your_own_teacher_runs_offline_as_written(tmp_path):
    for text in (MY_TEACHER, MY_RUN):
        path = tmp_path / text.splitlines()[0].removeprefix("# ")
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    for command in COMMANDS:
        words = shlex.split(command)[1:]
        done = alignkit(words + (SMALL if words[0] == "train" else []), tmp_path, HF_HUB_OFFLINE="1")
        assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
    [run] = (tmp_path / "runs").iterdir()
    assert run.name.startswith("my-run-") and json.loads((run / "results.json").read_text())["eval_loss"] > 0
    saved = (run / "config.yaml").read_text()
    assert "source: gguf" in saved and "source: builtin" in saved


# port 9 refuses at once; no offline switch or proxy set (tests give HF_HOME an empty cache)
UNREACHABLE = {"HF_ENDPOINT": "http://127.0.0.1:9", **dict.fromkeys(hub.OFFLINE_ENV + hub.PROXY_ENV, "")}


def assert_one_line_no_retries(done: subprocess.CompletedProcess, *needles: str) -> None:
    # no time bound: on a loaded machine an import alone can take a minute; the retries print "Retrying"
    lines = [line for line in done.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "127.0.0.1 cannot be reached" in lines[0] and all(n in lines[0] for n in needles), lines[0]
    assert "Retrying" not in done.stderr


@pytest.mark.slow
def test_hub_model_fails_fast_with_one_line(tmp_path):
    recipe = tmp_path / "hub-teacher.yaml"
    recipe.write_text(textwrap.dedent("""\
        student: {preset: llama-tiny}
        teacher: {kind: hf_causal, source: pretrained, name_or_path: EleutherAI/pythia-70m}
        task: {preset: builtin}
        align: {early_layer: 2, stop_step: 4}
        train: {steps: 8}
        """))
    done = alignkit(["check", str(recipe)], tmp_path, **UNREACHABLE, HF_HOME=str(tmp_path / "hf"))
    assert_one_line_no_retries(done, "name_or_path='EleutherAI/pythia-70m'", "local folder")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="needs the datasets package (the hub extra)")
def test_hub_dataset_fails_fast_and_leaves_no_run_folder(tmp_path):
    done = alignkit(["train", str(ROOT / "configs" / "debug.yaml"), "task.preset=wikitext2", f"output_dir={tmp_path / 'runs'}",
                     "--no-progress"], tmp_path, **UNREACHABLE, HF_HOME=str(tmp_path / "hf"))
    assert_one_line_no_retries(done, "task.text.hf_name='Salesforce/wikitext'",
                         "task.text.source=files")
    assert list((tmp_path / "runs").iterdir()) == []
