"""Document sources for :mod:`alignkit.tasks.text_data`: resolve paths, read local text files,
the builtin stdlib corpus, Hugging Face datasets and pre-tokenized shards, and decide the
hash-based held-out split of a document.

Sources (``TextDataConfig.source``):

``builtin``  the running Python's standard-library ``.py`` sources (no download): a sorted,
             deterministic file list (site-packages, tests and caches excluded), one file per
             document, capped at ``BUILTIN_MAX_BYTES``; held-out split by a hash of the path.
``files``    local ``.txt`` / ``.jsonl`` / ``.parquet`` (a file, a directory or a glob).
             ``.txt``: one document per block of lines separated by blank (whitespace-only)
             lines -- for WikiText that makes each paragraph and each `` = Heading = `` line a
             document, which is harmless for packing and gives the held-out split many units.
             ``.jsonl``: one document per line, ``text_field``. ``.parquet``: ``text_field``
             column (needs pyarrow).
``hf``       Hugging Face ``datasets`` (``pip install alignkit[hub]``), streaming by default.
``tokens``   pre-tokenized shards: ``.npy`` (``np.load(mmap_mode="r")``) or raw ``.bin``
             (``np.memmap``, ``token_dtype``), read in file order as one token stream that is
             assumed to already contain document separators.

Held-out decision (:func:`is_heldout`): a document is held out when a SHA-1 hash of its key (the
text; the path for builtin) falls under ``eval_fraction`` -- independent of seed and order.

Bad data: a missing path raises FileNotFoundError naming the path and the config key; an
empty file (or one with no text) raises ValueError naming the file; **non-UTF-8 bytes are
decoded with U+FFFD replacement and a warning naming the file is issued once per file** (one
stray byte in a large crawl should not kill a run, but it should not pass silently either).
"""
from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
import re
import sysconfig
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from alignkit.core.errors import DataError, MissingFile, MissingPackage

if TYPE_CHECKING:
    from alignkit.tasks.text_data import TextDataConfig

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKEN_SUFFIXES = (".npy", ".bin")
BUILTIN_MAX_BYTES = 20_000_000  # ~20 MB of stdlib source: a few seconds of fast tokenization
_BUILTIN_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib"}
_warned_non_utf8: set[str] = set()


def _doc_hash(key: str) -> float:
    digest = hashlib.sha1(key.encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic held-out decision for a document key (path or text); seed-independent."""
    return fraction > 0 and _doc_hash(key) < fraction


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
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        if not files:
            raise MissingFile(
                f"task.text.{key}={spec!r}: directory holds no {'/'.join(suffixes)} files"
            )
        return files
    matches = sorted(Path(p) for p in _glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not matches:
        raise MissingFile(f"task.text.{key}={spec!r}: no such file or directory, and no glob match")
    return matches


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        text = raw.decode("utf-8", errors="replace")
        if str(path) not in _warned_non_utf8:
            _warned_non_utf8.add(str(path))
            warnings.warn(
                f"{path}: not valid UTF-8 ({err.reason} at byte {err.start}); undecodable bytes "
                "were replaced with U+FFFD",
                UserWarning,
                stacklevel=3,
            )
    if not text.strip():
        raise DataError(f"{path}: file is empty (no text)")
    return text


_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def _txt_documents(path: Path) -> list[str]:
    docs = [block.strip() for block in _BLANK_LINES.split(_read_text(path))]
    return [d for d in docs if d]


def _jsonl_documents(path: Path, field: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise DataError(f"{path}:{lineno}: no {field!r} field (task.text.text_field)")
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: field {field!r} is {type(value).__name__}, not a string")
        if value.strip():
            docs.append(value)
    if not docs:
        raise DataError(f"{path}: no text in field {field!r}")
    return docs


def _parquet_documents(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingPackage(
            f"reading {path} needs pyarrow: pip install pyarrow (or pip install alignkit[hub])"
        ) from None
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (no text)")
    schema = pq.read_schema(path)
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} (task.text.text_field); columns: {schema.names}")
    values = pq.read_table(path, columns=[field]).column(field).to_pylist()
    docs = [v for v in values if isinstance(v, str) and v.strip()]
    if not docs:
        raise DataError(f"{path}: no text in column {field!r}")
    return docs


def read_documents(paths: Iterable[Path], text_field: str = "text") -> Iterator[str]:
    """Documents of local text files in order (format chosen by suffix; unknown = .txt)."""
    for path in paths:
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        elif path.suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
        else:
            yield from _txt_documents(path)


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
    ds = datasets.load_dataset(cfg.hf_name, cfg.hf_config or None, split=split, streaming=cfg.streaming)
    for record in ds:
        if cfg.text_field not in record:
            raise DataError(f"{cfg.hf_name}[{split}]: no {cfg.text_field!r} field (task.text.text_field)")
        text = record[cfg.text_field]
        if isinstance(text, str) and text.strip():
            yield text


def _load_token_shards(spec: str, key: str, dtype: str) -> list[np.ndarray]:
    arrays = []
    for path in resolve_paths(spec, key, TOKEN_SUFFIXES):
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty (no tokens)")
        if path.suffix not in (".npy", ".bin"):
            raise DataError(f"{path}: token shards must be .npy or .bin (task.text.{key})")
        try:
            arr = np.load(path, mmap_mode="r") if path.suffix == ".npy" else np.memmap(path, dtype=np.dtype(dtype), mode="r")
        except (ValueError, OSError) as err:  # garbage .npy header, .bin size not a multiple of the dtype
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
    "builtin_documents",
    "is_heldout",
]
