"""What a prepared token folder promises, and how a run checks it: the ``manifest.json`` format,
one BLAKE2b checksum per shard file (written by ``alignkit prepare`` as the bytes go to disk),
the manifest's validation and digest, and shard arrays that verify their file before first use.

Cost: a shard is hashed once per run, on the first batch that reads it (hashlib's BLAKE2b runs
at several hundred MB/s per core: about 0.1 s for a default 64 MB shard), and its size is
checked when the run starts, so a missing or truncated shard stops the run before step 1.

A manifest of format ``alignkit-tokens/1`` has no checksums; it is refused (prepare again):
data that cannot be verified is exactly what this module exists to rule out, and preparing
again costs minutes where a run on silently changed data costs its whole budget.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.core.errors import DataError
from alignkit.tasks.text_packing import Encoder
from alignkit.tasks.text_sources import mapped_npy

FORMAT = "alignkit-tokens/2"
CHECKSUM = "blake2b"  # the hash named in each shard's manifest entry
_READ_BYTES = 1 << 22


def new_hasher() -> Any:
    """The shard checksum's hash object (one place, so that a benchmark can measure its cost)."""
    return hashlib.blake2b(digest_size=16)


def tokenizer_fingerprint(encoder: Encoder) -> str:
    """A short hash of the tokenizer's full definition (vocab, merges, normalizer, EOS)."""
    return hashlib.sha256(encoder.fingerprint().encode()).hexdigest()[:16]


class HashingFile:
    """A binary file that hashes what is written to it (``np.save`` writes through it)."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.hasher, self.size = handle, new_hasher(), 0

    def write(self, data: Any) -> int:
        self.hasher.update(data)
        self.size += memoryview(data).nbytes
        return self.handle.write(data)

    def entry(self, name: str) -> dict[str, Any]:
        """The manifest entry of the file written: name, size and checksum."""
        return {"name": name, "bytes": self.size, CHECKSUM: self.hasher.hexdigest()}


def file_checksum(path: Path) -> str:
    hasher = new_hasher()
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def _again(path: Path) -> str:
    return f"run alignkit prepare again into a new folder (or restore {path.parent})"


def read_manifest(path: Path) -> tuple[dict[str, Any], str]:
    """The validated manifest of a prepared folder and the digest of its bytes (kept in a run's
    data state, so a resume on other shards is refused). Every problem is one :class:`DataError`."""
    try:
        raw = path.read_bytes()
        manifest = json.loads(raw)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable manifest ({err}): {_again(path)}") from None
    settings = manifest.get("settings") if isinstance(manifest, dict) else None
    found = settings.get("format") if isinstance(settings, dict) else None
    if found == "alignkit-tokens/1":
        raise DataError(f"{path}: prepared by an older alignkit without shard checksums, so its shards cannot be "
                        f"verified: {_again(path)}")
    if found != FORMAT:
        raise DataError(f"{path}: format {found!r}, expected {FORMAT!r}: {_again(path)}")
    try:
        for name, stream in manifest["splits"].items():
            files = stream["files"]
            if len(files) != stream["shards"] or not all(f["name"] == shard_name(name, i) and f["bytes"] >= 0
                                                          and isinstance(f[CHECKSUM], str) for i, f in enumerate(files)):
                raise ValueError(f"the shard list of {name!r} does not match its count")
            np.dtype(stream["dtype"])
            if stream["shards"] != -(-int(stream["tokens"]) // int(settings["shard_tokens"])):
                raise ValueError(f"{name!r}: {stream['shards']} shards do not hold {stream['tokens']} tokens")
        _ = settings["tokenizer"]["fingerprint"], settings["teacher"]  # read when the folder is opened
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as err:
        raise DataError(f"{path}: not a complete manifest ({type(err).__name__}: {err}): {_again(path)}") from None
    return manifest, hashlib.blake2b(raw, digest_size=16).hexdigest()


def shard_name(stream: str, index: int) -> str:
    return f"{stream}_{index:05d}.npy"


class VerifiedShard:
    """One shard of a prepared stream, read through a memory map once its file matched the
    manifest's checksum (checked on first access, once; thread-safe, as the teacher-side batches
    of a tokenizer mismatch are built in a worker thread). Its size, header, shape and dtype are
    checked when it is made, so the stream's length is right before any data is read."""

    def __init__(self, folder: Path, entry: dict[str, Any], length: int, dtype: str) -> None:
        self.path, self.entry, self.length = folder / entry["name"], entry, length
        self._array: np.ndarray | None = None
        self._lock = threading.Lock()
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{self.path}: missing (listed in {folder / 'manifest.json'}): {_again(self.path)}") from None
        if size != entry["bytes"]:
            raise DataError(f"{self.path}: {size} bytes, but manifest.json says {entry['bytes']} (truncated or "
                            f"replaced since alignkit prepare wrote it): {_again(self.path)}")
        try:
            self._mapped = mapped_npy(self.path)
        except DataError as err:
            raise DataError(f"{err}: {_again(self.path)}") from None
        if self._mapped.shape != (length,) or self._mapped.dtype != np.dtype(dtype):
            raise DataError(f"{self.path}: holds {self._mapped.dtype}{list(self._mapped.shape)}, manifest.json says "
                            f"{dtype}[{length}]: {_again(self.path)}")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: Any) -> np.ndarray:
        if self._array is None:
            with self._lock:
                if self._array is None:
                    self._array = self._verified()
        return self._array[index]

    def _verified(self) -> np.ndarray:
        if file_checksum(self.path) != self.entry[CHECKSUM]:
            raise DataError(f"{self.path}: checksum mismatch (its bytes changed since alignkit prepare wrote them): "
                            f"{_again(self.path)}")
        return self._mapped


def stream_shards(folder: Path, manifest: dict[str, Any], name: str) -> list[VerifiedShard]:
    """The verified shards of stream ``name``: every shard holds ``shard_tokens`` tokens, the
    last the rest."""
    stream, size = manifest["splits"][name], int(manifest["settings"]["shard_tokens"])
    total = int(stream["tokens"])
    return [VerifiedShard(folder, entry, min(size, total - i * size), stream["dtype"])
            for i, entry in enumerate(stream["files"])]
