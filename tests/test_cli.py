"""The command line a person expects: --version, help text for every argument without reST
markup, "did you mean" for mistyped keys, presets, registry names and recipe paths, and the
time-series recipes' quick commands (each loads as written)."""
import argparse
import re
import shlex
from pathlib import Path

import pytest

import alignkit
from alignkit.check import count_processes
from alignkit.cli import build_parser, main
from alignkit.core.errors import ConfigError, MissingFile
from alignkit.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[1]


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"alignkit {alignkit.__version__}"


def test_help_describes_every_argument_without_rest_markup():
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) >= {"train", "check", "prepare", "pretrain-teacher", "eval"}
    for name, command in [("alignkit", parser), *commands.choices.items()]:
        text = command.format_help()
        assert not re.search(r"``|:(func|mod|class|meth):", text), name
        assert command.description, name
        undescribed = [a.dest for a in command._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
        assert undescribed == [], f"{name}: {undescribed}"


@pytest.mark.parametrize("override, expected", [
    ("train.stesp=3", r"unknown config key 'train.stesp'; did you mean 'train.steps'\?"),
    ("trian.steps=3", r"unknown config key 'trian'; did you mean 'train'\?"),
    ("student.options.archh={}", r"'student.options.archh'; did you mean 'student.options.arch'\?"),
    ("student.preset=llama-smal", r"student.preset='llama-smal': no such preset; did you mean 'llama-small'\?"),
    ("align.objective=cosin", r"align.objective='cosin' is not a registered objective; did you mean 'cosine'\?"),
])
def test_did_you_mean_for_keys_presets_and_registry_names(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_experiment(ROOT / "configs" / "debug.yaml", [override])


def test_unknown_key_with_nothing_close_has_no_guess():
    with pytest.raises(ConfigError) as err:
        load_experiment(ROOT / "configs" / "debug.yaml", ["train.zzz=1"])
    assert "did you mean" not in str(err.value) and "valid: steps" in str(err.value)


def test_recipe_path_suggests_the_recipe_of_that_name(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(MissingFile, match=r"did you mean configs/ts/japanese_vowels.yaml\?"):
        load_experiment("configs/japanese_vowels.yaml")
    with pytest.raises(MissingFile, match=r"did you mean configs/quickstart.yaml\?"):
        load_experiment("configs/quickstrat.yaml")
    assert main(["check", "configs/zzz_no_such.yaml"]) == 2
    assert capsys.readouterr().err.strip() == ("alignkit: error: configs/zzz_no_such.yaml: no such recipe file "
                                               "(recipes are under configs/)")


def test_process_counts_read_as_english():
    assert (count_processes(1), count_processes(8)) == ("1 process", "8 processes")


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "ts").glob("*.yaml")), ids=lambda p: p.stem)
def test_time_series_recipes_give_their_time_and_a_quick_command_that_loads(recipe, monkeypatch):
    header = "".join(line[1:] for line in recipe.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "Time on 2 cores" in header and re.search(r"\d+ min \d+ s", header)
    command = shlex.split(re.search(r"`(alignkit train [^`]+)`", header.replace("\n", " ")).group(1))
    assert command[2] == str(recipe.relative_to(ROOT))
    monkeypatch.chdir(ROOT)
    cfg = load_experiment(command[2], command[3:])
    assert (cfg.train.steps, cfg.student.options.keep_layers) == (30, 8)
