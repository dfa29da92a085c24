"""Pre-tokenized token shards: ``alignkit prepare`` writes them, ``task.text.source=tokens`` reads
them (a prepared directory, or plain ``.npy`` / ``.bin`` shards).

A prepared directory holds the packed stream exactly as the in-memory ``files`` / ``hf`` /
``builtin`` path builds it (documents tokenized without special tokens, each followed by EOS,
the same hash-based held-out split), so training from it is the same run as training from the
text, without tokenizing anything:

``train_00000.npy, ...``  the train stream, ``shard_tokens`` tokens per shard (the last shorter)
``eval_00000.npy, ...``   the held-out split (hash-selected documents, or the eval source)
``manifest.json``         written last: tokenizer name and fingerprint, dtype, EOS id, shard
                          size, token / document / shard counts per split, source settings
``progress.json``         only while unfinished: source position (documents read), shards and
                          the partial tails (``<split>.tail.<k>.npy``) at the last checkpoint

Memory stays bounded whatever the corpus size: documents stream from the source in chunks,
``workers`` processes tokenize them (results taken in order, at most ``2 x workers`` chunks in
flight) and each split's shard is written as soon as it fills. A checkpoint follows every chunk
that completed a shard, so an interrupted ``prepare`` rerun with the same settings drops the
shards written after it, re-reads the source up to its position without tokenizing, and ends
with the same files as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
from collections import deque
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from alignkit.tasks.text_data import (
    _ENCODE_CHUNK_CHARS,
    _ENCODE_CHUNK_DOCS,
    TextData,
    TextDataConfig,
    _Encoder,
    _Split,
    _Stream,
    holdout_stream,
    needs_holdout,
    teacher_encoder,
)
from alignkit.tasks.text_sources import _load_token_shards, source_documents

FORMAT = "alignkit-tokens/1"
SPLITS = ("train", "eval")
DEFAULT_SHARD_TOKENS = 1 << 25  # 32M tokens: 64 MB per uint16 shard, the bound on buffered tokens
_SOURCE_KEYS = ("source", "train_path", "eval_path", "eval_fraction", "text_field", "hf_name", "hf_config",
                "hf_split", "hf_eval_split", "max_train_docs")
_worker_encoder: _Encoder | None = None


def tokenizer_fingerprint(encoder: _Encoder) -> str:
    """A short hash of the tokenizer's full definition (vocab, merges, normalizer, EOS)."""
    return hashlib.sha256(encoder.fingerprint().encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _documents(cfg: TextDataConfig) -> Iterator[tuple[bool, str]]:
    """``(held out?, text)`` in a fixed order: the train source (hash split), then the eval source."""
    holdout = needs_holdout(cfg)
    for held, _, text in holdout_stream(source_documents(cfg), cfg, holdout):
        yield held, text
    if not holdout:
        yield from ((True, text) for _, text in source_documents(cfg, "eval"))


def _chunks(cfg: TextDataConfig, start: int) -> Iterator[tuple[int, list[bool], list[str]]]:
    """``(source position after the chunk, held-out flags, texts)``, skipping ``start`` documents."""
    pos, flags, texts, chars = start, [], [], 0
    for held, text in itertools.islice(_documents(cfg), start, None):
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
    _worker_encoder = _Encoder(tokenizer, "student tokenizer")


def _encode(flags: list[bool], texts: list[str], encoder: _Encoder | None = None) -> list[tuple[np.ndarray, int]]:
    """Per split (train, eval): the chunk's EOS-terminated token stream and its document count."""
    enc = encoder or _worker_encoder
    assert enc is not None
    flat: tuple[list[int], list[int]] = ([], [])
    docs = [0, 0]
    for held, (ids, _) in zip(flags, enc.encode(texts, offsets=False)):
        if ids:
            flat[held].extend(ids)
            flat[held].append(enc.eos_id)
            docs[held] += 1
    dtype = _dtype(enc)
    return [(np.asarray(flat[k], dtype=dtype), docs[k]) for k in (0, 1)]


def _encoded(chunks: Iterator[tuple[int, list[bool], list[str]]], tokenizer: Any, workers: int) -> Iterator[tuple[int, list[tuple[np.ndarray, int]]]]:
    """Encoded chunks in source order; with ``workers > 1`` a process pool, boundedly ahead."""
    if workers <= 1:
        encoder = _Encoder(tokenizer, "student tokenizer")
        yield from ((pos, _encode(flags, texts, encoder)) for pos, flags, texts in chunks)
        return
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for pos, flags, texts in chunks:
            pending.append((pos, pool.apply_async(_encode, (flags, texts))))
            if len(pending) >= 2 * workers:
                done_pos, result = pending.popleft()
                yield done_pos, result.get()
        while pending:
            done_pos, result = pending.popleft()
            yield done_pos, result.get()


def _dtype(encoder: _Encoder) -> np.dtype:
    return np.dtype(np.uint16 if encoder.vocab_size <= 65536 else np.int32)


class _ShardWriter:
    """One split's stream, written as fixed-size ``.npy`` shards as they fill."""

    def __init__(self, out: Path, split: str, shard_tokens: int, counts: dict[str, int], tail: np.ndarray) -> None:
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.shards, self.tokens, self.documents = counts["shards"], counts["tokens"], counts["documents"]
        self.pieces, self.pending = [tail], len(tail)

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
        path = self.out / f"{self.split}_{self.shards:05d}.npy"
        with open(path.with_suffix(".tmp"), "wb") as handle:
            np.save(handle, ids)
        os.replace(path.with_suffix(".tmp"), path)
        self.shards += 1

    def finish(self) -> None:
        if self.pending:
            self._write(self.tail())
            self.pieces, self.pending = [self.tail()[:0]], 0

    def counts(self) -> dict[str, int]:
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents}


def _settings(cfg: TextDataConfig, encoder: _Encoder, shard_tokens: int, name: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "tokenizer": {"name": name, "fingerprint": tokenizer_fingerprint(encoder), "eos_id": encoder.eos_id,
                      "vocab_size": encoder.vocab_size},
        "dtype": _dtype(encoder).name,
        "shard_tokens": shard_tokens,
        "source": {k: getattr(cfg, k) for k in _SOURCE_KEYS},
    }


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _checkpoint(out: Path, settings: dict[str, Any], pos: int, writers: dict[str, _ShardWriter], k: int) -> None:
    """Tails first under a new number, then progress.json naming them (atomic), then old tails go."""
    for split, writer in writers.items():
        with open(out / f"{split}.tail.{k}.npy", "wb") as handle:
            np.save(handle, writer.tail())
    _write_json(out / "progress.json", {"settings": settings, "docs": pos, "checkpoint": k,
                                        "splits": {s: w.counts() for s, w in writers.items()}})
    for old in out.glob("*.tail.*.npy"):
        if old.name.split(".")[-2] != str(k):
            old.unlink()


def _resume_state(out: Path, settings: dict[str, Any], dtype: np.dtype) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The last checkpoint of an unfinished preparation in ``out`` (or a fresh start)."""
    fresh = {"docs": 0, "checkpoint": 0, "splits": {s: {"shards": 0, "tokens": 0, "documents": 0} for s in SPLITS}}
    progress = out / "progress.json"
    if not progress.is_file():
        if out.exists() and any(out.iterdir()):
            raise FileExistsError(f"--out {out}: not empty and not an unfinished preparation; choose an empty folder")
        out.mkdir(parents=True, exist_ok=True)
        return fresh, {s: np.zeros(0, dtype) for s in SPLITS}
    state = json.loads(progress.read_text())
    if state["settings"] != settings:
        raise FileExistsError(f"--out {out}: holds an unfinished preparation with other settings "
                              "(tokenizer, source or shard size); choose another folder")
    for split in SPLITS:  # shards written after the checkpoint are redone
        for path in out.glob(f"{split}_*.npy"):
            if int(path.stem.split("_")[-1]) >= state["splits"][split]["shards"]:
                path.unlink()
    k = state["checkpoint"]
    return state, {s: np.load(out / f"{s}.tail.{k}.npy") if k else np.zeros(0, dtype) for s in SPLITS}


def prepare(
    cfg: TextDataConfig,
    tokenizer: Any,
    out: str | Path,
    *,
    tokenizer_name: str = "",
    teacher_tokenizer: Any = None,
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``cfg``'s text source into shards under ``out``; returns the manifest. Rerun with
    the same settings continues an interrupted preparation (a finished one is left as is)."""
    if cfg.source not in ("builtin", "files", "hf"):
        raise ValueError(f"task.text.source={cfg.source!r}: alignkit prepare needs a text source (files, hf, builtin)")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens={shard_tokens} must be >= 1")
    encoder = _Encoder(tokenizer, "student tokenizer")
    if teacher_encoder(encoder, teacher_tokenizer) is not None:
        raise ValueError("the teacher's tokenizer differs from the student's (LET-dagger): prepared shards hold no "
                         "text to re-tokenize for the teacher; train from the text source (streaming: true) instead")
    out = Path(out)
    settings = _settings(cfg, encoder, shard_tokens, tokenizer_name)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest["settings"] != settings:
            raise FileExistsError(f"--out {out}: holds a finished preparation with other settings; choose another folder")
        return manifest
    state, tails = _resume_state(out, settings, _dtype(encoder))
    writers = {s: _ShardWriter(out, s, shard_tokens, state["splits"][s], tails[s]) for s in SPLITS}
    from tqdm.auto import tqdm

    done = sum(w.tokens for w in writers.values())
    bar = tqdm(desc=f"prepare {out.name}", unit="tok", unit_scale=True, initial=done, disable=not progress, dynamic_ncols=True)
    k = state["checkpoint"]
    try:
        for pos, results in _encoded(_chunks(cfg, state["docs"]), tokenizer, workers):
            written = 0
            for split, (ids, docs) in zip(SPLITS, results):
                written += writers[split].add(ids, docs)
                bar.update(len(ids))
            bar.set_postfix(docs=pos, refresh=False)
            if written:
                k += 1
                _checkpoint(out, settings, pos, writers, k)
    finally:
        bar.close()
    if writers["train"].tokens == 0:
        raise ValueError(f"{cfg.train_path or cfg.hf_name or cfg.source}: no training documents (all held out or empty)")
    for writer in writers.values():
        writer.finish()
    manifest = {"settings": settings, "splits": {s: w.counts() for s, w in writers.items()}}
    _write_json(manifest_path, manifest)
    (out / "progress.json").unlink(missing_ok=True)
    for tail in out.glob("*.tail.*.npy"):
        tail.unlink()
    return manifest


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _prepared_streams(path: Path, student: _Encoder | None) -> tuple[_Stream, _Stream | None]:
    manifest = json.loads((path / "manifest.json").read_text())
    settings = manifest.get("settings", {})
    if settings.get("format") != FORMAT:
        raise ValueError(f"{path / 'manifest.json'}: format {settings.get('format')!r}, expected {FORMAT!r}")
    tok = settings["tokenizer"]
    if student is not None and tokenizer_fingerprint(student) != tok["fingerprint"]:
        raise ValueError(
            f"task.text.train_path={str(path)!r} was prepared with tokenizer {tok['name'] or '?'} (fingerprint "
            f"{tok['fingerprint']}), not the student's (fingerprint {tokenizer_fingerprint(student)}): "
            "run alignkit prepare again with this recipe"
        )

    def stream(split: str) -> _Stream | None:
        shards = manifest["splits"][split]["shards"]
        arrays = [np.load(path / f"{split}_{i:05d}.npy", mmap_mode="r") for i in range(shards)]
        return _Stream(arrays) if arrays else None

    train = stream("train")
    assert train is not None
    return train, stream("eval")


def build_token_data(cfg: TextDataConfig, tokenizer: Any, teacher_tokenizer: Any, seq_len: int, **common: Any) -> TextData:
    """``source: tokens``: a prepared directory (its own eval split) or ``.npy`` / ``.bin`` shards
    (the last ``eval_fraction`` of the sequences held out unless ``eval_path`` is given)."""
    student = _Encoder(tokenizer, "student tokenizer") if tokenizer is not None else None
    if student is not None and teacher_encoder(student, teacher_tokenizer) is not None:
        raise ValueError(
            "task.text.source='tokens' has no text, so a teacher with a different tokenizer "
            "cannot be aligned: use a text source or a teacher with the student's tokenizer"
        )
    prepared = Path(cfg.train_path).expanduser()
    eval_stream: _Stream | None = None
    if (prepared / "manifest.json").is_file():
        stream, eval_stream = _prepared_streams(prepared, student)
    else:
        stream = _Stream(_load_token_shards(cfg.train_path, "train_path", cfg.token_dtype))
    if student is not None:
        probe = stream.get(0, min(len(stream), 1_000_000))
        if probe.size and int(probe.max()) >= student.vocab_size:
            raise ValueError(
                f"task.text.train_path={cfg.train_path!r}: token id {int(probe.max())} >= tokenizer "
                f"vocab size {student.vocab_size} (wrong task.text.token_dtype or tokenizer?)"
            )
    if cfg.eval_path:
        eval_stream = _Stream(_load_token_shards(cfg.eval_path, "eval_path", cfg.token_dtype))
    if eval_stream is not None or (prepared / "manifest.json").is_file():
        train_split = _Split(stream, seq_len)
        eval_split = _Split(eval_stream, seq_len) if eval_stream is not None else None
    else:
        n_total = len(stream) // seq_len
        n_eval = math.ceil(cfg.eval_fraction * n_total) if cfg.eval_fraction > 0 and n_total >= 2 else 0
        cut = (n_total - n_eval) * seq_len
        train_split = _Split(stream.view(0, cut) if n_eval else stream, seq_len)
        eval_split = _Split(stream.view(cut, n_total * seq_len), seq_len) if n_eval else None
    if train_split.num_sequences == 0:
        raise ValueError(
            f"task.text.train_path={cfg.train_path!r}: found {len(train_split.stream)} tokens, but one "
            f"sequence needs seq_len={seq_len}"
        )
    return TextData(train_split, eval_split, seq_len, **common)
