"""Run folders through the CLI: a finished run stays as it is, a resume refuses changes that
break exactness and records the safe ones, a run killed before its first checkpoint can be
resumed, bad folders and busy folders give one-line errors, run names cannot escape."""
import json
import os

import pytest

from alignkit.cli import main
from alignkit.core.folder_lock import FolderLock
from alignkit.experiment import load_experiment
from test_text_e2e import DEBUG, train


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith("alignkit: error: ") and "\n" not in err, err
    return err


@pytest.mark.slow
def test_resume_checks_and_records_config_changes(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(tmp_path, "run", "train.steps=4", "train.save_every=2") == 0
    config, results = (run / "config.yaml").read_text(), (run / "results.json").read_text()
    capsys.readouterr()

    assert main(["train", "--resume", str(run)]) == 0  # finished: says so, rewrites nothing
    assert "is finished" in capsys.readouterr().err
    assert (run / "results.json").read_text() == results

    assert main(["train", DEBUG, "--resume", str(run), "train.steps=6", "align.lambda0=0.5", "train.micro_batch_size=2"]) == 2
    err = one_line_error(capsys)
    assert "align.lambda0: 0.1 -> 0.5" in err and "train.micro_batch_size: 4 -> 2" in err
    assert (run / "config.yaml").read_text() == config and not (run / "resumes.jsonl").exists()

    assert main(["train", "--resume", str(run), "train.steps=6", "train.eval_every=3", "--no-progress"]) == 0
    assert (run / "config.yaml").read_text() == config  # the original stays; the resume is recorded
    record = json.loads((run / "resumes.jsonl").read_text())
    assert record["from_step"] == 4 and record["changes"] == {"train.eval_every": [4, 3], "train.steps": [4, 6]}
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4, 5, 6, 6]  # evals at 4 (old cadence) and 6 (the end)


def test_a_run_killed_before_its_first_checkpoint_can_be_resumed(tmp_path, capsys):
    run = tmp_path / "early"
    run.mkdir()
    cfg = load_experiment(DEBUG, [f"output_dir={tmp_path}", "run_name=early", "train.steps=4"])
    from alignkit.experiment import save_resolved

    save_resolved(cfg, run)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # died mid-line
    assert train(tmp_path, "early", "train.steps=4") == 2
    assert "--resume starts it over" in one_line_error(capsys)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert "starting the run over" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 4]


def test_busy_unwritable_and_escaping_run_folders_are_refused(tmp_path, capsys):
    with FolderLock(tmp_path / "busy"):
        assert train(tmp_path, "busy") == 2
    assert f"in use by pid {os.getpid()}" in one_line_error(capsys)

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", DEBUG, f"output_dir={blocker}", "run_name=x"]) == 2
    assert "cannot use run folder" in one_line_error(capsys)

    for name in ("../../x", "/tmp/abs", "${oc.env:HOME}"):
        assert train(tmp_path, name) == 2
        assert "must be a single folder name" in one_line_error(capsys)
    for name in ('"two\\nlines"', '"   "', '" padded"'):  # YAML double quotes: \n is a line break
        assert train(tmp_path, name) == 2
        assert "must be printable, without line breaks" in one_line_error(capsys)


def test_a_symlinked_run_folder_is_refused(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "x").symlink_to(elsewhere)
    assert train(tmp_path / "runs", "x") == 2
    assert "a run folder must be a plain folder inside output_dir" in one_line_error(capsys)
    assert not list(elsewhere.iterdir())


def test_refused_and_failed_starts_leave_nothing_behind(tmp_path, capsys, monkeypatch):
    """--resume with a recipe of a folder that is not a run writes nothing there; a new run
    that fails before its first step leaves no folder, so the same command can run again."""
    plain = tmp_path / "plain"
    plain.mkdir()
    assert main(["train", DEBUG, "--resume", str(plain), "--no-progress"]) == 2
    assert "is it a run folder?" in one_line_error(capsys)
    assert not list(plain.iterdir())

    import alignkit.train
    from alignkit.core.errors import DataError

    def broken(*args, **kwargs):
        raise DataError("injected: the data cannot be read")

    monkeypatch.setattr(alignkit.train, "build_trainer", broken)
    assert train(tmp_path, "failed") == 2
    assert "injected" in one_line_error(capsys)
    assert not (tmp_path / "failed").exists()


@pytest.mark.parametrize("overrides, message", [
    (["align.lambda0=-1"], "align.lambda0=-1.0: must be > 0"),
    (["align.lambda0=nan", "train.log_every=0", "train.save_every=-2", "train.select_metric=val_acc"], "4 config problems"),
    (["train.betas.2=0.5"], "train.betas has 2 item(s)"),
    (["task.text.source=tokens", "task.text.train_path=GARBAGE"], "not a readable token shard"),
    (["train.log_every=${nosuch.key}"], "config key 'train.log_every': Interpolation key 'nosuch.key' not found"),
    (["train.log_every=${nosuch:x}"], "config key 'train.log_every': Unsupported interpolation type nosuch"),
    (["train.steps=100000000000000000000000000000"], "train.steps=100000000000000000000000000000: must be <= 1000000000000"),
])
def test_values_are_checked_at_load_time(tmp_path, capsys, overrides, message):
    garbage = tmp_path / "tokens.npy"
    garbage.write_bytes(b"not numpy at all")
    overrides = [o.replace("GARBAGE", str(garbage)) for o in overrides]
    assert train(tmp_path, "bad", *overrides) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err, err


def test_indexed_overrides_set_list_items():
    cfg = load_experiment(DEBUG, ["train.betas.0=0.8", "align.pairs=[{teacher_layer: 1, student_layer: 1}]",
                                  "align.pairs.0.teacher_layer=-1"])
    assert cfg.train.betas == (0.8, 0.999) and cfg.align.pairs[0].teacher_layer == -1


def test_preset_path_cannot_shadow_a_shipped_preset(tmp_path, monkeypatch):
    (tmp_path / "llama-tiny.yaml").write_text("kind: hf_causal\noptions: {trust_remote_code: true}\n")
    (tmp_path / "my-model.yaml").write_text("kind: hf_causal\nsource: config\noptions: {arch: {model_type: llama}}\n")
    monkeypatch.setenv("ALIGNKIT_PRESET_PATH", str(tmp_path))
    cfg = load_experiment(DEBUG, [])
    assert not cfg.student.options.trust_remote_code  # the shipped llama-tiny wins
    assert load_experiment(DEBUG, ["teacher.preset=my-model"]).teacher.options.arch["model_type"] == "llama"


def test_trust_remote_code_is_announced(tmp_path):
    from alignkit.core.registry import build_student

    cfg = load_experiment(DEBUG, ["student.options.trust_remote_code=true"])
    with pytest.warns(UserWarning, match="options.trust_remote_code=true: Python code shipped with"):
        build_student(cfg.student, device="meta")
