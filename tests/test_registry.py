import pytest

from alignkit.plugins import load_plugins
from alignkit.experiment import load_experiment
def test_unknown_adapter_option_names_key_and_valid_ones():
    with pytest.raises(ValueError, match=r"student.options.poolng'; did you mean 'student.options.pooling'\? \(valid: .*pooling"):
        load_experiment("configs/ts/japanese_vowels.yaml", ["student.options.poolng=last"])
def test_mistyped_and_out_of_range_options():
    with pytest.raises(ValueError, match=r"student.options.keep_layers"):
        load_experiment("configs/ts/japanese_vowels.yaml", ["student.options.keep_layers=many"])
    with pytest.raises(ValueError, match=r"student.options.pooling='first': must be one of mean, last"):
        load_experiment("configs/ts/japanese_vowels.yaml", ["student.options.pooling=first"])
def test_options_are_typed_after_loading():
    cfg = load_experiment("configs/ts/japanese_vowels.yaml", ["student.options.pooling=last"])
    assert cfg.student.options.pooling == "last" and type(cfg.student.options).__name__ == "HFTimeSeriesOptions"


import os
import subprocess
import sys
import textwrap
from pathlib import Path

from alignkit.core import registry
from alignkit.core.registry import OBJECTIVES, Registry

ROOT = Path(__file__).resolve().parents[1]


def test_registry_errors_name_the_key_and_the_known_names():
    table = Registry("widget")
    table.register("a", 1)
    with pytest.raises(ValueError, match=r"x.kind='b' is not a registered widget \(known: a\)"):
        table.get("b", "x.kind")
    with pytest.raises(ValueError, match="already registered"):
        table.register("a", 2)
    table.register("a", 2, replace=True)
    assert table.get("a", "k") == 2 and "a" in table and table.names() == ["a"]


def test_unknown_plugin_module_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("ALIGNKIT_PLUGINS", "no_such_alignkit_plugin_xyz")
    with pytest.raises(ImportError, match="plug-in 'no_such_alignkit_plugin_xyz'"):
        load_plugins()


def _write_plugin(folder: Path) -> None:
    (folder / "demo_plugin.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from alignkit.adapters.hf_causal import build_hf_teacher
        from alignkit.core.registry import register_adapter

        @dataclass
        class Options:
            scale: float = 1.0

        def build_teacher(cfg, *, device, data):
            return build_hf_teacher(cfg.__class__(kind="hf_causal", source="config",
                                    options={"arch": {"model_type": "llama", "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                    "num_key_value_heads": 4, "vocab_size": 49152}}), device=device)

        def register():
            register_adapter("demo_teacher", teacher=build_teacher, options=Options)
    '''))
    dist = folder / "demo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[alignkit.plugins]\ndemo = demo_plugin:register\n")


def test_entry_point_plugin_registers_an_adapter_with_typed_options(tmp_path):
    _write_plugin(tmp_path)
    recipe = tmp_path / "demo.yaml"
    recipe.write_text("student: {preset: llama-tiny}\nteacher: {kind: demo_teacher, options: {scale: 2.0}}\n")
    code = ("from alignkit.experiment import load_experiment\n"
            f"cfg = load_experiment({str(recipe)!r})\n"
            "print(type(cfg.teacher.options).__name__, cfg.teacher.options.scale)\n"
            f"load_experiment({str(recipe)!r}, ['teacher.options.scael=3'])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["Options", "2.0"], out.stderr
    assert "unknown config key 'teacher.options.scael'; did you mean 'teacher.options.scale'? (valid: scale)" in out.stderr
