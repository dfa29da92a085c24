"""Checkpoint integrity: checksums written at save time and verified before a file is parsed,
and a restricted unpickler for what ``torch.distributed.checkpoint`` (DCP) reads.

Every file of a checkpoint (weights, optimizer, rank files, callbacks' files, DCP shards, the
``model/`` export) gets its size and SHA-256 in ``manifest.json``. On resume the folder must
hold exactly those files with those checksums before anything in it is read, so a bit flip, a
truncation, a missing or an extra file makes the checkpoint be skipped (naming the file), never
loaded. Ranks share the hashing: rank r hashes every world-th file from the r-th.

Trust: the checksums find damage, not tampering (whoever can edit a checkpoint can rewrite its
manifest). What a checkpoint could run is bounded by the loaders instead: safetensors and JSON
hold no code, ``optimizer.pt`` is read with ``torch.load(weights_only=True)``, and DCP's
``.metadata`` pickle and its non-tensor items go through allowlisting unpicklers here (DCP
itself, in torch 2.13, unpickles both without restriction).
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.planner import ReadItem

from alignkit.core.errors import CheckpointError

MANIFEST = "manifest.json"
ALGORITHM = "sha256"  # hashlib.file_digest runs at ~1.3 GB/s here (BLAKE2b ~0.8 GB/s)
Digests = dict[str, list[Any]]  # relative path -> [size in bytes, hex digest]


def checkpoint_files(directory: Path) -> list[str]:
    """Every file under ``directory`` but the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != MANIFEST)


def digests(directory: Path, rank: int = 0, world_size: int = 1) -> Digests:
    """Size and checksum of this rank's share of ``directory``'s files."""
    found: Digests = {}
    for name in checkpoint_files(directory)[rank::world_size]:
        with open(directory / name, "rb") as handle:
            found[name] = [(directory / name).stat().st_size, hashlib.file_digest(handle, ALGORITHM).hexdigest()]
    return found


def write_manifest(directory: Path, shares: list[Digests]) -> None:
    files = {name: entry for share in shares for name, entry in share.items()}
    (directory / MANIFEST).write_text(json.dumps({"algorithm": ALGORITHM, "files": dict(sorted(files.items()))}, indent=1))


def verify(directory: Path, rank: int = 0, world_size: int = 1) -> bool:
    """Check this rank's share of ``directory`` against its manifest (False: it has none, as
    checkpoints written before checksums); raise :class:`CheckpointError` naming the first
    file that is missing, unexpected, a symlink, or not what was saved."""
    path = directory / MANIFEST
    if not path.exists():
        return False
    try:
        listed = json.loads(path.read_text())["files"]
        expected = {str(name): (int(size), str(digest)) for name, (size, digest) in listed.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path} is corrupt ({type(err).__name__}: {err})") from None
    present = checkpoint_files(directory)
    for name in sorted(set(expected) ^ set(present)):
        state = "missing" if name in expected else "not in the manifest"
        raise CheckpointError(f"{directory / name} is {state}")
    for name in present[rank::world_size]:
        file = directory / name
        if file.is_symlink():
            raise CheckpointError(f"{file} is a symlink (a checkpoint holds plain files only)")
        size, digest = expected[name]
        if file.stat().st_size != size:
            raise CheckpointError(f"{file} has {file.stat().st_size} bytes where {size} were saved (truncated?)")
        with open(file, "rb") as handle:
            if hashlib.file_digest(handle, ALGORITHM).hexdigest() != digest:
                raise CheckpointError(f"{file} fails its {ALGORITHM} checksum (damaged on disk)")
    return True


# --- DCP with restricted unpicklers ---------------------------------------------------------
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: only its own record classes, sizes, dtypes and layouts."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = ((module, name) in _METADATA_GLOBALS or module == dcp_metadata.__name__
                   or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


class RestrictedReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        with open(self._get_metadata_path(kwargs.get("rank")), "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class RestrictedPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor items (e.g. optimizer hyper-parameters) accepted only
    if ``torch.load(weights_only=True)`` accepts them (DCP loads them with ``weights_only=False``)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        data = value.read()
        torch.load(io.BytesIO(data), weights_only=True)  # raises on anything but plain data
        super().load_bytes(read_item, io.BytesIO(data))
