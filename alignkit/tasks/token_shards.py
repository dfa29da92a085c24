"""``alignkit prepare``: tokenize a text source into token shards, which ``task.text.source=tokens``
reads (:mod:`alignkit.tasks.token_reader`).

A prepared directory holds the packed stream exactly as the in-memory ``files`` / ``hf`` /
``builtin`` path builds it (documents tokenized without special tokens, each followed by EOS,
the same hash-based held-out split), so training from it is the same run as training from the
text, without tokenizing anything:

``train_00000.npy, ...``  the train stream, ``shard_tokens`` tokens per shard (the last shorter)
``eval_00000.npy, ...``   the held-out split (hash-selected documents, or the eval source)
``<split>-teacher_{ids,index,count}_00000.npy, ...``  only when the teacher's tokenizer
                          differs (LET-dagger): the teacher's fields of every ``seq_len``-token
                          sequence, so training reads no text (see :class:`_TeacherRows`)
``manifest.json``         written last: tokenizer name and fingerprint (and the teacher's), dtype,
                          EOS id, shard size, token / document / shard counts per stream, each
                          shard's size and BLAKE2b checksum (:mod:`alignkit.tasks.token_manifest`),
                          source, and the source files kept despite a truncation (``truncated``)
``progress.json``         only while unfinished (written first, so an interrupted folder is never
                          taken for plain shards): source position (documents read), shards and
                          the partial tails (``<split>.tail.<k>.npy``) at the last checkpoint

Memory stays bounded whatever the corpus size: documents stream from the source in chunks,
``workers`` processes tokenize them (results taken in order, at most ``2 x workers`` chunks in
flight) and each split's shard is written as soon as it fills. A checkpoint follows every chunk
that completed a shard, so an interrupted ``prepare`` rerun with the same settings drops the
shards written after it, re-reads the source up to its position without tokenizing, and ends
with the same files as an uninterrupted run. A folder holding only files of an interrupted
preparation without ``progress.json`` (one stopped before its first checkpoint, or by an older
alignkit between its last shard and the manifest) starts over.

A truncated ``.jsonl.zst`` stops the preparation (file and byte offset); ``allow_truncated``
keeps the documents before the cut, with a warning, and records the file in the manifest. A
write that fails (disk full, read-only folder) is one :class:`RunDirError`; rerun to continue.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import multiprocessing as mp
import os
from collections import deque
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from alignkit.core.errors import DataError, RunDirError
from alignkit.tasks.text_batches import TextData
from alignkit.tasks.text_packing import ENCODE_CHUNK_CHARS, ENCODE_CHUNK_DOCS, Encoder, PackedBuffer, teacher_encoder
from alignkit.tasks.text_sources import TextDataConfig, holdout_stream, needs_holdout, source_documents
from alignkit.tasks.token_manifest import FORMAT, HashingFile, read_manifest, shard_name, tokenizer_fingerprint
from alignkit.tasks.token_reader import PREPARE_FILES
SPLITS = ("train", "eval")
DEFAULT_SHARD_TOKENS = 1 << 25  # 32M tokens: 64 MB per uint16 shard, the bound on buffered tokens
_SOURCE_KEYS = ("source", "train_path", "eval_path", "eval_fraction", "text_field", "hf_name", "hf_config",
                "hf_split", "hf_eval_split", "max_train_docs")
# prepare's own chunk sizes (a checkpoint follows every chunk that completed a shard)
_ENCODE_CHUNK_CHARS, _ENCODE_CHUNK_DOCS = ENCODE_CHUNK_CHARS, ENCODE_CHUNK_DOCS
_worker_encoder: Encoder | None = None


def _unwritable(out: Path, path: Path, err: OSError) -> RunDirError:
    return RunDirError(f"--out {out}: cannot write {path.name} ({err.strerror or err}): free space or make the folder "
                       "writable and rerun the same command to continue, or choose another folder")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _documents(cfg: TextDataConfig, truncated: list[dict[str, Any]] | None) -> Iterator[tuple[bool, str]]:
    """``(held out?, text)`` in a fixed order: the train source (hash split), then the eval
    source. Local paths are resolved now (a missing one fails before anything is written).
    ``truncated``: collects the truncated files kept (None: a truncated file is an error)."""
    cfg = dataclasses.replace(cfg, streaming=True)  # hf: never download a whole split first
    holdout = needs_holdout(cfg)
    train = ((held, text) for held, _, text in holdout_stream(source_documents(cfg, truncated=truncated), cfg, holdout))
    if holdout:
        return train
    return itertools.chain(train, ((True, text) for _, text in source_documents(cfg, "eval", truncated=truncated)))


def _chunks(documents: Iterator[tuple[bool, str]], start: int) -> Iterator[tuple[int, list[bool], list[str]]]:
    """``(source position after the chunk, held-out flags, texts)``, skipping ``start`` documents."""
    pos, flags, texts, chars = start, [], [], 0
    for held, text in itertools.islice(documents, start, None):
        flags.append(held)
        texts.append(text)
        pos, chars = pos + 1, chars + len(text)
        if chars >= _ENCODE_CHUNK_CHARS or len(texts) >= _ENCODE_CHUNK_DOCS:
            yield pos, flags, texts
            flags, texts, chars = [], [], 0
    if texts:
        yield pos, flags, texts


def _init_worker(tokenizer: Any) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_encoder = Encoder(tokenizer, "student tokenizer")


Encoded = list  # per split (train, eval): (EOS-terminated token stream, document count, spans)


def _encode(flags: list[bool], texts: list[str], spans: bool, encoder: Encoder | None = None) -> Encoded:
    """Per split (train, eval): the chunk's EOS-terminated token stream, its document count and,
    with ``spans``, ``(chunk index, character offsets)`` per non-empty document."""
    enc = encoder or _worker_encoder
    assert enc is not None
    flat: tuple[list[int], list[int]] = ([], [])
    docs: tuple[list, list] = ([], [])
    for i, (held, (ids, offsets)) in enumerate(zip(flags, enc.encode(texts, offsets=spans))):
        if ids:
            flat[held].extend(ids)
            flat[held].append(enc.eos_id)
            docs[held].append((i, np.asarray(offsets, dtype=np.int64) if spans else None))
    return [(np.asarray(flat[k], dtype=_dtype(enc)), docs[k]) for k in (0, 1)]


def _encoded(chunks: Iterator[tuple[int, list[bool], list[str]]], tokenizer: Any, workers: int,
             spans: bool) -> Iterator[tuple[int, list[str], Encoded]]:
    """``(position, texts, encoded)`` in source order; with ``workers > 1`` from a process pool,
    at most ``2 x workers`` chunks ahead."""
    if workers <= 1:
        encoder = Encoder(tokenizer, "student tokenizer")
        yield from ((pos, texts, _encode(flags, texts, spans, encoder)) for pos, flags, texts in chunks)
        return
    # fork: workers start at once and share the parent's pages (spawn would re-import torch in each)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for pos, flags, texts in chunks:
            pending.append((pos, texts, pool.apply_async(_encode, (flags, texts, spans))))
            if len(pending) >= 2 * workers:
                done_pos, done_texts, result = pending.popleft()
                yield done_pos, done_texts, result.get()
        while pending:
            done_pos, done_texts, result = pending.popleft()
            yield done_pos, done_texts, result.get()


def _dtype(encoder: Encoder) -> np.dtype:
    return np.dtype(np.uint16 if encoder.vocab_size <= 65536 else np.int32)


class _ShardWriter:
    """One split's stream, written as fixed-size ``.npy`` shards as they fill."""

    def __init__(self, out: Path, split: str, shard_tokens: int, counts: dict[str, Any], tail: np.ndarray) -> None:
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.shards, self.tokens, self.documents = counts["shards"], counts["tokens"], counts["documents"]
        self.files: list[dict[str, Any]] = list(counts["files"])  # name, size and checksum per shard written
        self.pieces, self.pending, self.dtype = [tail], len(tail), tail.dtype

    def add(self, ids: np.ndarray, documents: int) -> int:
        """Append tokens; returns the number of shards written."""
        self.tokens += len(ids)
        self.documents += documents
        self.pieces.append(ids)
        self.pending += len(ids)
        written = 0
        while self.pending >= self.shard_tokens:
            flat = self.tail()
            self._write(flat[: self.shard_tokens])
            self.pieces, self.pending = [flat[self.shard_tokens :]], len(flat) - self.shard_tokens
            written += 1
        return written

    def tail(self) -> np.ndarray:
        """The tokens not yet in a shard."""
        if len(self.pieces) > 1:
            self.pieces = [np.concatenate(self.pieces)]
        return self.pieces[0]

    def _write(self, ids: np.ndarray) -> None:
        path = self.out / shard_name(self.split, self.shards)
        try:
            with open(path.with_suffix(".tmp"), "wb") as handle:
                hashed = HashingFile(handle)
                np.save(hashed, ids)
            os.replace(path.with_suffix(".tmp"), path)
        except OSError as err:
            path.with_suffix(".tmp").unlink(missing_ok=True)
            raise _unwritable(self.out, path, err) from None
        self.files.append(hashed.entry(path.name))
        self.shards += 1

    def finish(self) -> None:
        if self.pending:
            self._write(self.tail())
            self.pieces, self.pending = [self.tail()[:0]], 0

    def counts(self) -> dict[str, Any]:
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents, "dtype": self.dtype.name,
                "files": self.files}


class _TeacherRows:
    """LET-dagger: the teacher's side of every student sequence of one split, computed once here
    by the training path's own code (:meth:`TextData._teacher_fields` on the packed text), so
    training reads it instead of text. Three streams per split: ``<split>-teacher_ids``
    (``teacher_seq_len`` per sequence, padded), ``<split>-teacher_index`` (``seq_len`` per
    sequence) and ``<split>-teacher_count`` (real teacher tokens per sequence)."""

    def __init__(self, data: TextData, writers: dict[str, _ShardWriter], split: str, carry: dict[str, Any] | None) -> None:
        self.data, self.split = data, split
        self.writers = {k: writers[f"{split}-teacher_{k}"] for k in ("ids", "index", "count")}
        assert data.student is not None
        self.buffer = PackedBuffer(data.student.eos_id, spans=True, skip=carry["skip"] if carry else 0)
        for ids, span, text in carry["pieces"] if carry else []:
            self.buffer.add(None, ids[:-1], span, text)

    def add(self, ids: np.ndarray, docs: list[tuple[int, np.ndarray]], texts: list[str]) -> None:
        start = 0
        for i, offsets in docs:
            n = len(offsets) + 1
            self.buffer.add(None, ids[start : start + n - 1].tolist(), offsets, texts[i])
            start += n
        rows = self.buffer.available() // self.data.seq_len
        if rows:
            fields = self.data._teacher_fields(self.buffer.cut(rows * self.data.seq_len, self.data.seq_len), list(range(rows)))
            for key, name in (("ids", "teacher_input_ids"), ("index", "teacher_index")):
                self.writers[key].add(fields[name].numpy().astype(self.writers[key].dtype).reshape(-1), 0)
            self.writers["count"].add(fields["teacher_attention_mask"].sum(1).numpy().astype(np.int32), 0)

    def carry(self) -> dict[str, Any]:
        """The packed tokens not yet in a sequence, with their documents (for a checkpoint)."""
        return {"skip": self.buffer.skip, "pieces": [(p[1].tolist(), p[2].tolist(), p[3]) for p in self.buffer.pieces]}


def _settings(cfg: TextDataConfig, encoder: Encoder, shard_tokens: int, name: str,
              teacher: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "tokenizer": {"name": name, "fingerprint": tokenizer_fingerprint(encoder), "eos_id": encoder.eos_id,
                      "vocab_size": encoder.vocab_size},
        "dtype": _dtype(encoder).name,
        "shard_tokens": shard_tokens,
        "source": {k: getattr(cfg, k) for k in _SOURCE_KEYS},
        "teacher": teacher,
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(value, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _unwritable(path.parent, path, err) from None


def _checkpoint(out: Path, settings: dict[str, Any], pos: int, writers: dict[str, _ShardWriter],
                rows: dict[str, _TeacherRows], k: int) -> None:
    """Tails first under a new number, then progress.json naming them (atomic), then old tails go."""
    for name, writer in writers.items():
        try:
            with open(out / f"{name}.tail.{k}.npy", "wb") as handle:
                np.save(handle, writer.tail())
        except OSError as err:
            raise _unwritable(out, out / f"{name}.tail.{k}.npy", err) from None
    _write_json(out / "progress.json", {"settings": settings, "docs": pos, "checkpoint": k,
                                        "streams": {n: w.counts() for n, w in writers.items()},
                                        "carry": {s: r.carry() for s, r in rows.items()}})
    for old in out.glob("*.tail.*.npy"):
        if old.name.split(".")[-2] != str(k):
            old.unlink()


def _resume_state(out: Path, settings: dict[str, Any], streams: dict[str, np.dtype]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The last checkpoint of an unfinished preparation in ``out``, or a fresh start (whose
    ``progress.json`` is written now, before any shard)."""
    progress = out / "progress.json"
    if not progress.is_file():
        if out.exists() and not all(PREPARE_FILES.fullmatch(p.name) for p in out.iterdir()):
            raise RunDirError(f"--out {out}: not empty and not an unfinished preparation; choose an empty folder")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _unwritable(out.parent, out, err) from None
        fresh = {"settings": settings, "docs": 0, "checkpoint": 0, "carry": {},
                 "streams": {n: {"shards": 0, "tokens": 0, "documents": 0, "files": []} for n in streams}}
        _write_json(progress, fresh)
    try:
        state = json.loads(progress.read_text())
        same = state["settings"] == settings
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunDirError(f"--out {out}: progress.json is damaged ({err}); choose another folder") from None
    if not same:
        raise RunDirError(f"--out {out}: holds an unfinished preparation with other settings "
                          "(format, tokenizer, source or shard size); choose another folder")
    for name in streams:  # shards written after the checkpoint are redone
        for path in out.glob(f"{name}_*.npy"):
            if int(path.stem.split("_")[-1]) >= state["streams"][name]["shards"]:
                path.unlink()
    k = state["checkpoint"]
    return state, {n: np.load(out / f"{n}.tail.{k}.npy") if k else np.zeros(0, dtype) for n, dtype in streams.items()}


def _streams(encoder: Encoder, teacher: Encoder | None, teacher_seq_len: int) -> dict[str, np.dtype]:
    """Every stream a preparation writes, with its dtype."""
    streams = {split: _dtype(encoder) for split in SPLITS}
    if teacher is not None:
        index = np.int16 if teacher_seq_len < 2**15 else np.int32
        for split in SPLITS:
            streams.update({f"{split}-teacher_ids": _dtype(teacher), f"{split}-teacher_index": np.dtype(index),
                            f"{split}-teacher_count": np.dtype(np.int32)})
    return streams


def prepare(
    cfg: TextDataConfig,
    tokenizer: Any,
    out: str | Path,
    *,
    tokenizer_name: str = "",
    teacher_tokenizer: Any = None,
    teacher_name: str = "",
    seq_len: int = 0,
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
    allow_truncated: bool = False,
) -> dict[str, Any]:
    """Tokenize ``cfg``'s text source into shards under ``out``; returns the manifest. Rerun with
    the same settings continues an interrupted preparation (a finished one is left as is).
    ``allow_truncated``: keep the documents before the cut of a truncated ``.zst`` (warned, and
    recorded in the manifest) instead of stopping.
    With a teacher tokenizer other than the student's, the teacher's fields of every
    ``seq_len``-token sequence are stored too (training then needs that seq_len)."""
    if cfg.source not in ("builtin", "files", "hf"):
        raise DataError(f"task.text.source={cfg.source!r}: alignkit prepare needs a text source (files, hf, builtin)")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens={shard_tokens} must be >= 1")
    encoder = Encoder(tokenizer, "student tokenizer")
    teacher = teacher_encoder(encoder, teacher_tokenizer)
    teacher_settings = None
    if teacher is not None:
        if seq_len < 1:
            raise DataError("the teacher's tokenizer differs from the student's: prepare needs task.seq_len")
        teacher_len = max(1, math.ceil(cfg.teacher_seq_ratio * seq_len))
        teacher_settings = {"name": teacher_name, "fingerprint": tokenizer_fingerprint(teacher), "seq_len": seq_len,
                            "teacher_seq_len": teacher_len, "pad_id": teacher.pad_id}
    out = Path(out)
    settings = _settings(cfg, encoder, shard_tokens, tokenizer_name, teacher_settings)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest, _ = read_manifest(manifest_path)
        if manifest["settings"] != settings:
            raise RunDirError(f"--out {out}: holds a finished preparation with other settings; choose another folder")
        return manifest
    truncated: list[dict[str, Any]] | None = [] if allow_truncated else None
    documents = _documents(cfg, truncated)
    streams = _streams(encoder, teacher, teacher_settings["teacher_seq_len"] if teacher_settings else 0)
    state, tails = _resume_state(out, settings, streams)
    writers = {n: _ShardWriter(out, n, shard_tokens, state["streams"][n], tails[n]) for n in streams}
    rows: dict[str, _TeacherRows] = {}
    if teacher is not None:
        assert teacher_settings is not None
        data = TextData(None, None, seq_len, student=encoder, teacher=teacher,  # type: ignore[arg-type]
                        teacher_seq_len=teacher_settings["teacher_seq_len"])
        rows = {s: _TeacherRows(data, writers, s, state["carry"].get(s)) for s in SPLITS}
    from tqdm.auto import tqdm

    done = sum(writers[s].tokens for s in SPLITS)
    bar = tqdm(desc=f"prepare {out.name}", unit="tok", unit_scale=True, initial=done, disable=not progress, dynamic_ncols=True)
    k = state["checkpoint"]
    try:
        for pos, texts, results in _encoded(_chunks(documents, state["docs"]), tokenizer, workers, teacher is not None):
            written = 0
            for split, (ids, docs) in zip(SPLITS, results):
                written += writers[split].add(ids, len(docs))
                if rows:
                    rows[split].add(ids, docs, texts)
                bar.update(len(ids))
            bar.set_postfix(docs=pos, refresh=False)
            if written:
                k += 1
                _checkpoint(out, settings, pos, writers, rows, k)
    finally:
        bar.close()
    if writers["train"].tokens == 0:
        raise DataError(f"{cfg.train_path or cfg.hf_name or cfg.source}: no training documents (all held out or empty)")
    for writer in writers.values():
        writer.finish()
    manifest = {"settings": settings, "splits": {n: w.counts() for n, w in writers.items()}, "truncated": truncated or []}
    _write_json(manifest_path, manifest)
    (out / "progress.json").unlink(missing_ok=True)
    for tail in out.glob("*.tail.*.npy"):
        tail.unlink()
    return manifest
