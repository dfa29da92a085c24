"""Where text comes from (:class:`TextDataConfig`, the ``task.text`` section) and how it is
read: resolve paths, read local text files, the builtin stdlib corpus, Hugging Face datasets
and pre-tokenized shards, and decide the hash-based held-out split of a document. The lowest of
the text data modules: it imports none of them.

Sources (``TextDataConfig.source``):

``builtin``  the running Python's standard-library ``.py`` sources (no download): a sorted,
             deterministic file list (site-packages, tests and caches excluded), one file per
             document, capped at ``BUILTIN_MAX_BYTES``; held-out split by a hash of the path.
``files``    local ``.txt`` / ``.jsonl`` / ``.jsonl.zst`` / ``.parquet`` (a file, a directory or
             a glob), read as a stream (never a whole file in memory).
             ``.txt``: one document per block of lines separated by blank (whitespace-only)
             lines -- for WikiText that makes each paragraph and each `` = Heading = `` line a
             document, which is harmless for packing and gives the held-out split many units.
             ``.jsonl``: one document per line, ``text_field``; ``.jsonl.zst``: the same,
             zstandard-compressed (the Pile's format). ``.parquet``: ``text_field``
             column (needs pyarrow).
``hf``       Hugging Face ``datasets`` (``pip install alignkit[hub]``), ``streaming`` as configured.
``tokens``   pre-tokenized shards: ``.npy`` (``np.load(mmap_mode="r")``) or raw ``.bin``
             (``np.memmap``, ``token_dtype``), read in file order as one token stream that is
             assumed to already contain document separators.

Held-out decision (:func:`is_heldout`): a document is held out when a SHA-1 hash of its key (the
text; the path for builtin) falls under ``eval_fraction`` -- independent of seed and order.

Bad data: a missing path raises FileNotFoundError naming the path and the config key; an
empty file (or one with no text) raises ValueError naming the file; **non-UTF-8 bytes are
decoded with U+FFFD replacement, and a corrupt ``.jsonl`` line (invalid JSON, no text field) is
skipped, each with a warning naming the file and line** (the first few per file): one stray
byte in a large crawl should not kill a run, but it should not pass silently either.
"""
from __future__ import annotations

import bisect
import glob as _glob
import hashlib
import json
import os
import sysconfig
import warnings
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from alignkit.core import hub
from alignkit.core.config import above, at_least, between, checked, one_of
from alignkit.core.errors import DataError, MissingFile, MissingPackage
from alignkit.tasks.zstd_stream import TruncatedInput, skip, zstd_lines

SOURCES = ("builtin", "files", "hf", "tokens")
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.zst", ".parquet")
TOKEN_SUFFIXES = (".npy", ".bin")
BUILTIN_MAX_BYTES = 20_000_000  # ~20 MB of stdlib source: a few seconds of fast tokenization
_BUILTIN_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib"}
_MAX_LINE_WARNINGS = 10  # per file and read; a broken crawl should not flood the log


@dataclass
class TextDataConfig:
    """Where the text comes from and how the held-out split is made (seq_len and batch size
    come from the trainer config)."""

    source: str = checked("builtin", one_of(*SOURCES))
    train_path: str = ""  # file, directory or glob (.txt/.jsonl/.parquet, or .npy/.bin for tokens)
    eval_path: str = ""  # optional; else hold out eval_fraction of the documents
    eval_fraction: float = checked(0.05, between(0, 1, high_open=True))
    text_field: str = "text"  # jsonl / parquet / hf
    hf_name: str = ""
    hf_config: str = ""
    hf_split: str = "train"
    hf_eval_split: str = ""
    streaming: bool = False  # files / hf: tokenize on the fly in bounded memory (alignkit.tasks.text_stream)
    token_dtype: str = checked("uint16", one_of("uint8", "uint16", "int16", "uint32", "int32", "int64"))  # dtype of raw .bin shards
    eval_batches: int = checked(20, at_least(1))  # max eval batches (per rank, = global eval batches)
    max_train_docs: int = checked(0, at_least(0))  # 0 = all
    seed: int = 0
    teacher_seq_ratio: float = checked(1.5, above(0))  # teacher length = ceil(ratio * seq_len) under tokenizer mismatch


def _doc_hash(key: str) -> float:
    digest = hashlib.sha1(key.encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic held-out decision for a document key (path or text); seed-independent."""
    return fraction > 0 and _doc_hash(key) < fraction


def holdout_stream(
    keyed: Iterable[tuple[str, str]], cfg: TextDataConfig, need_eval: bool
) -> Iterator[tuple[bool, float, str]]:
    """``(held out?, hash, text)`` per document in source order: the hash split, stopping after
    ``max_train_docs`` train documents. Streams: nothing is kept."""
    holdout = need_eval and cfg.eval_fraction > 0
    # With a train cap, keep scanning (at most cap more docs) until the held-out share is what
    # an uncapped split would give, so a capped run still gets a proportionate eval set.
    want_eval = max(1, math.ceil(cfg.eval_fraction * cfg.max_train_docs)) if holdout else 0
    n_train = n_eval = extra = 0
    for key, text in keyed:
        capped = bool(cfg.max_train_docs) and n_train >= cfg.max_train_docs
        if capped:
            if n_eval >= want_eval or extra >= cfg.max_train_docs:
                return
            extra += 1
        h = _doc_hash(key)
        if holdout and h < cfg.eval_fraction:
            n_eval += 1
            yield True, h, text
        elif not capped:
            n_train += 1
            yield False, h, text


def needs_holdout(cfg: TextDataConfig) -> bool:
    """True when the eval split is carved from the train source by document hash."""
    return not cfg.eval_path and not (cfg.source == "hf" and cfg.hf_eval_split)


def resolve_paths(spec: str, key: str, suffixes: Sequence[str]) -> list[Path]:
    """Expand a file / directory (recursive) / glob into a sorted file list.

    Raises FileNotFoundError naming ``spec`` and the config ``key`` when nothing matches.
    """
    if not spec:
        raise MissingFile(f"task.text.{key} is empty: set it to a file, directory or glob")
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes)))
        if not files:
            raise MissingFile(
                f"task.text.{key}={spec!r}: directory holds no {'/'.join(suffixes)} files"
            )
        return files
    matches = sorted(Path(p) for p in _glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not matches:
        raise MissingFile(f"task.text.{key}={spec!r}: no such file or directory, and no glob match")
    return matches


def _lines(path: Path, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """``(offset, raw line)`` of the lines of a file that start at byte ``start`` or later,
    streamed, never the whole file. ``.zst``: offsets of the decompressed stream, reached by
    decompressing and discarding (no line splitting, no decoding), as it has no random access;
    a truncated frame raises :class:`~alignkit.tasks.zstd_stream.TruncatedInput` after the last
    whole line before it."""
    with open(path, "rb") as raw:
        lines: Any = zstd_lines(raw, path) if path.name.endswith(".zst") else raw
        # A line starts at byte s when s == 0 or byte s - 1 ends a line: enter one byte early and
        # drop what is left of the line there (just its newline when s starts a line).
        offset = max(start - 1, 0)
        if start and lines is raw:
            raw.seek(offset)
        elif start:
            skip(lines, offset)
        if start:
            offset += len(lines.readline())
        for line in lines:
            yield offset, line
            offset += len(line)


def _bad_line(path: Path, lineno: int, offset: int, what: str, counts: list[int]) -> None:
    """Warn about one bad line, as ``path:line`` (``path@byte`` for a read entered mid-file,
    where the line number is unknown): the first few per file, then once that more are skipped."""
    counts[0] += 1
    if counts[0] <= _MAX_LINE_WARNINGS:
        more = f" (further bad lines of {path} are not reported)" if counts[0] == _MAX_LINE_WARNINGS else ""
        where = f"{path}:{lineno}" if lineno else f"{path}@{offset}"
        warnings.warn(f"{where}: {what}{more}", UserWarning, stacklevel=4)


def _decoded_lines(path: Path, start: int) -> Iterator[tuple[int, int, int, str, list[int]]]:
    """(offset, offset of the next line, line number or 0 when entered mid-file, text, bad-line
    counter) per line from byte ``start`` on; non-UTF-8 bytes become U+FFFD with a warning."""
    counts = [0]
    for lineno, (offset, raw) in enumerate(_lines(path, start), start=1):
        lineno = 0 if start else lineno
        try:
            line = raw.decode("utf-8-sig" if offset == 0 else "utf-8")
        except UnicodeDecodeError as err:
            line = raw.decode("utf-8", errors="replace")
            _bad_line(path, lineno, offset, f"not valid UTF-8 ({err.reason} at byte {err.start}); "
                      "undecodable bytes were replaced with U+FFFD", counts)
        yield offset, offset + len(raw), lineno, line, counts


def _txt_documents(path: Path, start: int) -> Iterator[tuple[int, int, str]]:
    block: list[str] = []
    first = end = 0
    for offset, after, _, line, _ in _decoded_lines(path, start):
        if line.strip():
            first = first if block else offset
            block.append(line)
            end = after
        elif block:
            yield first, end, "".join(block).strip()
            block = []
    if block:
        yield first, end, "".join(block).strip()


def _jsonl_documents(path: Path, field: str, start: int, stop: int | None) -> Iterator[tuple[int, int, str]]:
    """One document per line (``.jsonl`` or the Pile's ``.jsonl.zst``); a corrupt line is
    reported (file and line) and skipped, the rest is kept."""
    for offset, end, lineno, line, counts in _decoded_lines(path, start):
        if stop is not None and offset >= stop:
            return
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            _bad_line(path, lineno, offset, f"invalid JSON ({err.msg}); line skipped", counts)
            continue
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            kind = type(value).__name__
            what = "no" if value is None else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} in the"
            _bad_line(path, lineno, offset, f"{what} {field!r} field (task.text.text_field); line skipped", counts)
            continue
        if value.strip():
            yield offset, end, value


def _parquet_documents(path: Path, field: str, start: int) -> Iterator[tuple[int, int, str]]:
    """Offsets are row numbers; a start past row 0 skips whole row groups unread."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingPackage(
            f"reading {path} needs pyarrow: pip install pyarrow (or pip install alignkit[hub])"
        ) from None
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (no text)")
    parquet = pq.ParquetFile(path)
    if field not in parquet.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (task.text.text_field); columns: {parquet.schema_arrow.names}")
    group = row = 0
    while group < parquet.num_row_groups and row + parquet.metadata.row_group(group).num_rows <= start:
        row += parquet.metadata.row_group(group).num_rows
        group += 1
    groups = range(group, parquet.num_row_groups)
    for batch in parquet.iter_batches(batch_size=1024, columns=[field], row_groups=groups) if groups else ():
        for value in batch.column(0).to_pylist():
            if row >= start and isinstance(value, str) and value.strip():
                yield row, row + 1, value
            row += 1


@dataclass(frozen=True)
class Piece:
    """What one reader reads of one file: the documents that start at an offset in
    ``[start, stop)`` (``stop`` None: to the end). Offsets are bytes (of the decompressed stream
    for ``.zst``), rows for ``.parquet``."""

    path: Path
    start: int = 0
    stop: int | None = None


def split_files(paths: Sequence[Path], sizes: Sequence[int], readers: int) -> list[list[Piece]]:
    """Each reader's pieces of ``paths`` (``sizes`` bytes), a pure function of the two: reader
    ``r`` gets the documents that start in bytes ``[r*T//R, (r+1)*T//R)`` of the files laid end
    to end (``T`` bytes, ``R`` readers), so the readers read about equal bytes, each document is
    read by exactly one, and a reader opens only its own files. A plain ``.jsonl`` is cut where
    a boundary falls inside it (its reader enters mid-line and starts at the next line); a file
    that cannot be entered at a byte (``.zst``: no random access; ``.txt``: documents span lines;
    ``.parquet``) goes whole to the reader whose range holds its first byte."""
    total = sum(sizes)
    bounds = [r * total // readers for r in range(readers + 1)]
    plan: list[list[Piece]] = [[] for _ in range(readers)]
    at = 0
    for path, size in zip(paths, sizes):
        if path.name.endswith(".jsonl"):
            for r in range(readers):
                lo, hi = max(bounds[r], at), min(bounds[r + 1], at + size)
                if lo < hi:
                    plan[r].append(Piece(path, lo - at, hi - at if hi < at + size else None))
        else:
            plan[min(bisect.bisect_right(bounds, at), readers) - 1].append(Piece(path))
        at += size
    return plan


def piece_documents(piece: Piece, text_field: str = "text") -> Iterator[tuple[int, int, str]]:
    """``(offset, offset after it, text)`` of the documents of ``piece`` in order, streamed
    (format chosen by suffix; unknown = .txt). A whole file without text raises, naming it."""
    path = piece.path
    if path.name.endswith((".jsonl", ".jsonl.zst")):
        docs, empty = _jsonl_documents(path, text_field, piece.start, piece.stop), f"no text in field {text_field!r}"
    elif path.suffix == ".parquet":  # (only a .jsonl piece has a stop: see split_files)
        docs, empty = _parquet_documents(path, text_field, piece.start), f"no text in column {text_field!r}"
    else:
        docs, empty = _txt_documents(path, piece.start), "file is empty (no text)"
    found = False
    for doc in docs:
        found = True
        yield doc
    if not found and piece.start == 0 and piece.stop is None:
        raise DataError(f"{path}: {empty}")


def read_documents(paths: Iterable[Path], text_field: str = "text",
                   truncated: list[dict[str, Any]] | None = None) -> Iterator[str]:
    """Documents of local text files in order, streamed (format chosen by suffix; unknown = .txt).
    A truncated ``.zst`` raises, unless ``truncated`` is given: then its documents before the cut
    are kept, with a warning, and ``{"file", "offset"}`` is appended to ``truncated``."""
    for path in paths:
        try:
            yield from (text for _, _, text in piece_documents(Piece(path), text_field))
        except TruncatedInput as err:
            if truncated is None:
                raise
            warnings.warn(f"{path}: TRUNCATED at byte {err.offset}: only the documents before the cut are used "
                          "(--allow-truncated; recorded in manifest.json as `truncated`)", UserWarning, stacklevel=2)
            truncated.append({"file": str(path), "offset": err.offset})


def source_documents(cfg: TextDataConfig, split: str = "train",
                     truncated: list[dict[str, Any]] | None = None) -> Iterator[tuple[str, str]]:
    """``(held-out key, text)`` of every document of ``cfg``'s source in order, streamed.
    ``split``: ``train`` (train_path / hf_split) or ``eval`` (eval_path / hf_eval_split). Local
    paths are resolved now, so a missing one is reported before any training starts.
    ``truncated``: see :func:`read_documents`."""
    if cfg.source == "builtin":
        return iter(builtin_documents())
    if cfg.source == "files":
        key = "train_path" if split == "train" else "eval_path"
        paths = resolve_paths(getattr(cfg, key), key, TEXT_SUFFIXES)
        return ((t, t) for t in read_documents(paths, cfg.text_field, truncated))
    if cfg.source == "hf":
        return ((t, t) for t in _hf_documents(cfg, cfg.hf_split if split == "train" else cfg.hf_eval_split))
    raise DataError(f"task.text.source={cfg.source!r} has no documents")


def builtin_documents(max_bytes: int = BUILTIN_MAX_BYTES) -> list[tuple[str, str]]:
    """The offline corpus: ``(relative path, source text)`` of the stdlib's ``.py`` files in
    sorted order, stopping once ``max_bytes`` is reached."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[tuple[str, str]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _BUILTIN_SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                text = path.read_bytes().decode("utf-8", errors="replace")
            except OSError:
                continue
            if not text.strip():
                continue
            docs.append((path.relative_to(root).as_posix(), text))
            total += len(text)
            if total >= max_bytes:
                return docs
    if not docs:
        raise MissingFile(f"no .py sources found under the stdlib directory {root}")
    return docs


def _hf_documents(cfg: TextDataConfig, split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise MissingPackage(
            "task.text.source='hf' needs the `datasets` package: pip install alignkit[hub]"
        ) from None
    if not cfg.hf_name:
        raise DataError("task.text.source='hf' needs task.text.hf_name (a hub dataset id or local path)")
    if not os.path.exists(cfg.hf_name):
        hub.offline()  # looks for the hub once: unreachable means cached-only loads, not a minute of retries
    try:
        ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, split=split, streaming=cfg.streaming)
    except ConnectionError:
        if not hub.offline():
            raise
        raise DataError(hub.not_reachable("task.text.hf_name", cfg.hf_name, (
            "use raw text files (task.text.source=files task.text.train_path=... task.text.eval_path=...) "
            "or the built-in corpus (task.preset=builtin)"))) from None
    for record in ds:
        if cfg.text_field not in record:
            raise DataError(f"{cfg.hf_name}[{split}]: no {cfg.text_field!r} field (task.text.text_field)")
        text = record[cfg.text_field]
        if isinstance(text, str) and text.strip():
            yield text


def mapped_npy(path: Path) -> np.ndarray:
    """``path`` memory-mapped; a damaged header is one :class:`DataError` naming the file."""
    try:
        return np.load(path, mmap_mode="r")
    except Exception as err:  # numpy's header parser raises ValueError, SyntaxError, tokenize errors, ...
        raise DataError(f"{path}: not a readable .npy shard ({type(err).__name__}: {' '.join(str(err).split())})") from None


def load_token_shards(spec: str, key: str, dtype: str) -> list[np.ndarray]:
    arrays = []
    for path in resolve_paths(spec, key, TOKEN_SUFFIXES):
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty (no tokens)")
        if path.suffix not in (".npy", ".bin"):
            raise DataError(f"{path}: token shards must be .npy or .bin (task.text.{key})")
        try:
            arr = mapped_npy(path) if path.suffix == ".npy" else np.memmap(path, dtype=np.dtype(dtype), mode="r")
        except (ValueError, OSError) as err:  # .bin size not a multiple of the dtype
            raise DataError(f"{path}: not a readable token shard ({err}; task.text.token_dtype={dtype})") from None
        if not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"{path}: token shard has dtype {arr.dtype}, not an integer type")
        arr = arr.reshape(-1)
        if arr.size == 0:
            raise DataError(f"{path}: file is empty (no tokens)")
        arrays.append(arr)
    return arrays


__all__ = [
    "TEXT_SUFFIXES",
    "TOKEN_SUFFIXES",
    "BUILTIN_MAX_BYTES",
    "resolve_paths",
    "read_documents",
    "Piece",
    "split_files",
    "piece_documents",
    "source_documents",
    "builtin_documents",
    "is_heldout",
    "holdout_stream",
    "needs_holdout",
    "load_token_shards",
    "mapped_npy",
    "TextDataConfig",
    "SOURCES",
]
