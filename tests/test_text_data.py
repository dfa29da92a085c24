"""Tests for alignkit.tasks.text_data: packing, splits, sources, bad data, resume, sharding,
and tokenizer-mismatch alignment. Tokenizers are built in-test with the `tokenizers` library."""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from alignkit.tasks.text_data import (
    PREFETCH,
    TextDataConfig,
    build_text_data,
    builtin_documents,
    is_heldout,
    match_teacher_positions,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI_VALID = SHARED_DATA / "wikitext-2" / "valid.txt"

WORDS = [f"w{i}" for i in range(200)] + [f"doc{i}" for i in range(200)]


# ---------------------------------------------------------------------------------- helpers


def word_tokenizer() -> Tokenizer:
    """Whitespace word-level tokenizer with a known vocab: ids are predictable."""
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def bpe_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def wordpiece_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[UNK]", "[SEP]", "[PAD]"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def ids_of(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def make_docs(n: int, words_per_doc: int = 5) -> list[str]:
    return [" ".join([f"doc{i}"] + [f"w{(i * 7 + k) % 200}" for k in range(words_per_doc - 1)]) for i in range(n)]


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def files_cfg(path: Path, **kw) -> TextDataConfig:
    return TextDataConfig(source="files", train_path=str(path), **kw)


# ---------------------------------------------------------------------------------- packing


def test_packing_order_eos_and_shapes(tmp_path):
    tok = word_tokenizer()
    eos = tok.token_to_id("<eos>")
    docs = ["doc0 w1 w2", "doc1 w3", "doc2 w4 w5 w6", "doc3"]
    data = build_text_data(files_cfg(write_txt(tmp_path / "a.txt", docs), eval_fraction=0.0), tok, seq_len=4)
    expected = []
    for d in docs:
        expected += ids_of(tok, d) + [eos]
    # 4 + 1 + 2 + 1 + 4 + 1 + 1 + 1 = 15 tokens -> 3 sequences of 4, tail of 3 dropped
    assert data.num_train_sequences == 3
    assert data.num_train_tokens == 12
    got = np.concatenate([data.train_sequence(i) for i in range(3)]).tolist()
    assert got == expected[:12]
    batch = next(iter(data.train_batches(2)))
    assert batch["input_ids"].shape == (2, 4) and batch["input_ids"].dtype == torch.long
    assert "attention_mask" not in batch  # packed: every position is real, no mask for the models to check
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert "teacher_index" not in batch


def test_epoch_is_permutation_and_deterministic(tmp_path):
    tok = word_tokenizer()
    path = write_txt(tmp_path / "a.txt", make_docs(40))
    cfg = files_cfg(path, eval_fraction=0.0, seed=3)
    a = build_text_data(cfg, tok, seq_len=8)
    n = a.num_train_sequences
    it = a.train_batches(1)
    seen = [tuple(next(it)["input_ids"][0].tolist()) for _ in range(n)]
    assert sorted(seen) == sorted(tuple(a.train_sequence(i).tolist()) for i in range(n))
    second_epoch = [tuple(next(it)["input_ids"][0].tolist()) for _ in range(n)]
    assert sorted(second_epoch) == sorted(seen) and second_epoch != seen  # reshuffled
    b = build_text_data(cfg, tok, seq_len=8)
    it_b = b.train_batches(1)
    assert [tuple(next(it_b)["input_ids"][0].tolist()) for _ in range(n)] == seen


def test_eval_split_deterministic_and_disjoint(tmp_path):
    tok = word_tokenizer()
    docs = make_docs(200)
    path = write_txt(tmp_path / "a.txt", docs)
    cfg = files_cfg(path, eval_fraction=0.2, eval_batches=1000)
    marker = {tok.token_to_id(f"doc{i}") for i in range(200)}

    def markers(data):
        train = {t for i in range(data.num_train_sequences) for t in data.train_sequence(i).tolist()}
        ev = {t for b in data.eval_batches(1) for t in b["input_ids"].flatten().tolist()}
        return train & marker, ev & marker

    tr, ev = markers(build_text_data(cfg, tok, seq_len=6))
    assert ev and tr and not (tr & ev)
    heldout = {tok.token_to_id(d.split()[0]) for d in docs if is_heldout(d, 0.2)}
    assert ev <= heldout and not (tr & heldout)
    assert markers(build_text_data(cfg, tok, seq_len=6)) == (tr, ev)


def test_max_train_docs_and_tiny_corpus_holdout(tmp_path):
    tok = word_tokenizer()
    marker = {tok.token_to_id(f"doc{i}") for i in range(200)}
    path = write_txt(tmp_path / "a.txt", make_docs(100))
    data = build_text_data(files_cfg(path, max_train_docs=10, eval_fraction=0.2), tok, seq_len=1)
    train = {t for i in range(data.num_train_sequences) for t in data.train_sequence(i).tolist()} & marker
    ev = {t for b in data.eval_batches(1) for t in b["input_ids"].flatten().tolist()} & marker
    assert len(train) == 10 and len(ev) >= 2 and not (train & ev)
    # Two documents: even if no hash falls under the fraction, one (the lowest-hash) is held out.
    two = build_text_data(files_cfg(write_txt(tmp_path / "b.txt", make_docs(2))), tok, seq_len=1)
    assert two.num_train_sequences == 6 and len(two.eval_batches(1)) == 6


def test_eval_path_and_sharded_eval(tmp_path):
    tok = word_tokenizer()
    train = write_txt(tmp_path / "train.txt", make_docs(30))
    ev = write_txt(tmp_path / "eval.txt", make_docs(30))
    cfg = files_cfg(train, eval_path=str(ev), eval_batches=3)
    one = build_text_data(cfg, tok, seq_len=5).eval_batches(4)
    assert len(one) == 3 and one[0]["input_ids"].shape == (4, 5)
    r0 = build_text_data(cfg, tok, seq_len=5, rank=0, world_size=2).eval_batches(2)
    r1 = build_text_data(cfg, tok, seq_len=5, rank=1, world_size=2).eval_batches(2)
    for full, a, b in zip(one, r0, r1):
        assert torch.equal(full["input_ids"], torch.cat([a["input_ids"], b["input_ids"]]))
    assert build_text_data(files_cfg(train, eval_fraction=0.0), tok, seq_len=5).eval_batches(2) == []


# ---------------------------------------------------------------------------------- resume / sharding


def test_resume_exact_next_batch(tmp_path):
    tok = word_tokenizer()
    cfg = files_cfg(write_txt(tmp_path / "a.txt", make_docs(60)), eval_fraction=0.0, seed=7)
    ref = build_text_data(cfg, tok, seq_len=7)
    n_per_epoch = ref.num_train_sequences // 3
    k = n_per_epoch + 2  # cross an epoch boundary
    it = ref.train_batches(3)
    for _ in range(k):
        next(it)
    state = ref.state_dict()
    expected = [next(it)["input_ids"] for _ in range(3)]

    resumed = build_text_data(cfg, tok, seq_len=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    it2 = resumed.train_batches(3)
    for e in expected:
        assert torch.equal(next(it2)["input_ids"], e)
    with pytest.raises(ValueError, match="seq_len"):
        build_text_data(cfg, tok, seq_len=8).load_state_dict(state)


def test_two_rank_sharding_matches_one_rank(tmp_path):
    tok = word_tokenizer()
    cfg = files_cfg(write_txt(tmp_path / "a.txt", make_docs(60)), eval_fraction=0.0, seed=1)
    full = build_text_data(cfg, tok, seq_len=6).train_batches(4)
    r0 = build_text_data(cfg, tok, seq_len=6, rank=0, world_size=2).train_batches(2)
    r1 = build_text_data(cfg, tok, seq_len=6, rank=1, world_size=2).train_batches(2)
    for _ in range(12):  # crosses epochs too
        f, a, b = next(full), next(r0), next(r1)
        assert torch.equal(f["input_ids"], torch.cat([a["input_ids"], b["input_ids"]]))
    with pytest.raises(ValueError, match="rank"):
        build_text_data(cfg, tok, seq_len=6, rank=2, world_size=2)


# ---------------------------------------------------------------------------------- sources


def test_jsonl_source_and_errors(tmp_path):
    tok = word_tokenizer()
    eos = tok.token_to_id("<eos>")
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(["doc0 w1", "doc1 w2 w3"])) + "\n")
    data = build_text_data(files_cfg(p, text_field="body", eval_fraction=0.0), tok, seq_len=7)
    assert data.train_sequence(0).tolist() == ids_of(tok, "doc0 w1") + [eos] + ids_of(tok, "doc1 w2 w3") + [eos]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "doc0 w1"}\n{not json}\n{"text": 3}\n{"text": "doc1 w2"}\n')
    with pytest.warns(UserWarning) as caught:  # no match: pytest would re-emit the warnings left unmatched
        data = build_text_data(files_cfg(bad, eval_fraction=0.0), tok, seq_len=6)
    messages = [str(w.message) for w in caught]
    assert any("bad.jsonl:2: invalid JSON" in m for m in messages)
    assert any("bad.jsonl:3: an int in the 'text' field" in m for m in messages)
    assert data.train_sequence(0).tolist() == ids_of(tok, "doc0 w1") + [eos] + ids_of(tok, "doc1 w2") + [eos]
    with pytest.warns(UserWarning) as caught, pytest.raises(ValueError, match=r"d\.jsonl: no text"):
        build_text_data(files_cfg(p), tok, seq_len=2)
    assert [m for m in map(str, (w.message for w in caught)) if "no 'text' field" in m] == [
        f"{p}:1: no 'text' field (task.text.text_field); line skipped",
        f"{p}:2: no 'text' field (task.text.text_field); line skipped"]


def test_directory_and_glob_sources(tmp_path):
    tok = word_tokenizer()
    (tmp_path / "sub").mkdir()
    write_txt(tmp_path / "sub" / "b.txt", ["doc1 w1"])
    write_txt(tmp_path / "a.txt", ["doc0 w0"])
    (tmp_path / "skip.md").write_text("doc9")
    eos = tok.token_to_id("<eos>")
    want = ids_of(tok, "doc0 w0") + [eos] + ids_of(tok, "doc1 w1") + [eos]
    for spec in (tmp_path, tmp_path / "**" / "*.txt"):
        data = build_text_data(files_cfg(spec, eval_fraction=0.0), tok, seq_len=6)
        assert data.train_sequence(0).tolist() == want


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    tok = word_tokenizer()
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["doc0 w1", "doc1 w2"]}), p)
    data = build_text_data(files_cfg(p, eval_fraction=0.0), tok, seq_len=3)
    assert data.train_sequence(0).tolist() == ids_of(tok, "doc0 w1") + [tok.token_to_id("<eos>")]


def test_missing_optional_packages_give_install_hint(tmp_path, monkeypatch):
    tok = word_tokenizer()
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        build_text_data(files_cfg(p), tok, seq_len=2)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"alignkit\[hub\]"):
        build_text_data(TextDataConfig(source="hf", hf_name="x"), tok, seq_len=2)


def test_token_shards_npy_and_bin(tmp_path):
    a = np.arange(0, 25, dtype=np.uint16)
    b = np.arange(100, 115, dtype=np.int32)
    np.save(tmp_path / "s0.npy", a)
    b.astype(np.uint16).tofile(tmp_path / "s1.bin")
    stream = np.concatenate([a, b]).astype(np.int64)  # 40 tokens
    cfg = TextDataConfig(source="tokens", train_path=str(tmp_path), eval_fraction=0.25)
    data = build_text_data(cfg, None, seq_len=4)
    # 10 sequences; the last ceil(0.25 * 10) = 3 are held out
    assert data.num_train_sequences == 7
    for i in range(7):
        assert data.train_sequence(i).tolist() == stream[4 * i : 4 * i + 4].tolist()
    assert data.train_sequence(6).tolist() == [24, 100, 101, 102]  # crosses shard boundary
    ev = data.eval_batches(1)
    assert [e["input_ids"][0].tolist() for e in ev] == [stream[i : i + 4].tolist() for i in (28, 32, 36)]
    batch = next(data.train_batches(2))
    assert batch["input_ids"].shape == (2, 4) and batch["input_ids"].dtype == torch.long

    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.bin.*empty"):
        build_text_data(TextDataConfig(source="tokens", train_path=str(tmp_path / "x.bin")), None, seq_len=4)


def test_builtin_corpus_small():
    docs = builtin_documents(max_bytes=200_000)
    keys = [k for k, _ in docs]
    assert keys and all(k.endswith(".py") and "site-packages" not in k for k in keys)
    assert builtin_documents(max_bytes=200_000) == docs  # deterministic
    tok = bpe_tokenizer([t for _, t in docs[:20]], vocab_size=400)
    cfg = TextDataConfig(source="builtin", max_train_docs=4, eval_batches=2)
    data = build_text_data(cfg, tok, seq_len=32)
    assert data.num_train_sequences > 0
    assert next(data.train_batches(2))["input_ids"].shape == (2, 32)
    ev = data.eval_batches(2)
    assert 1 <= len(ev) <= 2 and ev[0]["input_ids"].shape == (2, 32)


@pytest.mark.skipif(not WIKI_VALID.exists(), reason="shared WikiText-2 data not present")
def test_wikitext_valid_txt():
    text = WIKI_VALID.read_text(encoding="utf-8")
    tok = bpe_tokenizer([text[:200_000]], vocab_size=1000)
    cfg = files_cfg(WIKI_VALID, max_train_docs=300, eval_batches=2)
    data = build_text_data(cfg, tok, seq_len=64)
    first = tok.decode(data.train_sequence(0).tolist())
    assert first.startswith("= Homarus gammarus =")  # heading is its own blank-line block
    assert data.num_train_sequences > 10
    b = next(data.train_batches(4))
    assert b["input_ids"].shape == (4, 64)
    assert len(data.eval_batches(2)) == 2


# ---------------------------------------------------------------------------------- bad data


def test_missing_paths_name_the_key(tmp_path):
    tok = word_tokenizer()
    with pytest.raises(FileNotFoundError, match=r"train_path.*nope\.txt"):
        build_text_data(files_cfg(tmp_path / "nope.txt"), tok, seq_len=2)
    with pytest.raises(FileNotFoundError, match=r"train_path.*\*\.jsonl"):
        build_text_data(files_cfg(tmp_path / "*.jsonl"), tok, seq_len=2)
    good = write_txt(tmp_path / "a.txt", make_docs(5))
    with pytest.raises(FileNotFoundError, match=r"eval_path.*missing"):
        build_text_data(files_cfg(good, eval_path=str(tmp_path / "missing")), tok, seq_len=2)
    with pytest.raises(FileNotFoundError, match="train_path"):
        build_text_data(TextDataConfig(source="tokens", train_path=str(tmp_path / "x.npy")), None, seq_len=2)


def test_empty_file(tmp_path):
    tok = word_tokenizer()
    p = tmp_path / "empty.txt"
    p.write_text(" \n\n  \n")
    with pytest.raises(ValueError, match=r"empty\.txt.*empty"):
        build_text_data(files_cfg(p), tok, seq_len=2)


def test_non_utf8_is_replaced_with_warning(tmp_path):
    tok = word_tokenizer()
    p = tmp_path / "latin1.txt"
    p.write_bytes("doc0 w1 caf\xe9\n\ndoc1 w2\n".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"latin1\.txt.*UTF-8"):
        data = build_text_data(files_cfg(p, eval_fraction=0.0), tok, seq_len=4)
    unk = tok.token_to_id("<unk>")
    assert data.train_sequence(0).tolist()[:3] == ids_of(tok, "doc0 w1") + [unk]  # "caf\ufffd" -> <unk>


def test_corpus_shorter_than_one_sequence(tmp_path):
    tok = word_tokenizer()
    p = write_txt(tmp_path / "short.txt", ["doc0 w1 w2"])  # 3 tokens + EOS = 4
    with pytest.raises(ValueError, match=r"4 tokens.*seq_len=16"):
        build_text_data(files_cfg(p, eval_fraction=0.0), tok, seq_len=16)
    with pytest.raises(ValueError, match=r"found 5 tokens.*seq_len=8"):
        np.save(tmp_path / "t.npy", np.arange(5, dtype=np.uint16))
        build_text_data(TextDataConfig(source="tokens", train_path=str(tmp_path / "t.npy")), None, seq_len=8)


def test_too_few_sequences_for_a_global_batch(tmp_path):
    tok = word_tokenizer()
    data = build_text_data(files_cfg(write_txt(tmp_path / "a.txt", make_docs(2)), eval_fraction=0.0), tok, seq_len=4)
    with pytest.raises(ValueError, match="one global batch needs"):
        next(data.train_batches(8))


# ---------------------------------------------------------------------------------- tokenizer mismatch


def test_match_teacher_positions_hand_worked():
    # student ends 3,5,9,12 ; teacher ends 2,5,7,12,14
    assert match_teacher_positions([3, 5, 9, 12], [2, 5, 7, 12, 14]) == [0, 1, 2, 3]
    assert match_teacher_positions([1, 2, 4], [2, 5]) == [-1, 0, 0]
    assert match_teacher_positions([3, 3], [1, 3, 3]) == [2, 2]  # ties -> last of the tied tokens
    assert match_teacher_positions([5], []) == [-1]
    with pytest.raises(ValueError):
        match_teacher_positions([1], [3, 2])


def hand_wordpiece(tokens: list[str]) -> Tokenizer:
    vocab = {"[UNK]": 0, "[SEP]": 1, "[PAD]": 2}
    for t in tokens:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_mismatch_hand_worked_pipeline(tmp_path):
    # "unbelievable cats"
    # student: un(0-2) ##believ(2-8) ##able(8-12) cats(13-17)        ends 2, 8, 12, 17
    # teacher: unbe(0-4) ##lie(4-7) ##vable(7-12) cat(13-16) ##s(16-17) ends 4, 7, 12, 16, 17
    student = hand_wordpiece(["un", "##believ", "##able", "cats"])
    teacher = hand_wordpiece(["unbe", "##lie", "##vable", "cat", "##s"])
    text = "unbelievable cats"
    assert [t for t in student.encode(text).tokens] == ["un", "##believ", "##able", "cats"]
    assert [t for t in teacher.encode(text).tokens] == ["unbe", "##lie", "##vable", "cat", "##s"]
    p = write_txt(tmp_path / "a.txt", [text])
    cfg = files_cfg(p, eval_fraction=0.0)
    data = build_text_data(cfg, student, seq_len=5, teacher_tokenizer=teacher)  # 4 tokens + EOS
    assert data.aligns_teacher and data.teacher_seq_len == 8
    b = next(data.train_batches(1))
    assert b["teacher_index"].tolist() == [[-1, 1, 2, 4, 5]]  # EOS -> teacher EOS
    t_ids = ids_of(teacher, text) + [teacher.token_to_id("[SEP]")]
    pad = teacher.token_to_id("[PAD]")
    assert b["teacher_input_ids"].tolist() == [t_ids + [pad] * 2]
    assert b["teacher_attention_mask"].tolist() == [[1] * 6 + [0] * 2]

    # Truncated teacher (ratio 0.6 -> 3 tokens): matches at index >= 3 become -1, never earlier.
    short = build_text_data(files_cfg(p, eval_fraction=0.0, teacher_seq_ratio=0.6), student, seq_len=5,
                            teacher_tokenizer=teacher)
    b = next(short.train_batches(1))
    assert b["teacher_index"].tolist() == [[-1, 1, 2, -1, -1]]
    assert b["teacher_attention_mask"].tolist() == [[1, 1, 1]]

    # Same tokenizer: no teacher fields (positions align one to one).
    same = build_text_data(cfg, student, seq_len=5, teacher_tokenizer=student)
    assert not same.aligns_teacher and "teacher_index" not in next(same.train_batches(1))


def _virtual_ends(tok: Tokenizer, text: str) -> list[int]:
    return [e for _, e in tok.encode(text, add_special_tokens=False).offsets]


def test_mismatch_trained_tokenizers_never_read_ahead(tmp_path):
    corpus_a = ["the quick brown fox jumps over the lazy dog " * 3, "pack my box with five dozen liquor jugs"]
    corpus_b = ["sphinx of black quartz judge my vow", "how vexingly quick daft zebras jump " * 2]
    student = bpe_tokenizer(corpus_a, vocab_size=300)
    teacher = wordpiece_tokenizer(corpus_b, vocab_size=120)
    # One document exactly filling one sequence: check against an independent brute force.
    text = "the lazy zebras judge quartz boxes; daft foxes jump."
    n = len(ids_of(student, text))
    p = write_txt(tmp_path / "one.txt", [text])
    data = build_text_data(files_cfg(p, eval_fraction=0.0, teacher_seq_ratio=3.0), student, seq_len=n + 1,
                           teacher_tokenizer=teacher)
    b = next(data.train_batches(1))
    s_ends = _virtual_ends(student, text)
    t_ends = _virtual_ends(teacher, text)
    assert ids_of(student, text) != ids_of(teacher, text)
    sep = teacher.token_to_id("[SEP]")
    t_row = b["teacher_input_ids"][0].tolist()
    assert t_row[: len(t_ends) + 1] == ids_of(teacher, text) + [sep]
    index = b["teacher_index"][0].tolist()
    for pos, e in enumerate(s_ends):
        ok = [j for j, te in enumerate(t_ends) if te <= e]
        assert index[pos] == (max(ok) if ok else -1)
        if index[pos] >= 0:
            assert t_ends[index[pos]] <= e  # never a teacher token that read further ahead
    assert index[n] == len(t_ends)  # student EOS -> teacher EOS

    # Packed multi-document sequences: invariants on every row.
    docs = [f"{w} quick jumps over {v} box" for w, v in zip(["fox", "dog", "vow", "jug"] * 5, ["lazy", "daft"] * 10)]
    p2 = write_txt(tmp_path / "many.txt", docs)
    data = build_text_data(files_cfg(p2, eval_fraction=0.0), student, seq_len=16, teacher_tokenizer=teacher)
    s_eos = student.token_to_id("<eos>")
    it = data.train_batches(4)
    for _ in range(3):
        b = next(it)
        st = b["teacher_input_ids"].shape[1]
        assert st == 24 and b["teacher_index"].shape == (4, 16)
        idx = b["teacher_index"]
        assert ((idx >= -1) & (idx < st)).all()
        for r in range(4):
            row = [j for j in idx[r].tolist() if j >= 0]
            assert row == sorted(row)
            assert all(b["teacher_attention_mask"][r, j] == 1 for j in row)
            for pos in range(16):
                if b["input_ids"][r, pos] == s_eos and idx[r, pos] >= 0:
                    assert b["teacher_input_ids"][r, idx[r, pos]] == sep


def test_mismatch_with_hf_fast_tokenizers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    student = PreTrainedTokenizerFast(tokenizer_object=hand_wordpiece(["un", "##believ", "##able", "cats"]),
                                      eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")
    teacher = PreTrainedTokenizerFast(tokenizer_object=hand_wordpiece(["unbe", "##lie", "##vable", "cat", "##s"]),
                                      eos_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]")
    p = write_txt(tmp_path / "a.txt", ["unbelievable cats", "cats unbelievable"])
    data = build_text_data(files_cfg(p, eval_fraction=0.0), student, seq_len=10, teacher_tokenizer=teacher)
    b = next(data.train_batches(1))
    # student: un believ able cats EOS cats un believ able EOS
    # teacher: unbe lie vable cat s EOS cat s unbe lie vable EOS
    # the second "un" (ends before "unbe" does) pairs with the last finished teacher token, "s"
    assert b["teacher_index"].tolist() == [[-1, 1, 2, 4, 5, 7, 7, 9, 10, 11]]


# ---------------------------------------------------------------------------------- streaming


def stream_cfg(path: Path, **kw) -> TextDataConfig:
    return TextDataConfig(source="files", train_path=str(path), streaming=True, **kw)


def test_streaming_serves_the_packed_stream_in_order(tmp_path):
    tok = word_tokenizer()
    path = write_txt(tmp_path / "a.txt", make_docs(50))
    packed = build_text_data(files_cfg(path, eval_fraction=0.0), tok, seq_len=6)
    streamed = build_text_data(stream_cfg(path, eval_fraction=0.0), tok, seq_len=6)
    n = packed.num_train_sequences
    it = streamed.train_batches(2)
    got = [row for _ in range(n // 2 + 3) for row in next(it)["input_ids"].tolist()]
    want = [packed.train_sequence(i).tolist() for i in range(n)]
    assert got[: n // 2 * 2] == want[: n // 2 * 2]
    # the next epoch continues the same stream: the tail of epoch 0 runs into epoch 1's start
    stream = packed.train.packer.arrays()[0].tolist()
    flat = [t for row in got for t in row]
    assert flat[len(stream) : len(stream) + 12] == stream[:12]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def test_streaming_bounded_read_ahead_and_exact_resume(tmp_path, monkeypatch):
    from alignkit.tasks import text_stream
    from alignkit.tasks.text_packing import Encoder

    tok = word_tokenizer()
    docs = make_docs(200, words_per_doc=3) * 10  # 2000 documents of 4 tokens
    path = write_jsonl(tmp_path / "a.jsonl", docs)
    served = {"doc": 0}
    reads = {"ahead": 0}
    micro, seq, chunk, prefetch = 2, 7, 4, 2  # 14-token batches: most cut a 4-token document
    # at most one chunk, the prefetched batches, the one being cut and the buffer behind it
    limit = chunk + (prefetch + 2) * micro * seq // 4 + 1
    read = text_stream.piece_documents
    lines = path.read_bytes().splitlines(keepends=True)
    index = dict(zip(np.cumsum([0] + [len(line) for line in lines]).tolist(), range(len(lines))))

    def documents(piece, text_field):
        for start, end, text in read(piece, text_field):
            t = index[start]
            reads["ahead"] = max(reads["ahead"], t - served["doc"])
            assert t - served["doc"] <= limit, f"read {t - served['doc']} documents ahead (limit {limit})"
            yield start, end, text

    monkeypatch.setattr(text_stream, "piece_documents", documents)

    def make():
        return text_stream.StreamingTextData(stream_cfg(path, eval_fraction=0.0), "test corpus", None, seq, chunk_docs=chunk,
                                             prefetch=prefetch, student=Encoder(tok))

    data = make()
    it = data.train_batches(micro)
    batches = []
    for k in range(2 * len(docs) * 4 // (micro * seq)):  # two epochs
        if k % 50 == 0:
            time.sleep(0.05)  # let the producer run as far ahead as it ever may
        batches.append(next(it)["input_ids"])
        served["doc"] = data.state_dict()["doc"] + data.state_dict()["epoch"] * len(docs)
        if len(batches) == 301:
            state = data.state_dict()
    assert limit < len(docs) // 20 and 0 < reads["ahead"] <= limit
    assert state["epoch"] == 0 and state["doc"] > 0 and state["skip"] > 0  # resume inside a document
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    it2 = resumed.train_batches(micro)
    served["doc"] = state["doc"]
    for k in range(301, len(batches)):
        assert torch.equal(next(it2)["input_ids"], batches[k]), k
        served["doc"] = resumed.state_dict()["doc"] + resumed.state_dict()["epoch"] * len(docs)


def write_pile(path: Path, docs: list[str]) -> Path:
    zstd = pytest.importorskip("zstandard")
    path.write_bytes(zstd.ZstdCompressor().compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode()))
    return path


def count_reads(monkeypatch) -> tuple[set[str], list[tuple[str, int]]]:
    """Record the names of the files opened and the (name, offset) of each line read, in order
    (decompressed offsets for .zst)."""
    from alignkit.tasks import text_sources

    real_open, real_lines = open, text_sources._lines
    opened: set[str] = set()
    lines: list[tuple[str, int]] = []

    def counting_open(path, *args, **kwargs):
        opened.add(Path(path).name)
        return real_open(path, *args, **kwargs)

    def counting_lines(path, start=0):
        for offset, line in real_lines(path, start):
            lines.append((path.name, offset))
            yield offset, line

    monkeypatch.setattr(text_sources, "open", counting_open, raising=False)
    monkeypatch.setattr(text_sources, "_lines", counting_lines)
    return opened, lines


def test_streaming_shards_documents_by_rank_and_keeps_teacher_fields(tmp_path, monkeypatch):
    tok = word_tokenizer()
    (tmp_path / "corpus").mkdir()
    docs = make_docs(100)
    files = [write_jsonl(tmp_path / "corpus" / "a.jsonl", docs[:60]),
             write_pile(tmp_path / "corpus" / "b.jsonl.zst", docs[60:80]),
             write_jsonl(tmp_path / "corpus" / "c.jsonl", docs[80:])]
    half = sum(p.stat().st_size for p in files) // 2  # inside a.jsonl
    seen = []
    for rank in (0, 1):
        with monkeypatch.context() as patch:
            opened, lines = count_reads(patch)
            data = build_text_data(stream_cfg(tmp_path / "corpus", eval_fraction=0.0), tok, seq_len=5, rank=rank, world_size=2)
            it = data.train_batches(2)
            seen.append(set())
            while data.state_dict()["epoch"] == 0:
                ids = set(next(it)["input_ids"].flatten().tolist())
                seen[rank] |= {i for i in range(100) if tok.token_to_id(f"doc{i}") in ids}
            it.close()
        # no rank opens or decodes what another one reads: rank 0 has the first half of the bytes,
        # all in a.jsonl (it reads one line past, to find where it stops); rank 1 the rest
        mine = {offset for name, offset in lines if name == "a.jsonl"}
        if rank == 0:
            assert opened == {"a.jsonl"} and len([o for o in mine if o >= half]) == 1
        else:
            assert opened == {"a.jsonl", "b.jsonl.zst", "c.jsonl"} and min(mine) >= half
    assert seen[0] | seen[1] == set(range(100)) and not seen[0] & seen[1]  # each document on one rank
    # LET-dagger: the streamed batch carries the same teacher fields as the in-memory one
    texts = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 6
    student = bpe_tokenizer(texts, vocab_size=300)
    teacher = wordpiece_tokenizer(texts, vocab_size=120)
    p = write_txt(tmp_path / "m.txt", texts)
    packed = build_text_data(files_cfg(p, eval_fraction=0.0), student, seq_len=12, teacher_tokenizer=teacher)
    streamed = build_text_data(stream_cfg(p, eval_fraction=0.0), student, seq_len=12, teacher_tokenizer=teacher)
    it = streamed.train_batches(2)
    for k in range(3):
        want = packed._make_batch(packed.train, [2 * k, 2 * k + 1])
        got = next(it)
        assert got.keys() == want.keys() and all(torch.equal(got[key], want[key]) for key in want)


def test_byte_ranges_split_a_jsonl_into_every_document_once(tmp_path):
    from alignkit.tasks.text_sources import Piece, piece_documents, split_files

    docs = [f"doc{i} " + "w1 " * (i % 7) for i in range(30)]  # lines of unequal length
    path = write_jsonl(tmp_path / "a.jsonl", docs)
    size = path.stat().st_size
    for cut in range(size + 1):  # every boundary: line starts, mid-line, the newline itself
        halves = [Piece(path, 0, cut), Piece(path, cut, None)]
        assert [text for half in halves for _, _, text in piece_documents(half)] == docs, cut
    for readers in (2, 3, 7):
        plan = split_files([path], [size], readers)
        assert [text for pieces in plan for piece in pieces for _, _, text in piece_documents(piece)] == docs
    # files that cannot be entered at a byte go whole to the reader holding their first byte
    plan = split_files([path, tmp_path / "b.jsonl.zst", tmp_path / "c.txt"], [size, size, size], 2)
    assert [[(p.path.name, p.start, p.stop) for p in pieces] for pieces in plan] == [
        [("a.jsonl", 0, None), ("b.jsonl.zst", 0, None)], [("c.txt", 0, None)]]


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.zst"])
def test_streaming_resume_seeks_to_its_position(tmp_path, monkeypatch, name):
    tok = word_tokenizer()
    docs = make_docs(200)
    (tmp_path / "corpus").mkdir()
    write = write_pile if name.endswith(".zst") else write_jsonl
    write(tmp_path / "corpus" / name, docs[:150])
    write_jsonl(tmp_path / "corpus" / "b.jsonl", docs[150:])
    cfg = stream_cfg(tmp_path / "corpus", eval_fraction=0.0)
    for rank in (0, 1):
        full = build_text_data(cfg, tok, seq_len=5, rank=rank, world_size=2)
        it = full.train_batches(3)
        batches, states = [], []
        while len(states) < 5 or states[-5]["epoch"] == 0:  # into the rank's second epoch
            batches.append(next(it)["input_ids"])
            states.append(json.loads(json.dumps(full.state_dict())))
        k = len(batches) // 2  # interrupted after batch k, mid-epoch
        state = states[k]
        assert state["epoch"] == 0 and state["offset"] > 0
        with monkeypatch.context() as patch:
            _, lines = count_reads(patch)
            resumed = build_text_data(cfg, tok, seq_len=5, rank=rank, world_size=2)
            resumed.load_state_dict(state)
            rest = resumed.train_batches(3)
            assert all(torch.equal(next(rest)["input_ids"], want) for want in batches[k + 1 :])
            rest.close()
        # the resumed read started at the saved document: no line before it was decoded
        assert lines[0] == (resumed.pieces[state["piece"]].path.name, state["offset"])


def test_streaming_eval_and_errors(tmp_path):
    tok = word_tokenizer()
    path = write_txt(tmp_path / "a.txt", make_docs(200))
    packed = build_text_data(files_cfg(path, eval_fraction=0.2, eval_batches=2), tok, seq_len=6)
    streamed = build_text_data(stream_cfg(path, eval_fraction=0.2, eval_batches=2), tok, seq_len=6)
    for a, b in zip(packed.eval_batches(2), streamed.eval_batches(2), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
    with pytest.raises(TypeError, match="no known length"):
        streamed.num_train_sequences
    with pytest.raises(ValueError, match="world_size"):
        build_text_data(stream_cfg(path), tok, seq_len=6, rank=0, world_size=2).load_state_dict(streamed.state_dict())
    with pytest.raises(ValueError, match="older alignkit's streamed position"):
        streamed.load_state_dict({"epoch": 0, "doc": 3, "skip": 0, "seq_len": 6, "world_size": 1})
    state = streamed.state_dict()
    write_txt(path, make_docs(201))
    with pytest.raises(ValueError, match="file list or sizes"):
        build_text_data(stream_cfg(path, eval_fraction=0.2), tok, seq_len=6).load_state_dict(state)
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"text": "doc0"}\n')
    with pytest.raises(ValueError, match="no training documents for rank 1"):
        next(build_text_data(stream_cfg(empty, eval_fraction=0.0), tok, seq_len=2, rank=1, world_size=2).train_batches(1))


def test_streaming_hf_source_reads_a_local_dataset_folder(tmp_path):
    pytest.importorskip("datasets")
    tok = word_tokenizer()
    docs = make_docs(30)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "00.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    hf = TextDataConfig(source="hf", hf_name=str(tmp_path / "hf"), streaming=True, eval_fraction=0.0)
    files = stream_cfg(tmp_path / "hf" / "00.jsonl", eval_fraction=0.0)
    a, b = build_text_data(hf, tok, seq_len=6).train_batches(2), build_text_data(files, tok, seq_len=6).train_batches(2)
    for _ in range(20):
        assert torch.equal(next(a)["input_ids"], next(b)["input_ids"])


def test_mismatch_batches_are_prefetched_resume_exactly_and_stop_with_the_teacher(tmp_path):
    docs = [f"{w} quick jumps over {v} box" for w, v in zip(["fox", "dog", "vow", "jug"] * 8, ["lazy", "daft"] * 16)]
    student = bpe_tokenizer(docs, vocab_size=300)
    teacher = wordpiece_tokenizer(docs, vocab_size=120)
    p = write_txt(tmp_path / "many.txt", docs)
    build = lambda: build_text_data(files_cfg(p, eval_fraction=0.0), student, seq_len=8, teacher_tokenizer=teacher)  # noqa: E731
    full = [b for _, b in zip(range(7), build().train_batches(2))]
    data = build()
    it = data.train_batches(2)
    for _ in range(3):
        next(it)  # the worker has built batches beyond these; the state is what was served
    state = data.state_dict()
    resumed = build()
    resumed.load_state_dict(state)
    rest = [b for _, b in zip(range(4), resumed.train_batches(2))]
    for a, b in zip(full[3:], rest):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed.release_teacher()  # after stop_step: the teacher's side is no longer built
    later = [b for _, b in zip(range(PREFETCH + 2), resumed.train_batches(2))]
    assert "teacher_input_ids" not in later[-1]


def test_a_truncated_or_fake_zst_stops_every_text_path_in_one_line(tmp_path):
    """A .zst cut short (a partial download) or not zstd at all: the in-memory and the streamed
    paths stop with one line naming the file (and, for a cut, the byte where it ends)."""
    from alignkit.core.errors import DataError

    tok = word_tokenizer()
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(3000)]  # several zstd blocks
    whole = write_pile(tmp_path / "whole.jsonl.zst", docs).read_bytes()
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(whole[: len(whole) // 2])
    fake = tmp_path / "fake.jsonl.zst"
    fake.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:10]))
    for path, want in ((cut, f"{cut}: truncated: the zstd frame starting at byte 0 ends early at byte {len(whole) // 2}"),
                       (fake, f"{fake}: not a zstd file")):
        for cfg in (files_cfg(path, eval_fraction=0.0), stream_cfg(path, eval_fraction=0.0)):
            with pytest.raises(DataError) as err:
                data = build_text_data(cfg, tok, seq_len=8)
                for _ in data.train_batches(4):  # streamed: found by the reader thread, raised by the step
                    pass
            assert str(err.value).startswith(want) and "\n" not in str(err.value), (cfg.streaming, str(err.value))
