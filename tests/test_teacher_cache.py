"""The teacher-feature cache (``align.teacher_cache``) on the debug recipe: a replay gives the
live run's losses (exactly with a float32 cache, within a stated tolerance with bf16) without
running the teacher, or building it when its weights come from files; changed batches miss and
run the teacher; an interrupted recording is used as far as it went; resume works with it."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import alignkit.chain as chain
import alignkit.core.teacher_cache as teacher_cache
from alignkit.cli import main
from alignkit.core.config import AlignConfig, ConfigError, ModelConfig, TermConfig
from alignkit.core.teacher import FrozenTeacher
from alignkit.core.terms import expand_terms
from alignkit.core.trainer import to_device
from toys import ToyTeacher

REPO = Path(__file__).resolve().parents[1]
DEBUG = str(REPO / "configs" / "debug.yaml")
VOLATILE = ("tokens_per_s", "peak_mem_mb", "teacher_s")
SHORT = ["train.steps=4", "train.eval_every=0"]  # the teacher is active in all 4 steps (align.stop_step=4)


def train(tmp: Path, name: str, *overrides: str, resume: bool = False) -> int:
    args = ["train", DEBUG, f"output_dir={tmp}", f"run_name={name}", *SHORT, *overrides, "--no-progress"]
    return main(args + (["--resume", str(tmp / name)] if resume else []))


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]


class Counter:
    """Counts the real teacher's forwards (and can make the n-th fail, as a crash would)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int = 0) -> None:
        self.calls, self.fail_at, original = 0, fail_at, FrozenTeacher.run

        def run(teacher, *args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("the machine went away")
            return original(teacher, *args, **kwargs)

        monkeypatch.setattr(FrozenTeacher, "run", run)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A live run, and the same run recording a float32 cache."""
    tmp = tmp_path_factory.mktemp("cache")
    assert train(tmp, "live") == 0
    assert train(tmp, "record", f"align.teacher_cache={tmp / 'fp32'}", "align.teacher_cache_dtype=float32") == 0
    return tmp


def test_float32_replay_equals_the_live_run_and_never_runs_the_teacher(recorded, monkeypatch, capsys):
    live = metrics(recorded / "live")
    assert metrics(recorded / "record") == live  # recording returns the teacher's own outputs
    counter = Counter(monkeypatch)
    assert train(recorded, "replay", f"align.teacher_cache={recorded / 'fp32'}", "align.teacher_cache_dtype=float32") == 0
    assert counter.calls == 0 and metrics(recorded / "replay") == live
    assert "replayed 4 of 4 batches" in capsys.readouterr().err


def test_changed_batches_miss_and_run_the_teacher(recorded, monkeypatch, capsys):
    counter = Counter(monkeypatch)
    changed = ["train.micro_batch_size=2", f"align.teacher_cache={recorded / 'fp32'}", "align.teacher_cache_dtype=float32"]
    assert train(recorded, "changed", *changed) == 0
    err = capsys.readouterr().err
    assert counter.calls == 4 and "a batch is not cached" in err and "replayed 0 of 4 batches" in err
    # what a miss returns is the teacher's own output: the recording run in `recorded` equals the live one


@pytest.mark.slow
def test_an_interrupted_recording_is_used_and_resume_replays(recorded, monkeypatch, capsys):
    """The teacher dies at step 3 (after the step-2 checkpoint): the two batches it recorded are
    replayed by the next run (a damaged shard is skipped), which records the rest; the resumed
    first run then replays all."""
    monkeypatch.setattr(teacher_cache, "SHARD_CALLS", 1)
    cache = [f"align.teacher_cache={recorded / 'partial'}", "align.teacher_cache_dtype=float32", "train.save_every=2"]
    Counter(monkeypatch, fail_at=3)
    with pytest.raises(RuntimeError, match="went away"):
        train(recorded, "cut", *cache)
    shards = list((recorded / "partial").glob("*/shard-*.safetensors"))
    assert len(shards) == 2
    (shards[0].parent / "shard-damaged.safetensors").write_bytes(b"not a shard")  # skipped with a warning
    counter = Counter(monkeypatch)
    with pytest.warns(UserWarning, match="skipping unreadable"):
        assert train(recorded, "after-cut", *cache) == 0
    (shards[0].parent / "shard-damaged.safetensors").unlink()
    assert counter.calls == 2 and "replayed 2 of 4 batches" in capsys.readouterr().err
    counter = Counter(monkeypatch)
    assert train(recorded, "cut", *cache, resume=True) == 0
    assert counter.calls == 0
    live = metrics(recorded / "live")
    assert metrics(recorded / "after-cut") == live and metrics(recorded / "cut") == live


@pytest.mark.slow
def test_bf16_replay_of_a_teacher_from_files_never_builds_it(recorded, monkeypatch, capsys):
    """A teacher with weight files is keyed on their identity: the replay neither reads nor
    builds it. bf16 features move the losses by less than 1e-3 (relative) on this run."""
    teacher = ["teacher.source=checkpoint", f"teacher.name_or_path={recorded / 'live' / 'final'}",
               f"align.teacher_cache={recorded / 'bf16'}"]
    assert train(recorded, "files-live", *teacher) == 0
    built, build = [], chain.build_teacher
    monkeypatch.setattr(chain, "build_teacher", lambda *a, **k: built.append(1) or build(*a, **k))
    counter = Counter(monkeypatch)
    assert train(recorded, "files-replay", *teacher) == 0
    assert built == [] and counter.calls == 0
    live, replay = metrics(recorded / "files-live"), metrics(recorded / "files-replay")
    assert [sorted(r) for r in live] == [sorted(r) for r in replay]
    for a, b in zip(live, replay):
        for key in ("loss", "nll", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3)
    assert live[0]["cos/t-1-s2"] != replay[0]["cos/t-1-s2"]  # bf16 did round the features
    shard = next((recorded / "bf16").glob("*/shard-*.safetensors"))

    with safe_open(str(shard), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_cache_settings_go_with_terms_and_refuse_a_sharded_teacher(tmp_path):
    assert expand_terms(AlignConfig(terms=[TermConfig()], teacher_cache=str(tmp_path)))
    sharded = {"default": ModelConfig(options={"shard": True})}
    with pytest.raises(ConfigError, match="teacher.options.shard"):
        chain.build_teachers(sharded, device=torch.device("cpu"), data=None, align=AlignConfig(teacher_cache=str(tmp_path)))


@pytest.mark.slow
def test_time_series_rkd_replays_per_sample_logits(tmp_path, monkeypatch):
    """A pre-trained TimesNet teacher's class logits: the replay equals the recording run."""
    pytest.importorskip("aeon")
    from test_ts_e2e import RECIPE, TINY

    torch.set_num_threads(1)
    overrides = [*TINY, "task.teacher_pretrain.steps=4", "train.steps=3", "train.eval_every=3", "align.method=rkd",
                 f"align.teacher_cache={tmp_path / 'cache'}", "align.teacher_cache_dtype=float32", "--no-progress"]
    for name in ("record", "replay"):
        counter = Counter(monkeypatch)
        assert main(["train", RECIPE, f"output_dir={tmp_path}", f"run_name={name}", *overrides]) == 0
    assert counter.calls == 0 and metrics(tmp_path / "replay") == metrics(tmp_path / "record")
    assert all(row["kd"] > 0 for row in metrics(tmp_path / "replay") if "ce" in row)


def toy_cache(tmp_path: Path, device: str) -> teacher_cache.CachedTeacher:
    weights = tmp_path / "weights.bin"  # keyed on the file's identity: the toy teacher has no .model to hash
    if not weights.exists():  # its identity keys the folder: reopening finds the same cache
        weights.write_bytes(b"toy")
    return teacher_cache.open_cached_teacher(tmp_path / "cache", config={"kind": "toy"}, weight_files=[weights],
                                             build=ToyTeacher, dtype="float32", device=torch.device(device), label="toy")


BATCH = {"input_ids": torch.arange(12).reshape(2, 6), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
KEY = "5444b248db3dbd46e9a732e3dd17a7f9"  # BATCH's key before keys came from the host copy: old caches hit


def test_the_key_comes_from_the_host_copy_and_a_host_replay_copies_nothing(tmp_path):
    """A batch moved to the device is hashed from the host copy the trainer keeps (here the device
    is meta: its tensors cannot be read back), to the key a host batch always had; a replay on
    the host gives the stored tensor itself."""
    cached = toy_cache(tmp_path, "cpu")
    live, _ = cached.run(BATCH, [1])
    replayed, _ = cached.run(to_device(BATCH, torch.device("meta")), [1])
    again, _ = cached.run(BATCH, [1])
    assert (cached.calls, cached.replayed) == (1, 2)
    assert torch.equal(replayed[1], live[1]) and replayed[1].data_ptr() == again[1].data_ptr()
    cached.release()
    with safe_open(str(next(cached.folder.glob("shard-*.safetensors"))), framework="pt") as shard:
        assert list(shard.keys()) == [f"{KEY}/1"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_gpu_replay_equals_the_recording(tmp_path):
    cached = toy_cache(tmp_path, "cuda")
    live, _ = cached.run(BATCH, [1, 2])  # the toy teacher runs on the host
    replayed, _ = cached.run(to_device(BATCH, torch.device("cuda")), [1, 2])
    assert cached.replayed == 1 and all(replayed[k].is_cuda and torch.equal(replayed[k].cpu(), live[k]) for k in (1, 2))


def recorded_toy(tmp_path: Path, batches: int = 6) -> tuple[list[dict], list[dict[int, torch.Tensor]]]:
    """A toy cache recorded one batch per shard; the batches and the teacher's live outputs."""
    cached = toy_cache(tmp_path, "cpu")
    inputs = [{"input_ids": torch.arange(12).reshape(2, 6) + k, "attention_mask": torch.ones(2, 6, dtype=torch.long)}
              for k in range(batches)]
    live = []
    for batch in inputs:
        live.append(cached.run(batch, [1, 2])[0])
        cached._shards.flush()
    cached.release()
    return inputs, live


def test_a_changed_cache_shard_falls_back_to_the_teacher_with_a_warning(tmp_path):
    inputs, live = recorded_toy(tmp_path)
    shards = sorted((tmp_path / "cache").glob("*/shard-*.safetensors"))
    raw = bytearray(shards[2].read_bytes())
    raw[-5] ^= 0x80  # a sign bit of a stored feature: still a readable shard
    shards[2].write_bytes(bytes(raw))
    cached = toy_cache(tmp_path, "cpu")
    with pytest.warns(UserWarning, match=f"skipping {shards[2]}: it fails its checksum"):
        replayed = [cached.run(batch, [1, 2])[0] for batch in inputs]
    assert (cached.calls, cached.replayed) == (1, len(inputs) - 1)
    assert all(torch.equal(r[k], w[k]) for r, w in zip(replayed, live) for k in (1, 2))


def test_a_damaged_cache_manifest_is_rebuilt_with_a_warning(tmp_path):
    inputs, live = recorded_toy(tmp_path, batches=2)
    manifest = next((tmp_path / "cache").glob(f"*/{teacher_cache.MANIFEST}"))
    layers = ToyTeacher().num_layers
    text = manifest.read_text()
    assert f'"num_layers": {layers},' in text
    for damage in (text[:40], text.replace(f'"num_layers": {layers},', f'"num_layers": {layers + 1},')):
        manifest.write_text(damage)
        with pytest.warns(UserWarning, match=f"{manifest} is damaged"):
            cached = toy_cache(tmp_path, "cpu")
        assert cached.num_layers == layers
        assert all(torch.equal(cached.run(b, [1, 2])[0][1], w[1]) for b, w in zip(inputs, live))
        assert cached.calls == 0  # the shards are still used
