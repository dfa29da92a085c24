"""Every YAML recipe and preset loads and validates; the core imports nothing heavy."""
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.core.registry import ADAPTERS
from alignkit.experiment import load_experiment

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPES) >= 15


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_recipe_loads_and_validates(recipe):
    cfg = load_experiment(recipe)
    assert cfg.train.steps >= 1
    if cfg.align.method != "none":  # explicit terms carry their own stop steps (-1: the whole run)
        stops = [term.stop_step for term in cfg.align.terms] if cfg.align.terms else [cfg.align.stop_step]
        assert all(stop <= cfg.train.steps for stop in stops)


@pytest.mark.parametrize("preset", sorted((REPO / "adapters").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_presets_load(preset):
    cfg = load_experiment(None, [f"student.preset={preset.stem}", "align.method=none"])
    assert cfg.student.kind in ADAPTERS  # a registered adapter (the list grows with each modality)


def test_core_imports_only_torch_and_omegaconf():
    code = (
        "import sys, alignkit.core.engine, alignkit.core.trainer, alignkit.core.config, alignkit.core.checkpoint;"
        "heavy = [m for m in ('transformers', 'aeon', 'datasets', 'alignkit.adapters', 'alignkit.tasks') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
