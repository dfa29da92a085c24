"""The README and docs/ stay true: the README fits a first read, every local link resolves, the
generated config reference matches the dataclasses, and every command in a ```bash block that
can run offline is run. An ``alignkit train`` line is run as ``alignkit check`` with the same
arguments (the config train would load, validated with every model built on the meta device:
seconds, not the minutes a full run takes); the full runs themselves are covered by the
end-to-end tests. Lines that need GPUs, the network, an installer or a finished run are listed
with the reason they are skipped."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 300
# why a command line is not run here (the first matching pattern wins)
NOT_OFFLINE = [
    (r"^(pip|torchrun)\b", "installs packages or needs several GPUs"),
    (r"^python -m pytest", "the test command itself"),
    (r"^alignkit demo\b", "the main job (minutes); tests/test_compare.py runs it end to end with tiny models"),
    (r"^python benchmarks/", "a benchmark (minutes to hours; see docs/benchmarks.md)"),
    (r"--resume|runs/<|runs/my-run|\.\.\.", "needs a run that earlier lines would have made"),
    (r"^alignkit eval\b", "downloads its tasks from the hub"),
    (r"^alignkit prepare\b.*(/data/|\.\.\.)", "reads a corpus that is not shipped"),
    (r"^ALIGNKIT_PLUGINS=my_project", "needs the user's own package"),
    (r"^ALIGNKIT_PLUGINS=my_alignkit_plugin", "tests/test_plugins.py writes the plug-in out and runs it"),
    (r"configs/small_scale/let(_kd)?\.yaml", "needs the teacher that configs/small_scale/teacher.yaml trains"),
]


def command_lines(page: Path) -> list[str]:
    """Each command of the page's ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split("&&"))
    return commands


def _cases() -> list:
    cases, seen = [], set()
    for page in PAGES:
        for command in command_lines(page):
            if command in seen:
                continue
            seen.add(command)
            reason = next((why for pattern, why in NOT_OFFLINE if re.search(pattern, command)), None)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            cases.append(pytest.param(command, id=f"{page.name}: {command[:70]}", marks=marks))
    return cases


@pytest.mark.parametrize("command", _cases())
def test_documented_command_runs_offline(command: str, monkeypatch, capsys) -> None:
    """In this process (a fresh interpreter per line would cost seconds of imports each)."""
    from alignkit.cli import main

    if "configs/vision/" in command and importlib.util.find_spec("timm") is None:
        pytest.skip("needs the [vision] extra")
    words = shlex.split(command)
    while re.match(r"^[A-Z_]+=", words[0]):
        monkeypatch.setenv(*words.pop(0).split("=", 1))
    assert words[0] == "alignkit", f"no rule for a documented command: {command!r}"
    if words[1] == "train":
        words[1] = "check"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)
    try:
        code = main(words[1:])
    except SystemExit as stop:
        code = stop.code
    assert code in (0, None), f"{command}\n{capsys.readouterr().err[-3000:]}"


def test_the_readme_fits_a_first_read() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move reference material to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_local_links_resolve(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"^(https?:|mailto:|#)", target):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.name}: links to missing files: {broken}"


def test_the_config_reference_is_generated_from_the_current_dataclasses() -> None:
    result = subprocess.run([sys.executable, str(REPO / "docs" / "config_reference.py"), "--check"], cwd=REPO,
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr + result.stdout
