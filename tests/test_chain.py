"""The build chain: tasks registered with their own config, `alignkit check` running the chain
of `train` on the meta device (every recipe, offline, fast; what train rejects, check rejects),
and the teacher pre-training stage (budget, early stopping, cache key, progress, extra teachers)."""
import json
import socket
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.core.config import ConfigError
from alignkit.experiment import load_experiment

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs").rglob("*.yaml"))
# recipes whose teacher another recipe trains first (checked in test_small_scale_recipes_run_as_a_pair)
AFTER_A_TEACHER_RUN = {REPO / "configs" / "small_scale" / name for name in ("let.yaml", "let_kd.yaml")}
# recipes of the [vision] extra where it is not installed (tests/test_vision.py checks them with it)
WITHOUT_THEIR_EXTRA = set() if find_spec("timm") else set((REPO / "configs" / "vision").glob("*.yaml"))
DEBUG = str(REPO / "configs" / "debug.yaml")
TS = str(REPO / "configs" / "ts" / "japanese_vowels.yaml")
TINY_TEACHER = ["teacher.options.d_model=8", "teacher.options.d_ff=8", "teacher.options.num_kernels=2",
                "teacher.options.e_layers=1"]
TINY_TS = ["student.preset=llama-tiny-ts", *TINY_TEACHER, "task.teacher_pretrain.micro_batch_size=8",
           "train.micro_batch_size=8", "train.eval_every=0", "align.early_layer=1"]


@pytest.fixture
def one_thread():
    """Small convolutions: threads only add contention on 2 cores (restored after the test, so
    later tests that compare against a spawned process keep the default)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- tasks and their config ----------------------------------------------------------------------


def test_each_task_types_its_own_config_section():
    from alignkit.tasks.text_pretrain import TextTaskConfig
    from alignkit.tasks.ts_classify import TSTaskConfig

    text, ts = load_experiment(DEBUG), load_experiment(TS)
    assert isinstance(text.task, TextTaskConfig) and text.task.seq_len == 32
    assert isinstance(ts.task, TSTaskConfig) and ts.task.uea.datasets == ["JapaneseVowels"]
    with pytest.raises(ConfigError, match=r"task\.uea.*task\.name=text_pretrain"):
        load_experiment(DEBUG, ["task.uea.seed=1"])  # a time-series key on a text task
    with pytest.raises(ConfigError, match=r"task\.seq_lenn"):
        load_experiment(DEBUG, ["task.seq_lenn=8"])
    with pytest.raises(ConfigError, match=r"task\.name='nope' is not a registered task \(known: .*text_pretrain, ts_classify"):
        load_experiment(DEBUG, ["task.name=nope"])
    with pytest.raises(ConfigError, match=r"task\.teacher_pretrain\.select_metric='eval_loss'"):
        load_experiment(TS, ["task.teacher_pretrain.select_metric=eval_loss"])


def test_a_task_reads_its_own_section_and_its_context_not_the_experiment(tmp_path):
    """The text task is built from its typed section and a TaskContext alone: the refusals
    across tokenizers come from the context's extra teachers and logit-KD origins."""
    from dataclasses import replace

    from alignkit.chain import task_context
    from alignkit.core.distributed import DistInfo
    from alignkit.tasks import TaskContext, build_task

    cfg = load_experiment(DEBUG, ["align.method=rkd"])
    assert task_context(cfg) == TaskContext(student=cfg.student, extra_teachers=(),
                                            logit_kd_origins=("align.method='rkd'",), eval_batch_size=4)
    other = replace(cfg.teacher, options=replace(cfg.teacher.options, tokenizer=str(_other_tokenizer(tmp_path / "tok"))))

    def describe(**context) -> list[str]:
        task = build_task(cfg.task, TaskContext(student=cfg.student, **context), dist=DistInfo(),
                          device=torch.device("meta"))
        assert not hasattr(task, "cfg") and task.section is cfg.task
        task.describe_data({"default": other})
        return task.notes

    assert describe() == []  # a teacher tokenizer of its own is LET-dagger, allowed
    with pytest.raises(ConfigError, match=r"^align\.terms\.3 \(logit KD\) needs teacher and student to share"):
        describe(logit_kd_origins=("align.terms.3",))
    with pytest.raises(ConfigError, match=r"^teachers: extra teachers need the student's tokenizer"):
        describe(extra_teachers=("aux",))


def test_check_loads_a_tokenizer_only_where_its_family_says_it_is_local(monkeypatch):
    """The ``hub_tokenizer`` capability: hf_causal names the hub id (not loaded offline, a note);
    a family that does not declare it is not loaded offline either, with a note saying why."""
    from dataclasses import replace

    from alignkit.adapters.hf_causal import hub_tokenizer
    from alignkit.core.distributed import DistInfo
    from alignkit.core.registry import ADAPTERS
    from alignkit.tasks import TaskContext, build_task

    paper = load_experiment(REPO / "configs" / "paper" / "llama-1.4b_smollm2-135m.yaml")
    assert hub_tokenizer(paper.teacher) == "HuggingFaceTB/SmolLM2-135M"
    assert hub_tokenizer(load_experiment(DEBUG).student) == ""  # pkg:...gguf
    assert hub_tokenizer(load_experiment(REPO / "configs" / "quickstart.yaml").teacher) == ""  # source=gguf
    monkeypatch.setattr(ADAPTERS, "_items", dict(ADAPTERS._items))
    ADAPTERS.register("hf_undeclared", replace(ADAPTERS.get("hf_causal", "kind"), hub_tokenizer=None))
    cfg = load_experiment(DEBUG)
    student = replace(cfg.student, kind="hf_undeclared")
    task = build_task(cfg.task, TaskContext(student=student), dist=DistInfo(), device=torch.device("meta"))
    assert task.describe_data({}).vocab_size is None
    assert task.notes == ["student tokenizer: student.kind='hf_undeclared' does not say whether it loads offline: "
                          "not loaded (vocabulary and tokenizer match unchecked)"]


# --- check: the chain on meta ----------------------------------------------------------------------


@pytest.mark.slow
def test_check_runs_the_chain_on_every_recipe_offline_in_under_a_minute(monkeypatch):
    from transformers import AutoModelForCausalLM

    from alignkit.check import check_experiment

    def refuse(*args, **kwargs):
        raise AssertionError("check reached for the network or for weights")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)  # a TS recipe read the LLM's weights
    start = time.perf_counter()
    reports = {recipe.stem: check_experiment(load_experiment(recipe)) for recipe in RECIPES
               if recipe not in AFTER_A_TEACHER_RUN | WITHOUT_THEIR_EXTRA}
    seconds = time.perf_counter() - start
    print(f"check on {len(reports)} recipes: {seconds:.1f} s")
    assert seconds < 60
    jv = reports["japanese_vowels"]  # sized from the local data's header: 9 classes, 12 channels
    assert jv["data"]["num_classes"] == 9 and jv["data"]["num_channels"] == 12 and jv["notes"] == []
    assert jv["teachers"]["default"]["width"] == 64 and jv["student_layers"] == 30
    assert any("not local" in note for note in reports["heartbeat"]["notes"])
    assert any("on the hub" in note for note in reports["llama-1.4b_smollm2-135m"]["notes"])
    assert reports["quickstart"]["data"]["vocab_size"] == 49152 and reports["quickstart"]["teacher_params"] == 134_515_008


def test_check_sizes_a_time_series_student_from_the_data(capsys):
    student = ["student.preset=llama-tiny-ts", *TINY_TEACHER]
    assert main(["check", TS, *student, "student.options.num_classes=9", "student.options.num_channels=12"]) == 0
    assert main(["check", TS, *student, "student.options.num_classes=5"]) == 2
    assert "options.num_classes=5 but the data has 9" in capsys.readouterr().err


def test_check_reports_the_terms_as_written_and_says_what_it_does_not_estimate(capsys):
    """A recipe with align.terms is reported by its terms (not the preset's defaults); the table
    goes to the terminal, JSON only with --json; a family without a memory model says so."""
    # debug.yaml's align.stop_step / early_layer back to their defaults: they belong to the presets
    terms = ["align.terms=[{type: feature, early_layer: 2, stop_step: 6, lambda0: 0.3}]", "align.early_layer=null",
             "align.stop_step=200"]
    assert main(["check", DEBUG, *terms]) == 0
    out = capsys.readouterr().out
    assert "align.terms.0: feature on teacher default, lambda0 0.3, linear_decay, stop_step 6" in out
    assert "1 process)" in out and "1 processes" not in out and not out.lstrip().startswith("{")
    assert main(["check", DEBUG, *terms, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(t["origin"], t["stop_step"], t["lambda0"]) for t in report["terms"]] == [("align.terms.0", 6, 0.3)]
    assert main(["check", TS, "student.preset=llama-tiny-ts", *TINY_TEACHER, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory"] == "not estimated for hf_ts_classifier students"


def test_a_typo_in_the_architecture_is_one_error_naming_the_nearest_key():
    with pytest.raises(ConfigError, match=r"^student\.options\.arch\.hiden_size: .*did you mean 'hidden_size'\?$"):
        load_experiment(DEBUG, ["student.options.arch.hiden_size=128"])
    load_experiment(DEBUG, ["student.options.arch.rope_theta=10000.0"])  # a legacy key the config class folds in


def _other_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["a small corpus for a small tokenizer"] * 4,
                                  trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("overrides, named", [
    (["align.projection=none"], "projection"),  # student width 64, teacher 48
    (["align.early_layer=9"], "layer"),  # the student has 4 layers
    (["align.pairs=[{teacher_layer: 5, student_layer: 1}]"], "teacher_layer"),  # the teacher has 2
    (["align.strategy=X2Y"], "align.strategy"),
    (["align.method=rkd", "teacher.options.tokenizer=OTHER"], "share a tokenizer"),
    (["task.seq_len=4096"], "task.seq_len"),  # beyond max_position_embeddings
], ids=["projection-none", "early-layer", "teacher-layer", "strategy", "kd-tokenizers", "seq-len"])
def test_check_rejects_what_train_rejects(tmp_path, capsys, overrides, named):
    overrides = [o.replace("OTHER", str(_other_tokenizer(tmp_path / "tok"))) for o in overrides]
    assert main(["check", DEBUG, *overrides]) == 2
    assert named in capsys.readouterr().err


# --- the teacher pre-training stage ---------------------------------------------------------------


def test_teacher_cache_is_keyed_on_what_changes_the_teacher():
    from alignkit.teacher_stage import teacher_cache_dir, teacher_run_config

    def folder(*overrides: str) -> Path:
        cfg = load_experiment(TS, list(overrides))
        return teacher_cache_dir(teacher_run_config(cfg, cfg.teacher))

    base = folder()
    for no_effect in ("task.teacher_pretrain.device=cpu", "task.teacher_pretrain.log_every=5",
                      "task.teacher_pretrain.save_every=7", "task.uea.download=false", "task.uea.extract_path=/x",
                      "train.lr=0.5", "align.lambda0=0.5", "teacher.preset=timesnet"):
        assert folder(no_effect) == base, no_effect
    for effect in ("task.teacher_pretrain.seed=1", "task.teacher_pretrain.lr=0.01", "task.teacher_pretrain.epochs=3",
                   "teacher.options.d_model=16", "task.uea.val_fraction=0.3", "task.teacher_datasets=[BasicMotions]"):
        assert folder(effect) != base, effect
    # with steps given, the epoch budget does nothing
    assert folder("task.teacher_pretrain.steps=5") == folder("task.teacher_pretrain.steps=5", "task.teacher_pretrain.epochs=3")


@pytest.mark.slow
def test_pretrain_teacher_stage_on_a_univariate_set_budgets_epochs_and_stops_early(tmp_path, capsys, one_thread):
    """UnitTest (shipped by aeon, 1 channel): `alignkit pretrain-teacher` announces its budget,
    stops once the validation accuracy stops improving, shows no progress bar under
    --no-progress, and `train` then reuses the cached teacher for a univariate LET run."""
    overrides = [f"output_dir={tmp_path}", "task.uea.datasets=[UnitTest]", *TINY_TS, "task.teacher_pretrain.epochs=40",
                 "task.teacher_pretrain.eval_every=1", "task.teacher_pretrain.patience=3", "task.teacher_pretrain.lr=0.01"]
    assert main(["pretrain-teacher", TS, *overrides, "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "up to 40 epochs = 80 steps of 8" in out  # 16 training series after the validation carve-out
    assert "stopping early after 3 evals" in out and "no better val_accuracy in 3 evals" in out
    assert "it/s" not in err and "%|" not in err  # --no-progress reaches the stage's trainer
    assert "teacher's test accuracy" in out and "\nteacher: " in out  # labelled as the teacher's, not a student's
    cache = next((tmp_path / "teachers").glob("timesnet-UnitTest-*"))
    steps = [r["step"] for r in rows(cache) if "ce" in r]
    assert 3 <= steps[-1] < 80 and (cache / "final" / "timesnet.json").is_file()
    evals = [r["val_accuracy"] for r in rows(cache) if "val_accuracy" in r]
    assert evals.index(max(evals)) == len(evals) - 4  # the best, then three evals without a better one
    assert json.loads((cache / "final" / "timesnet.json").read_text())["num_channels"] == 1
    assert main(["train", TS, *overrides, "run_name=uni", "train.steps=2", "align.stop_step=1", "--no-progress"]) == 0
    assert "reusing the pre-trained timesnet teacher" in capsys.readouterr().out
    assert "cos/t-1-s1" in rows(tmp_path / "uni")[0]


@pytest.mark.slow
def test_pairs_may_name_an_extra_time_series_teacher(tmp_path, one_thread):
    extra = ["teachers.small.preset=timesnet", "teachers.small.options.d_model=4", "teachers.small.options.d_ff=4",
             "teachers.small.options.num_kernels=1", "teachers.small.options.e_layers=1"]
    pairs = "align.pairs=[{teacher_layer: -1, student_layer: 1}, {teacher_layer: -1, student_layer: 2, teacher: small}]"
    assert main(["train", TS, f"output_dir={tmp_path}", "run_name=two", "task.uea.datasets=[BasicMotions]", *TINY_TS,
                 *extra, pairs, "task.teacher_pretrain.steps=2", "train.steps=2", "align.stop_step=2", "--no-progress"]) == 0
    first = rows(tmp_path / "two")[0]
    assert len([k for k in first if k.startswith("cos/")]) == 2
    assert len(list((tmp_path / "teachers").glob("timesnet-BasicMotions-*/final"))) == 2  # each teacher pre-trained


@pytest.mark.slow
def test_small_scale_recipes_run_as_a_pair(tmp_path):
    """configs/small_scale: the teacher recipe's run is the LET recipe's teacher (both cut to a
    few steps on the built-in corpus); check and train accept the pair."""
    from alignkit.check import check_experiment

    small = ["task.preset=builtin", "task.seq_len=32", "task.text.max_train_docs=20", "task.text.eval_batches=1",
             "train.micro_batch_size=2", f"output_dir={tmp_path}", "--no-progress"]
    teacher = REPO / "configs" / "small_scale" / "teacher.yaml"
    assert main(["train", str(teacher), "train.steps=2", "train.eval_every=2", "train.save_every=2", *small]) == 0
    final = tmp_path / "small-scale-teacher" / "final"
    let = ["align.stop_step=2", "train.steps=3", "train.eval_every=3", "train.save_every=3", f"teacher.name_or_path={final}"]
    report = check_experiment(load_experiment(REPO / "configs" / "small_scale" / "let.yaml", let + small[:-2]))
    assert report["teachers"]["default"]["width"] == 96
    assert main(["train", str(REPO / "configs" / "small_scale" / "let.yaml"), *let, "run_name=let", *small]) == 0
    rows = [json.loads(line) for line in (tmp_path / "let" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["teacher_active"] and rows[0]["lambda"] == 3.0 and "align_loss" in rows[0]
    kd = ["align.terms.0.stop_step=2", *let[1:], "run_name=let_kd"]  # the KD term stays to the end
    assert main(["train", str(REPO / "configs" / "small_scale" / "let_kd.yaml"), *kd, *small]) == 0
    rows = [json.loads(line) for line in (tmp_path / "let_kd" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["teacher_active"] and rows[0]["kd"] > 0 and rows[0]["align_loss"] > rows[0]["kd"] * 0.3
