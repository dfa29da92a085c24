"""The study's planning (benchmarks/study.py): ``{steps}`` expressions, grids sharing one queue and
run folder, and reuse of a finished run whose settings another configuration repeats. No training."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from common import PATH_ALIASES, REPO, portable  # noqa: E402
from study import expand, plan, plan_grids, split_holdout  # noqa: E402
from study_runner import RUN_RECORD, Run, Runner  # noqa: E402


def test_steps_expressions_expand_alone_and_inside_yaml_values() -> None:
    assert expand("align.stop_step={steps//3}", 150) == "align.stop_step=50"
    terms = expand("align.terms=[{type: feature, stop_step: {steps//3}}, {type: logit_kd, stop_step: {steps//10}}]", 300)
    assert terms == "align.terms=[{type: feature, stop_step: 100}, {type: logit_kd, stop_step: 30}]"
    assert expand("train.lr=1e-3", 150) == "train.lr=1e-3"
    # more named numbers (ts_uea.py's {eighth}); a name not given stays as written
    assert expand("align.early_layer={eighth}", 150, eighth=2) == "align.early_layer=2"
    assert expand("align.early_layer={eighth}", 150) == "align.early_layer={eighth}"


def test_configurations_outside_align_get_their_own_baseline() -> None:
    grid = {"common": ["align.method=let"], "configs": {"a": ["align.lambda0=3"], "long": ["train.steps=20", "align.lambda0=3"]}}
    runs, baseline_of = plan(grid, [0, 1], 10, ["task.x=1"], [], [])
    assert baseline_of == {"a": "baseline", "long": "baseline@long"}
    by_name = {r.name: r.overrides for r in runs}
    assert "train.steps=20" in by_name["baseline@long-s1"] and "align.method=none" in by_name["baseline@long-s1"]
    assert "train.steps=10" in by_name["baseline-s0"]
    # seed 1 runs in reverse order, so load drifts into neither side
    assert [r.name for r in runs[:4]] == [n[:-1] + "0" for n in reversed([r.name for r in runs[4:]])]


def _args(tmp_path: Path, *grids: str, only: str = "") -> argparse.Namespace:
    return argparse.Namespace(grids=[str(tmp_path / g) for g in grids], only=only, seeds="0", steps=10)


def test_two_grids_may_not_give_one_run_name_two_meanings(tmp_path: Path) -> None:
    (tmp_path / "g1.yaml").write_text("configs:\n  cosine: [align.objective=cosine]\n")
    (tmp_path / "g2.yaml").write_text("configs:\n  cosine: [align.schedule=cosine]\n")
    (tmp_path / "g3.yaml").write_text("configs:\n  mse: [align.objective=mse]\n")
    assert [p[0] for p in plan_grids(_args(tmp_path, "g1.yaml", "g3.yaml"), [0], [], [])] == ["g1", "g3"]  # baseline shared
    with pytest.raises(SystemExit, match="g1 and g2 both name a run cosine-s0"):
        plan_grids(_args(tmp_path, "g1.yaml", "g2.yaml"), [0], [], [])
    assert [p[0] for p in plan_grids(_args(tmp_path, "g1.yaml", "g3.yaml", only="mse"), [0], [], [])] == ["g3"]
    with pytest.raises(SystemExit, match="no configuration nope in"):
        plan_grids(_args(tmp_path, "g1.yaml", only="nope"), [0], [], [])
    with pytest.raises(SystemExit, match="no configuration nope in"):  # a typo beside a good name is not ignored
        plan_grids(_args(tmp_path, "g1.yaml", "g3.yaml", only="mse,nope"), [0], [], [])


def test_a_run_with_the_settings_of_a_finished_one_reuses_it(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("train: {steps: 10}\n")
    out = tmp_path / "study"
    runner = Runner(base, out, resume=False, keep_weights=False, threads=1)
    done = Run("lam3-s0", "lam3", 0, ["align.method=let", "align.stop_step=3", "align.lambda0=3.0"])
    (out / done.name).mkdir(parents=True)
    (out / done.name / RUN_RECORD).write_text(json.dumps(runner.record(done)))
    (out / done.name / "results.json").write_text("{}")
    same = Run("stop1of3-s0", "stop1of3", 0, ["align.method=let", "align.lambda0=3.0", "align.stop_step=3"])
    other = Run("stop1of5-s0", "stop1of5", 0, ["align.method=let", "align.lambda0=3.0", "align.stop_step=2"])
    assert runner(same) is True  # same overrides in another order: no training process starts
    assert (out / same.name).is_symlink() and (out / same.name / "results.json").is_file()
    assert runner.state(same) == "done"
    assert runner.same_run(other) is None
    base.write_text("train: {steps: 11}\n")  # another base recipe is another run
    assert Runner(base, out, resume=False, keep_weights=False, threads=1).same_run(same) is None


def test_the_time_series_claim_row_reads_ts_uea_results(tmp_path: Path) -> None:
    from study_report import time_series_rows

    assert time_series_rows(tmp_path) == []
    gain = {"mean": 0.05, "std": 0.01}
    (tmp_path / "ts_uea_random_init.json").write_text(json.dumps({"settings": {"seeds": "0,1,2"}, "let_minus_baseline": {
        "GunPoint": {"llm_let@1": gain, "rand_let@1": gain}}}))
    row = time_series_rows(tmp_path)[0]
    assert "GunPoint pretrained: +5.00 ± 1.00 pts" in row and row.endswith("| 0,1,2 | holds |")
    (tmp_path / "ts_uea_random_init_ucr.json").write_text(json.dumps({"settings": {"seeds": "0,1,2"}, "let_minus_baseline": {
        "ItalyPowerDemand": {"llm_let@1": {"mean": -0.02, "std": 0.03}}}}))
    assert time_series_rows(tmp_path)[0].endswith("| holds weaker |")  # one cell loses: not every dataset gains


def test_a_run_another_study_holds_is_waited_for_not_trained_twice(tmp_path: Path) -> None:
    import fcntl
    import threading

    base = tmp_path / "base.yaml"
    base.write_text("train: {steps: 10}\n")
    out = tmp_path / "study"
    runner = Runner(base, out, resume=False, keep_weights=False, threads=1)
    run = Run("baseline-s0", "baseline", 0, ["align.method=none"])
    (out / ".locks").mkdir(parents=True)
    held = open(out / ".locks" / "baseline-s0.lock", "w")
    fcntl.flock(held, fcntl.LOCK_EX)  # as another study.py would while it trains the run
    result = []
    waiter = threading.Thread(target=lambda: result.append(runner(run)))
    waiter.start()
    waiter.join(timeout=1.0)
    assert waiter.is_alive()  # waiting, not training
    (out / run.name).mkdir()  # the other study.py finishes the run, then lets go
    (out / run.name / RUN_RECORD).write_text(json.dumps(runner.record(run)))
    (out / run.name / "results.json").write_text("{}")
    held.close()
    waiter.join(timeout=10)
    assert result == [True]  # reused, never started


def test_a_queued_copy_is_linked_as_soon_as_its_original_finishes(tmp_path: Path) -> None:
    import threading
    import time

    from study_runner import run_queue

    base = tmp_path / "base.yaml"
    base.write_text("train: {steps: 10}\n")
    out = tmp_path / "study"
    release, order = threading.Event(), []

    class Fake(Runner):  # "trains" by writing the run's files; the slow run waits for the test
        def _start_or_reuse(self, run: Run, keep_weights: bool) -> bool:
            if run.name == "lam3-s0":
                order.append("lam3 trained")
                (out / run.name).mkdir(parents=True)
                (out / run.name / RUN_RECORD).write_text(json.dumps(self.record(run)))
                (out / run.name / "results.json").write_text("{}")
                return True
            if run.name == "slow-s0":
                release.wait(timeout=10)
                order.append("slow trained")
                return True
            linked = super()._start_or_reuse(run, keep_weights)  # the copy: a link, no training
            order.append("copy linked")
            return linked

    lam3 = Run("lam3-s0", "lam3", 0, ["align.method=let", "align.lambda0=3.0"])
    copy = Run("f3-s0", "f3", 0, ["align.lambda0=3.0", "align.method=let"])
    slow = Run("slow-s0", "slow", 0, ["align.method=none"])
    result = {}
    queue = threading.Thread(target=lambda: result.update(run_queue(Fake(base, out, False, False, 1), [slow, lam3, copy], 2)))
    queue.start()
    for _ in range(100):  # the copy is linked while the slow run still trains
        if (out / "f3-s0").is_symlink():
            break
        time.sleep(0.05)
    assert (out / "f3-s0").is_symlink() and order == ["lam3 trained", "copy linked"]
    release.set()
    queue.join(timeout=10)
    assert result == {"slow-s0": True, "lam3-s0": True, "f3-s0": True}


def test_holdout_cuts_the_train_file_at_a_line_and_never_reads_eval(tmp_path: Path) -> None:
    train = tmp_path / "train.txt"
    lines = [f"line {i} " + "x" * (i % 7) for i in range(200)]
    train.write_text("\n".join(lines) + "\n")
    head, tail = split_holdout(train, 0.1, tmp_path / "holdout")
    assert head.read_text() + tail.read_text() == train.read_text()  # nothing lost, nothing shared
    assert head.read_text().endswith("\n") and 0.08 < tail.stat().st_size / train.stat().st_size < 0.12
    with pytest.raises(SystemExit, match="fraction"):
        split_holdout(train, 0.7, tmp_path / "holdout")


def test_saved_json_names_data_folders_by_placeholder_and_repo_paths_relatively(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(PATH_ALIASES, str(tmp_path / "wt2"), "WIKITEXT2_DIR")
    text = portable(f'{{"a": "{tmp_path}/wt2/valid.txt", "b": "{REPO}/benchmarks/results/x", "c": "{REPO}"}}')
    assert json.loads(text) == {"a": "WIKITEXT2_DIR/valid.txt", "b": "benchmarks/results/x", "c": "."}



def test_a_corpus_given_by_path_is_saved_under_its_name(tmp_path: Path) -> None:
    from study import data_overrides

    for name in ("train.txt", "eval.txt"):
        (tmp_path / name).write_text("text\n")
    args = argparse.Namespace(data=None, holdout=0.0, corpus=[str(tmp_path / "train.txt"), str(tmp_path / "eval.txt")],
                              corpus_name="kjv", base="b.yaml")
    before = dict(PATH_ALIASES)
    try:
        overrides, suffix = data_overrides(args, tmp_path / "out")
        assert suffix == "-kjv" and PATH_ALIASES[str(tmp_path.resolve())] == "KJV_DIR"
        assert portable(" ".join(overrides)).split()[1:] == ["task.text.train_path=KJV_DIR/train.txt",
                                                             "task.text.eval_path=KJV_DIR/eval.txt"]
    finally:
        PATH_ALIASES.clear()
        PATH_ALIASES.update(before)


def _teacher_args(**given: object) -> argparse.Namespace:
    args = {"teacher": "small", "teacher_steps": 300, "teacher_corpus": None, "teacher_corpus_name": None} | given
    return argparse.Namespace(**args)


def test_the_small_teachers_names_say_what_it_was_trained_on_and_how_long() -> None:
    from study import teacher_names

    assert teacher_names(_teacher_args()) == ("-small-teacher", "small_teacher")  # the existing studies' names
    assert teacher_names(_teacher_args(teacher="base")) == ("", "")
    assert teacher_names(_teacher_args(teacher_corpus=["k.txt"], teacher_corpus_name="kjv")) == (
        "-small-teacher-from-kjv", "small_teacher-kjv")
    assert teacher_names(_teacher_args(teacher_steps=100)) == ("-small-teacher-100steps", "small_teacher-100steps")
    assert teacher_names(_teacher_args(teacher_corpus=["k.txt", "w.txt"], teacher_corpus_name="kjv+wikitext2", teacher_steps=100)) == (
        "-small-teacher-from-kjv+wikitext2-100steps", "small_teacher-kjv+wikitext2-100steps")
    with pytest.raises(SystemExit, match="--teacher-corpus-name"):
        teacher_names(_teacher_args(teacher_corpus=["k.txt"]))
    with pytest.raises(SystemExit, match="--teacher small"):
        teacher_names(_teacher_args(teacher="base", teacher_corpus=["k.txt"], teacher_corpus_name="kjv"))


def test_the_small_teacher_pretrains_on_its_own_corpus_a_mix_through_a_folder_of_links(tmp_path: Path) -> None:
    from study import small_teacher, teacher_corpus

    kjv, wiki = tmp_path / "kjv" / "train.txt", tmp_path / "wt2" / "valid.txt"
    for path in (kjv, wiki):
        path.parent.mkdir()
        path.write_text("text\n")
    out = tmp_path / "study"
    assert teacher_corpus([str(kjv)], "kjv", out) == str(kjv)
    mixed = Path(teacher_corpus([str(kjv), str(wiki)], "mix", out))
    assert sorted((p.name, p.resolve()) for p in mixed.iterdir()) == [("0-train.txt", kjv), ("1-valid.txt", wiki)]
    assert teacher_corpus([str(kjv), str(wiki)], "mix", out) == str(mixed)  # the same files again: kept
    with pytest.raises(SystemExit, match="links other files"):
        teacher_corpus([str(wiki), str(kjv)], "mix", out)
    run, use = small_teacher(out, ["task.text.train_path=student.txt", "task.text.eval_path=eval.txt"], 100, "small_teacher-kjv", str(kjv))
    assert run.name == "small_teacher-kjv-s0" and "train.steps=100" in run.overrides
    assert f"task.text.train_path={kjv}" in run.overrides and "task.text.train_path=student.txt" not in run.overrides
    assert "task.text.eval_path=eval.txt" in run.overrides  # evaluated on the student's eval text
    assert f"teacher.name_or_path={out / run.name / 'final'}" in use


def test_a_finished_run_of_a_sibling_study_is_linked_not_trained(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text("train: {steps: 10}\n")
    results = tmp_path / "study"
    other = Runner(base, results / "wikitext2-small-teacher", resume=False, keep_weights=False, threads=1)
    baseline = Run("baseline-s0", "baseline", 0, ["align.method=none"])
    folder = other.out / baseline.name
    folder.mkdir(parents=True)
    (folder / RUN_RECORD).write_text(json.dumps(other.record(baseline)))
    (folder / "results.json").write_text("{}")
    runner = Runner(base, results / "wikitext2-small-teacher-from-kjv", resume=False, keep_weights=False, threads=1)
    runner.out.mkdir()
    assert runner(baseline) is True  # no training process starts
    link = runner.out / baseline.name
    assert link.is_symlink() and str(link.readlink()) == "../wikitext2-small-teacher/baseline-s0"
    assert runner.state(baseline) == "done"


def test_each_student_size_of_the_scale_grid_gets_its_own_baseline() -> None:
    from study import load_grid

    _, grid = load_grid("scale_trend")
    runs, baseline_of = plan(grid, [0], 150, [], [], [])
    assert baseline_of["s26m"] == "baseline"  # the base recipe's student: the other grids' baseline
    assert len(set(baseline_of.values())) == len(baseline_of) - 1  # every size and the long run: its own
    assert baseline_of["long-s26m-stop50"] == baseline_of["long-s26m"]  # the long run's two stops share one
    by_name = {r.name: r.overrides for r in runs}
    for config, baseline in baseline_of.items():
        arch = sorted(o for o in by_name[f"{config}-s0"] if o.startswith("student."))
        assert arch == sorted(o for o in by_name[f"{baseline}-s0"] if o.startswith("student."))
    assert "train.steps=600" in by_name["baseline@long-s26m-s0"] and "align.stop_step=200" in by_name["long-s26m-s0"]
    assert by_name["long-s26m-stop50-s0"][-1] == "align.stop_step=50"  # the config's stop, after the grid's common one
    # --only keeps each baseline's name: the long run's 600-step baseline never takes "baseline" (s26m's folder)
    runs, baseline_of = plan(grid, [0, 1], 150, [], ["long-s26m"], [])
    assert baseline_of == {"long-s26m": "baseline@long-s26m"}
    assert sorted(r.name for r in runs) == ["baseline@long-s26m-s0", "baseline@long-s26m-s1", "long-s26m-s0", "long-s26m-s1"]


def test_a_trend_claim_fits_the_sizes_the_runs_recorded() -> None:
    from study_results import claims

    sizes, speedups = {"small": 10_000_000, "large": 40_000_000}, {"small": (1.2, 1.3, 1.25), "large": (2.4, 2.6, 2.5)}
    result = {"teacher_pretrain": {"student_params": 5_000_000}, "runs": {}, "configs": {}}
    for name, params in sizes.items():
        result["configs"][name] = {"summary": {}, "verdict": "holds", "per_seed": {
            seed: {"speedup": s, "reached": True} for seed, s in enumerate(speedups[name])}}
        result["runs"] |= {f"{name}-s{seed}": {"student_params": params} for seed in range(3)}
    grid = {"configs": {"small": [], "large": []}, "claims": [{"claim": "grows", "kind": "trend"}]}
    claim, = claims(grid, result)
    assert claim["verdict"] == "grows" and claim["fit"]["slope"] == pytest.approx(0.5, abs=0.02)  # 2x speedup at 4x size
    assert [p["ratio"] for p in claim["points"]] == [2.0] * 3 + [8.0] * 3
    result["runs"]["large-s0"]["student_params"] = None  # a run from before the size was recorded: left out
    assert claims(grid, result)[0]["fit"]["points"] == 5
    assert claims(grid, result | {"teacher_pretrain": None})[0]["verdict"] == "no data"  # no small teacher run
    # a trend claim after another claim still sees the study's numbers
    grid["claims"].insert(0, {"claim": "large pays", "kind": "speedup", "config": "large"})
    assert [c["verdict"] for c in claims(grid, result)] == ["holds", "grows"]


def test_a_claim_against_a_configuration_the_study_did_not_run_is_left_out() -> None:
    from study_results import claims

    summary = {"speedup": {"mean": 1.8, "std": 0.05}, "reached": 3, "seeds": [0, 1, 2]}
    result = {"configs": {"late": {"summary": summary, "verdict": "holds"}}}
    grid = {"configs": {"early": [], "late": []}, "claims": [
        {"claim": "late beats early", "kind": "larger_than", "config": "late", "than": "early"},
        {"claim": "late pays", "kind": "speedup", "config": "late"}]}
    assert [c["claim"] for c in claims(grid, result)] == ["late pays"]  # e.g. --only late: nothing to compare with
    result["configs"]["early"] = {"summary": summary | {"speedup": {"mean": 1.3, "std": 0.01}}, "verdict": "holds"}
    assert [c["claim"] for c in claims(grid, result)] == ["late beats early", "late pays"]


@pytest.mark.parametrize("grid_name", sorted(p.stem for p in (REPO / "benchmarks" / "grids").glob("*.yaml") if p.stem != "ts_levers"))
def test_every_study_grid_plans_runs_whose_configs_validate(grid_name: str, tmp_path: Path, capsys) -> None:
    """Each grid of benchmarks/grids (ts_levers is ts_uea.py's: test_ts_uea_grid), with the small teacher's
    overrides and with the base recipe's teacher: every run's config loads (no models), so a typo in a
    grid stops here rather than an hour into a study."""
    from study import check_configs, load_grid, small_teacher

    train, evaluate = tmp_path / "train.txt", tmp_path / "eval.txt"
    for path in (train, evaluate):
        path.write_text("a few words of text\n")
    shared = ["task.text.source=files", f"task.text.train_path={train}", f"task.text.eval_path={evaluate}"]
    _, grid = load_grid(grid_name)
    pretrain, small = small_teacher(tmp_path, shared, 300)
    for teacher in ([], small):
        runs, _ = plan(grid, [0], 150, shared, [], teacher)
        check_configs(REPO / "benchmarks" / "study_base.yaml", [pretrain] + runs)
    assert "config error" not in capsys.readouterr().out
