"""`alignkit prepare`: token shards from a Pile-format .jsonl.zst match direct tokenization, an
interrupted preparation continues to the same files, bad lines are reported and skipped, and
training from the shards is the same run as training from the text."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from alignkit.cli import main
from alignkit.core.errors import DataError, RunDirError
from alignkit.tasks import token_manifest, token_shards
from alignkit.tasks.text_data import TextDataConfig, build_text_data, is_heldout
from alignkit.tasks.token_shards import prepare
from test_text_data import WORDS, bpe_tokenizer, ids_of, make_docs, word_tokenizer, wordpiece_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEBUG = str(REPO / "configs" / "debug.yaml")


def write_pile(path: Path, docs: list[str], bad: dict[int, bytes] | None = None) -> Path:
    """The Pile's format: one JSON object per line with `text` and `meta.pile_set_name`;
    ``bad`` replaces the given lines with raw bytes."""
    lines = [json.dumps({"text": d, "meta": {"pile_set_name": "Pile-CC"}}).encode() for d in docs]
    for i, raw in (bad or {}).items():
        lines[i] = raw
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    return path


def shard_tokens(out: Path, split: str) -> list[int]:
    files = sorted(out.glob(f"{split}_*.npy"))
    return np.concatenate([np.load(f) for f in files]).tolist() if files else []


def test_prepare_matches_direct_tokenization_and_reads_back(tmp_path):
    tok = word_tokenizer()
    eos = tok.token_to_id("<eos>")
    docs = make_docs(120)
    cfg = TextDataConfig(source="files", train_path=str(write_pile(tmp_path / "00.jsonl.zst", docs)), eval_fraction=0.1)
    manifest = prepare(cfg, tok, tmp_path / "tok", shard_tokens=50, progress=False, tokenizer_name="words")
    want = {False: [], True: []}
    for d in docs:
        want[is_heldout(d, 0.1)] += ids_of(tok, d) + [eos]
    assert want[True] and shard_tokens(tmp_path / "tok", "train") == want[False]
    assert shard_tokens(tmp_path / "tok", "eval") == want[True]
    splits = manifest["splits"]
    assert splits["train"]["tokens"] == len(want[False]) and splits["train"]["shards"] == -(-len(want[False]) // 50)
    assert splits["train"]["documents"] + splits["eval"]["documents"] == 120
    on_disk = json.loads((tmp_path / "tok" / "manifest.json").read_text())
    assert on_disk["settings"]["dtype"] == "uint16" and on_disk["settings"]["tokenizer"]["name"] == "words"
    assert not (tmp_path / "tok" / "progress.json").exists()

    # source=tokens with the prepared dir: the same stream, its own eval split, tokenizer checked
    tokens = TextDataConfig(source="tokens", train_path=str(tmp_path / "tok"), eval_batches=100)
    data = build_text_data(tokens, tok, seq_len=7)
    assert np.concatenate([data.train_sequence(i) for i in range(data.num_train_sequences)]).tolist() == want[False][: data.num_train_sequences * 7]
    assert [t for b in data.eval_batches(1) for t in b["input_ids"][0].tolist()] == want[True][: len(want[True]) // 7 * 7]
    other = word_tokenizer()
    other.add_tokens(["extra"])
    with pytest.raises(ValueError, match=r"prepared with student tokenizer words .*run alignkit prepare again"):
        build_text_data(tokens, other, seq_len=7)
    # a second run of a finished preparation changes nothing; other settings are refused
    assert prepare(cfg, tok, tmp_path / "tok", shard_tokens=50, progress=False, tokenizer_name="words") == manifest
    with pytest.raises(RunDirError, match="other settings"):
        prepare(cfg, tok, tmp_path / "tok", shard_tokens=60, progress=False, tokenizer_name="words")


@pytest.mark.parametrize("mismatch", [False, True], ids=["same-tokenizer", "let-dagger"])
def test_interrupted_prepare_continues_to_the_same_result(tmp_path, monkeypatch, mismatch):
    tok = word_tokenizer()
    docs = make_docs(200) * 3
    teacher = {"teacher_tokenizer": wordpiece_tokenizer(docs[:50], vocab_size=150), "seq_len": 10} if mismatch else {}
    path = write_pile(tmp_path / "00.jsonl.zst", docs)
    cfg = TextDataConfig(source="files", train_path=str(path), eval_fraction=0.1)
    monkeypatch.setattr(token_shards, "_ENCODE_CHUNK_DOCS", 40)  # many checkpoints
    prepare(cfg, tok, tmp_path / "full", shard_tokens=64, progress=False, **teacher)

    write = token_shards._ShardWriter._write
    calls = {"n": 0}

    def dying_write(self, ids):
        calls["n"] += 1
        if calls["n"] == 9 * (3 if mismatch else 1):  # mid-chunk: shards after the last checkpoint exist
            raise KeyboardInterrupt
        write(self, ids)

    monkeypatch.setattr(token_shards._ShardWriter, "_write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tok, tmp_path / "cut", shard_tokens=64, progress=False, **teacher)
    progress = json.loads((tmp_path / "cut" / "progress.json").read_text())
    assert 0 < progress["docs"] < 600 and not (tmp_path / "cut" / "manifest.json").exists()
    monkeypatch.setattr(token_shards._ShardWriter, "_write", write)
    prepare(cfg, tok, tmp_path / "cut", shard_tokens=64, progress=False, **teacher)
    full = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert len(full) > 10 and sorted(p.name for p in (tmp_path / "cut").iterdir()) == full
    for name in full:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    # the worker pool gives the same files
    prepare(cfg, tok, tmp_path / "pool", shard_tokens=64, progress=False, workers=2, **teacher)
    for name in full:
        assert (tmp_path / "pool" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def test_let_dagger_shards_serve_the_teacher_fields_of_the_text_path(tmp_path):
    words = "the quick brown fox jumps over lazy dog pack my box with five dozen liquor jugs sphinx vow".split()
    rng = random.Random(1)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(80)]
    student, teacher = bpe_tokenizer(texts, vocab_size=300), wordpiece_tokenizer(texts, vocab_size=120)
    cfg = TextDataConfig(source="files", train_path=str(write_pile(tmp_path / "00.jsonl.zst", texts)), eval_fraction=0.2)
    manifest = prepare(cfg, student, tmp_path / "tok", teacher_tokenizer=teacher, seq_len=12, progress=False)
    assert manifest["settings"]["teacher"]["teacher_seq_len"] == 18
    tokens = TextDataConfig(source="tokens", train_path=str(tmp_path / "tok"))
    text_data = build_text_data(cfg, student, seq_len=12, teacher_tokenizer=teacher)
    token_data = build_text_data(tokens, student, seq_len=12, teacher_tokenizer=teacher)
    assert token_data.aligns_teacher and token_data.num_train_sequences == text_data.num_train_sequences
    a, b = text_data.train_batches(3), token_data.train_batches(3)
    for _ in range(2 * text_data.num_train_sequences // 3):  # two epochs, shuffled the same way
        want, got = next(a), next(b)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for want, got in zip(text_data.eval_batches(2), token_data.eval_batches(2), strict=True):
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="teacher fields for task.seq_len=12, not 8"):
        build_text_data(tokens, student, seq_len=8, teacher_tokenizer=teacher)
    with pytest.raises(ValueError, match="prepared with teacher tokenizer"):
        build_text_data(tokens, student, seq_len=12, teacher_tokenizer=wordpiece_tokenizer(texts, vocab_size=100))


def test_corrupt_line_and_non_utf8_document_are_reported_and_skipped(tmp_path):
    tok = word_tokenizer()
    eos = tok.token_to_id("<eos>")
    docs = make_docs(6)
    bad = {2: b'{"text": "doc2 w1", "meta": ', 4: b'{"text": "doc4 caf\xe9"}'}
    path = write_pile(tmp_path / "00.jsonl.zst", docs, bad)
    cfg = TextDataConfig(source="files", train_path=str(path), eval_fraction=0.0)
    with pytest.warns(UserWarning) as caught:
        prepare(cfg, tok, tmp_path / "tok", progress=False)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"{path}:3: invalid JSON") for m in messages), messages
    assert any(m.startswith(f"{path}:5: not valid UTF-8") for m in messages), messages
    unk = tok.token_to_id("<unk>")
    with_replacement = ids_of(tok, docs[0]) + [eos] + ids_of(tok, docs[1]) + [eos] + ids_of(tok, docs[3]) + [eos]
    got = shard_tokens(tmp_path / "tok", "train")
    assert got[: len(with_replacement)] == with_replacement
    assert got[len(with_replacement) :] == [tok.token_to_id("doc4"), unk, eos] + ids_of(tok, docs[5]) + [eos]


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r.get("loss", r.get("eval_loss")) for r in rows]


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory) -> tuple[Path, list[str]]:
    """A Pile-format corpus and overrides pointing the debug recipe at a small BPE tokenizer
    trained on it (a folder loads in milliseconds; converting SmolLM2's GGUF takes seconds)."""
    from transformers import PreTrainedTokenizerFast

    tmp = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from his an were are which".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 80))) + "." for _ in range(300)]
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer(docs[:50], vocab_size=300), eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(tmp / "bpe")
    return write_pile(tmp / "00.jsonl.zst", docs), [f"{m}.options.tokenizer={tmp / 'bpe'}" for m in ("student", "teacher")]


@pytest.mark.slow
def test_training_from_shards_equals_training_from_the_text(tmp_path, corpus_and_tokenizer):
    corpus, tokenizer = corpus_and_tokenizer
    text = ["task.text.source=files", f"task.text.train_path={corpus}", *tokenizer]
    common = [f"output_dir={tmp_path}", "train.steps=4", "train.eval_every=2", "--no-progress"]
    assert main(["prepare", DEBUG, *text, "--out", str(tmp_path / "tok"), "--workers", "1", "--no-progress"]) == 0
    assert main(["train", DEBUG, *text, "run_name=text", *common]) == 0
    tokens = ["task.text.source=tokens", f"task.text.train_path={tmp_path / 'tok'}", *tokenizer]
    assert main(["train", DEBUG, *tokens, "run_name=tokens", *common]) == 0
    losses = _losses(tmp_path / "text")
    assert len(losses) == 6 and losses == _losses(tmp_path / "tokens")


@pytest.mark.slow
def test_pile_recipe_streams_and_resumes_exactly(tmp_path, corpus_and_tokenizer):
    """tasks/pile.yaml (hf, streaming) on a local folder in the Pile's layout: trains, resumes exactly."""
    pytest.importorskip("datasets")
    corpus, tokenizer = corpus_and_tokenizer
    (tmp_path / "pile").mkdir()
    shutil.copy(corpus, tmp_path / "pile" / "train.jsonl.zst")
    shutil.copy(corpus, tmp_path / "pile" / "test.jsonl.zst")
    stream = ["task.preset=pile", f"task.text.hf_name={tmp_path / 'pile'}", "task.seq_len=32", "task.text.eval_batches=1",
              *tokenizer, f"output_dir={tmp_path}", "train.steps=4", "train.save_every=2", "train.eval_every=2"]
    assert main(["train", DEBUG, *stream, "run_name=full", "--no-progress"]) == 0
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_000004")  # as if it had died after step 2
    assert main(["train", DEBUG, *stream, "run_name=cut", "--no-progress", "--resume", str(tmp_path / "cut")]) == 0
    losses = _losses(tmp_path / "full")
    assert len(losses) == 6 and losses == _losses(tmp_path / "cut")
    position = json.loads((tmp_path / "full" / "checkpoints" / "step_000002" / "data_rank0.json").read_text())
    assert position["doc"] > 0 and position["seq_len"] == 32  # a stream position, not a shuffled order


# ------------------------------------------------------------------ integrity (issue 22)


def prepared(tmp_path: Path, n_docs: int = 120, **kwargs) -> tuple[TextDataConfig, Path]:
    """A finished preparation of a small Pile-format corpus (several shards per split)."""
    path = write_pile(tmp_path / "00.jsonl.zst", make_docs(n_docs))
    cfg = TextDataConfig(source="files", train_path=str(path), eval_fraction=0.1)
    prepare(cfg, word_tokenizer(), tmp_path / "tok", shard_tokens=50, progress=False, **kwargs)
    return cfg, tmp_path / "tok"


def tokens_cfg(folder: Path) -> TextDataConfig:
    return TextDataConfig(source="tokens", train_path=str(folder), eval_batches=100)


def all_batches(folder: Path) -> list[list[int]]:
    data = build_text_data(tokens_cfg(folder), word_tokenizer(), seq_len=7)
    it = data.train_batches(2)
    return [next(it)["input_ids"].tolist() for _ in range(data.num_train_sequences)] + \
        [b["input_ids"].tolist() for b in data.eval_batches(1)]


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_manifest_checksums_every_shard_and_a_changed_shard_is_refused_on_first_use(tmp_path, monkeypatch):
    _, out = prepared(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    files = manifest["splits"]["train"]["files"]
    assert len(files) == manifest["splits"]["train"]["shards"] > 2 and manifest["truncated"] == []
    for entry in files:
        assert entry["bytes"] == (out / entry["name"]).stat().st_size
        assert entry["blake2b"] == token_manifest.file_checksum(out / entry["name"])
    hashed, checksum = [], token_manifest.file_checksum
    monkeypatch.setattr(token_manifest, "file_checksum", lambda path: hashed.append(path.name) or checksum(path))
    clean = all_batches(out)  # two passes over every shard: each hashed once, on first use
    assert sorted(hashed) == sorted(p.name for p in out.glob("*_0*.npy"))
    shard = out / files[1]["name"]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x10  # one bit of a token: same size, still a valid .npy
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:  # first used by the vocabulary probe when the run is built
        all_batches(out)
    assert one_line(err).startswith(f"{shard}: checksum mismatch")
    raw[-3] ^= 0x10
    shard.write_bytes(bytes(raw))
    assert all_batches(out) == clean


@pytest.mark.parametrize("damage", ["truncated", "missing", "manifest-json", "manifest-keys", "old-format"])
def test_damaged_folders_are_refused_in_one_line_before_training(tmp_path, damage):
    _, out = prepared(tmp_path)
    manifest_path, shard = out / "manifest.json", out / "train_00001.npy"
    manifest = json.loads(manifest_path.read_text())
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "missing":
        shard.unlink()
    elif damage == "manifest-json":
        manifest_path.write_text(manifest_path.read_text()[:-20])
    elif damage == "manifest-keys":
        del manifest["splits"]["train"]["files"][0]
        manifest_path.write_text(json.dumps(manifest))
    else:
        manifest["settings"]["format"] = "alignkit-tokens/1"
        manifest_path.write_text(json.dumps(manifest))
    want = {"truncated": f"{shard}: ", "missing": f"{shard}: missing", "manifest-json": f"{manifest_path}: not a readable",
            "manifest-keys": f"{manifest_path}: not a complete manifest", "old-format": f"{manifest_path}: prepared by an older"}
    with pytest.raises(DataError) as err:
        build_text_data(tokens_cfg(out), word_tokenizer(), seq_len=7)
    assert one_line(err).startswith(want[damage]) and "alignkit prepare again" in str(err.value)


def test_resume_refuses_other_shards_and_accepts_the_same(tmp_path):
    cfg, out = prepared(tmp_path)
    data = build_text_data(tokens_cfg(out), word_tokenizer(), seq_len=7)
    it = data.train_batches(2)
    next(it)
    state = json.loads(json.dumps(data.state_dict()))
    assert len(state["manifest"]) == 32
    build_text_data(tokens_cfg(out), word_tokenizer(), seq_len=7).load_state_dict(state)
    # the same corpus, re-prepared with other shard sizes: same sequences, other files
    prepare(cfg, word_tokenizer(), tmp_path / "other", shard_tokens=40, progress=False)
    other = build_text_data(tokens_cfg(tmp_path / "other"), word_tokenizer(), seq_len=7)
    assert other.num_train_sequences == data.num_train_sequences
    with pytest.raises(DataError) as err:
        other.load_state_dict(state)
    assert "manifest digest" in one_line(err)


def test_an_unfinished_folder_is_refused_and_any_interruption_continues(tmp_path, monkeypatch):
    cfg, full = prepared(tmp_path)
    write_json = token_shards._write_json

    def dying(path, value):  # killed after the last shard, before manifest.json
        if path.name == "manifest.json":
            raise KeyboardInterrupt
        write_json(path, value)

    monkeypatch.setattr(token_shards, "_write_json", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, word_tokenizer(), tmp_path / "cut", shard_tokens=50, progress=False)
    monkeypatch.setattr(token_shards, "_write_json", write_json)
    assert (tmp_path / "cut" / "train_00000.npy").exists() and not (tmp_path / "cut" / "manifest.json").exists()
    with pytest.raises(DataError) as err:
        build_text_data(tokens_cfg(tmp_path / "cut"), word_tokenizer(), seq_len=7)
    assert "unfinished alignkit prepare" in one_line(err)
    # an older alignkit's interrupted folder: shards, no progress.json
    shutil.copytree(tmp_path / "cut", tmp_path / "old")
    (tmp_path / "old" / "progress.json").unlink()
    for name in ("cut", "old"):
        prepare(cfg, word_tokenizer(), tmp_path / name, shard_tokens=50, progress=False)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(p.name for p in full.iterdir())
        for path in full.iterdir():
            assert (tmp_path / name / path.name).read_bytes() == path.read_bytes(), (name, path.name)


def test_truncated_and_non_zstd_sources(tmp_path):
    rng = random.Random(0)  # 400 KB of text: several zstd blocks, so a cut file keeps the blocks before the cut
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(3000)]
    good = write_pile(tmp_path / "good.jsonl.zst", docs)
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    cfg = TextDataConfig(source="files", train_path=str(cut), eval_fraction=0.0)
    with pytest.raises(DataError) as err:
        prepare(cfg, word_tokenizer(), tmp_path / "a", progress=False)
    assert one_line(err).startswith(f"{cut}: truncated: the zstd frame starting at byte 0 ends early at byte {cut.stat().st_size}")
    with pytest.raises(DataError, match="truncated"):  # training straight from the text too
        build_text_data(cfg, word_tokenizer(), seq_len=7)
    with pytest.warns(UserWarning, match=f"{cut}: TRUNCATED at byte {cut.stat().st_size}"):
        manifest = prepare(cfg, word_tokenizer(), tmp_path / "a", progress=False, allow_truncated=True)
    assert manifest["truncated"] == [{"file": str(cut), "offset": cut.stat().st_size}]
    kept = manifest["splits"]["train"]["documents"]
    assert 0 < kept < len(docs)
    assert shard_tokens(tmp_path / "a", "train") == [t for d in docs[:kept] for t in ids_of(word_tokenizer(), d) + [1]]
    plain = tmp_path / "plain.jsonl.zst"
    plain.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    with pytest.raises(DataError) as err:
        prepare(TextDataConfig(source="files", train_path=str(plain)), word_tokenizer(), tmp_path / "b", progress=False)
    assert one_line(err).startswith(f"{plain}: not a zstd file")
    # several frames (pzstd, concatenated files) are one stream
    frames = tmp_path / "frames.jsonl.zst"
    frames.write_bytes(good.read_bytes() + write_pile(tmp_path / "more.jsonl.zst", docs[:50]).read_bytes())
    manifest = prepare(TextDataConfig(source="files", train_path=str(frames), eval_fraction=0.0), word_tokenizer(),
                       tmp_path / "c", progress=False)
    assert manifest["splits"]["train"]["documents"] == len(docs) + 50


@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_unwritable_output_is_one_line_and_the_rerun_continues(tmp_path, monkeypatch, capsys, fault):
    corpus = write_pile(tmp_path / "00.jsonl.zst", make_docs(120))
    word_fast(tmp_path / "words")
    args = ["prepare", DEBUG, "task.text.source=files", f"task.text.train_path={corpus}", "task.text.max_train_docs=0",
            f"student.options.tokenizer={tmp_path / 'words'}", f"teacher.options.tokenizer={tmp_path / 'words'}",
            "--shard-tokens", "50", "--workers", "1", "--no-progress", "--out"]
    assert main([*args, str(tmp_path / "full")]) == 0
    calls = {"n": 0}
    write, write_text = token_manifest.HashingFile.write, Path.write_text

    def failing_write(self, data):  # the disk fills up in the middle of the third shard
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError(fault, os.strerror(fault))
        return write(self, data)

    def read_only(self, *args, **kwargs):
        raise OSError(fault, os.strerror(fault), str(self))

    if fault == errno.ENOSPC:
        monkeypatch.setattr(token_manifest.HashingFile, "write", failing_write)
    else:
        monkeypatch.setattr(Path, "write_text", read_only)
    capsys.readouterr()
    assert main([*args, str(tmp_path / "cut")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and os.strerror(fault) in err and f"--out {tmp_path / 'cut'}" in err, err
    monkeypatch.setattr(token_manifest.HashingFile, "write", write)
    monkeypatch.setattr(Path, "write_text", write_text)
    assert main([*args, str(tmp_path / "cut")]) == 0
    full = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == full
    for name in full:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def word_fast(folder: Path) -> None:
    """The word tokenizer as a transformers tokenizer folder (what a recipe loads)."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
