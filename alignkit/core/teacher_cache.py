"""The teacher-feature cache (``align.teacher_cache: DIR``): a sweep runs the same teacher on the
same batches again and again; the first run records what the engine asks of the teacher, later
runs replay it and never run the teacher.

:class:`CachedTeacher` is a :class:`~alignkit.core.adapter.TeacherAdapter` around a teacher.
Its folder ``DIR/<kind>-<fingerprint>/`` is keyed on the teacher: its config (typed options,
dtype, final layer; not the preset name), the identity of its weight files (path, size and
modification time: no file is read, so a fully cached run never loads the teacher) or, for a
teacher without weight files (``source: config``, a hub id), a hash of its weights in memory;
the cache dtype, the device type and the torch version. Inside, each ``run(batch, layers,
logits)`` is keyed on the content of every tensor of the batch (what the teacher can read:
``input_ids``, ``teacher_input_ids``, ``x``, masks, ...), hashed from its host copy
(:func:`~alignkit.core.adapter.host_tensors`), and the autocast state, and stores each layer and
the logits under their own names, so a run asking other layers reuses what is there.
A different data order, tokenizer, batch size or sequence length therefore misses, and a miss
runs the real teacher (built on the first miss if it was not built) and records its outputs:
a cache can be incomplete, never wrong. A replay onto a GPU goes through pinned memory and does
not block the host.

On disk: ``manifest.json`` (the key, and what the engine asks of a teacher before any batch:
``num_layers``, the width of each layer, ``logits_kind``) and ``shard-r<rank>-<writer>-<n>.safetensors``
files, each written to a temporary name and renamed, every :data:`SHARD_CALLS` batches or
:data:`SHARD_BYTES` bytes, at release and at exit. The set of shards is the index: a run killed
mid-way leaves the shards it finished, and concurrent runs (or ranks) write shards of their own
names, so they never collide and each picks up the other's finished shards on a miss.

Integrity: each shard carries a BLAKE2b digest of its tensors (names, dtypes, shapes, bytes) in
its safetensors metadata, checked the first time a run replays from it (once per shard per run);
a shard that is unreadable, fails the check or has none (an older alignkit's) is skipped with a
warning naming it, and its batches run the teacher, as a miss does. The manifest carries the
digest of its own content; a damaged one is rebuilt from the teacher, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from alignkit.core.adapter import Batch, TeacherAdapter, host_tensors
from alignkit.core.checkpoint import kept_rng
from alignkit.core.errors import ConfigError

__all__ = ["CachedTeacher", "open_cached_teacher", "file_identity"]

FORMAT = 1
SHARD_CALLS = 32  # batches per shard (at most)
SHARD_BYTES = 256 << 20  # bytes per shard (at most, but one batch)
MANIFEST = "manifest.json"
CHECKSUM = "blake2b"  # the key of a shard's digest in its safetensors metadata (and of the manifest's)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _update(hasher: Any, name: str, tensor: Tensor) -> None:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # a copy only for a tensor not on the host
    hasher.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
    hasher.update(flat.view(torch.uint8).numpy().tobytes())


def digest(tensors: Iterable[tuple[str, Tensor]], extra: str = "") -> str:
    """A content hash of named tensors (names, dtypes, shapes and bytes), plus ``extra``."""
    hasher = hashlib.blake2b(extra.encode(), digest_size=16)
    for name, tensor in tensors:
        _update(hasher, name, tensor)
    return hasher.hexdigest()


def file_identity(path: Path) -> dict[str, Any]:
    """What identifies a weights file without reading it (a rewrite changes the modification time)."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _weights_digest(teacher: Any, label: str) -> str:
    model = getattr(teacher, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"align.teacher_cache: teacher {label!r} ({type(teacher).__name__}) has no weight files and "
                          "no .model to hash, so the cache cannot be keyed on its weights; run it without the cache")
    return digest(sorted(model.state_dict().items(), key=lambda kv: kv[0]))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _say(message: str) -> None:
    many = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    print(f"{f'[rank {_rank()}] ' if many else ''}teacher cache: {message}", file=sys.stderr, flush=True)


class _Shards:
    """The stored tensors of one teacher folder: the finished shards (read through memory maps)
    and this writer's buffer."""

    def __init__(self, folder: Path, dtype: torch.dtype) -> None:
        self.folder, self.dtype = folder, dtype
        self.writer = f"r{_rank()}-{os.getpid()}-{os.urandom(4).hex()}"
        self.where: dict[str, Path] = {}
        self.handles: dict[Path, Any] = {}
        self.verified: set[Path] = set()  # shards whose digest matched in this run
        self.buffer: dict[str, Tensor] = {}
        self.buffered_calls, self.buffered_bytes, self.written = 0, 0, 0
        self.failed = False
        self.scan()

    def scan(self) -> None:
        """Index the finished shards not seen yet (ours and other writers')."""
        for path in sorted(self.folder.glob("shard-*.safetensors")):
            if path not in self.handles:
                try:
                    self.handles[path] = safe_open(str(path), framework="pt")
                except (OSError, SafetensorError) as err:  # damaged on disk: its batches run the teacher again
                    warnings.warn(f"teacher cache: skipping unreadable {path}: {err}", stacklevel=2)
                    self.handles[path] = None
                    continue
                self.where.update(dict.fromkeys(self.handles[path].keys(), path))

    def entries(self) -> int:
        return len({name.split("/")[0] for name in self.where})

    def get(self, names: Sequence[str]) -> dict[str, Tensor] | None:
        if not all(name in self.buffer or name in self.where for name in names):
            return None
        if not all(self._intact(path) for path in {self.where[n] for n in names if n not in self.buffer}):
            return self.get(names)  # a damaged shard left the index: another may hold the names
        return {name: self.buffer[name] if name in self.buffer else self.handles[self.where[name]].get_tensor(name)
                for name in names}

    def _intact(self, path: Path) -> bool:
        """Whether ``path``'s tensors match the digest written with them (checked once per run);
        a shard that does not is dropped from the index, with a warning naming it."""
        if path in self.verified:
            return True
        handle = self.handles[path]
        try:
            stored = (handle.metadata() or {}).get(CHECKSUM)
            found = digest((name, handle.get_tensor(name)) for name in sorted(handle.keys())) if stored else None
        except (OSError, SafetensorError, RuntimeError, ValueError) as err:  # a damaged header or data offsets
            stored, found = "", f"unreadable ({err})"
        if stored and found == stored:
            self.verified.add(path)
            return True
        problem = "has no checksum (an older alignkit wrote it)" if stored is None else "fails its checksum (damaged)"
        warnings.warn(f"teacher cache: skipping {path}: it {problem}; its batches run the teacher again", stacklevel=4)
        self.handles[path] = None
        self.where = {}
        for kept, other in sorted(self.handles.items()):
            if other is not None:
                self.where.update(dict.fromkeys(other.keys(), kept))
        return False

    def put(self, tensors: Mapping[str, Tensor]) -> int:
        """Buffer one batch's tensors (in the cache dtype); returns their size in bytes."""
        if self.failed:
            return 0
        stored = {name: t.detach().to("cpu", self.dtype, copy=True).contiguous() for name, t in tensors.items()}
        size = sum(t.numel() * t.element_size() for t in stored.values())
        self.buffer.update(stored)
        self.buffered_calls, self.buffered_bytes = self.buffered_calls + 1, self.buffered_bytes + size
        if self.buffered_calls >= SHARD_CALLS or self.buffered_bytes >= SHARD_BYTES:
            self.flush()
        return size

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"shard-{self.writer}-{self.written:05d}.safetensors"
        temporary = self.folder / f".tmp-{name}"
        try:
            save_file(self.buffer, str(temporary), metadata={CHECKSUM: digest(sorted(self.buffer.items()))})
            os.chmod(temporary, 0o644)  # shared like the run folders (safetensors writes 0600)
            os.replace(temporary, self.folder / name)  # readers only ever see finished shards
        except (OSError, SafetensorError) as err:  # a full disk costs the recording, never the run
            warnings.warn(f"teacher cache: cannot write {self.folder / name} ({err}); recording stops", stacklevel=2)
            temporary.unlink(missing_ok=True)
            self.failed = True
        self.written += 1
        self.buffer, self.buffered_calls, self.buffered_bytes = {}, 0, 0
        self.scan()

    def close(self) -> None:
        self.flush()
        self.handles.clear()


def _replayed(tensor: Tensor, device: torch.device) -> Tensor:
    """A stored tensor on ``device``: to a GPU from pinned memory, without blocking (a copy from
    pageable memory holds the host until it is done); on the host as it is, with no copy."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class CachedTeacher:
    """Replays ``build()``'s teacher from ``folder`` and runs (and records) it only for what the
    cache lacks. ``teacher`` is the teacher when it was already built; ``layout`` (from the
    manifest) answers ``num_layers``, ``width`` and ``logits_kind`` without building it."""

    def __init__(self, *, folder: Path, layout: Mapping[str, Any], build: Callable[[], TeacherAdapter],
                 teacher: TeacherAdapter | None, dtype: torch.dtype, device: torch.device, label: str) -> None:
        self.folder, self.label, self.device = folder, label, torch.device(device)
        self.num_layers: int = layout["num_layers"]
        self.logits_kind: str | None = layout["logits_kind"]
        self._widths = {int(layer): width for layer, width in layout["widths"].items()}
        self._build, self._teacher = build, teacher
        self._shards = _Shards(folder, dtype)
        self._finalizer = weakref.finalize(self, self._shards.close)  # an interrupted run keeps its batches
        self.calls = self.replayed = 0  # batches the teacher ran / batches replayed
        self.expected_calls = 0  # set by the chain from the terms' stops: the size estimate
        self.released = False

    def width(self, layer: int) -> int:
        return self._widths[layer]

    def run(self, batch: Batch, layers: Sequence[int], logits: bool = False) -> tuple[dict[int, Tensor], Tensor | None]:
        dtype = torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type) else None
        # hashed on the host (the trainer's batches carry their host copy): no copy back from the device
        entry = digest(sorted(host_tensors(batch).items(), key=lambda kv: kv[0]), f"autocast={dtype}")
        names = {layer: f"{entry}/{layer}" for layer in layers}
        if logits:
            names["logits"] = f"{entry}/logits"
        found = self._shards.get(list(names.values()))
        if found is None:
            self._shards.scan()  # a concurrent run may have recorded it meanwhile
            found = self._shards.get(list(names.values()))
        if found is not None:
            self.replayed += 1
            out = {key: _replayed(found[name], self.device) for key, name in names.items()}
            return {layer: out[layer] for layer in layers}, out.get("logits")
        if self.calls == 0:
            _say(f"teacher {self.label!r}: a batch is not cached in {self.folder} ({self._shards.entries()} batches are); "
                 "running the teacher and recording what is missing")
        features, teacher_logits = self._live().run(batch, list(layers), logits=logits)
        self.calls += 1
        size = self._shards.put({names[k]: v for k, v in [*features.items(), ("logits", teacher_logits)] if k in names})
        if self.calls == 1:
            _say(f"teacher {self.label!r}: {_size(size)} per batch; up to {_size(size * self.expected_calls)} for the "
                 f"{self.expected_calls} batches it is active (written in shards to {self.folder})")
        return features, teacher_logits

    def _live(self) -> TeacherAdapter:
        if self._teacher is None:
            with kept_rng():  # building it mid-run must not move the student's random streams
                self._teacher = self._build()
        return self._teacher

    def release(self) -> None:
        """Write what is buffered, say what was replayed, and free the teacher if it was built."""
        self._finalizer()
        if self.calls or self.replayed:
            _say(f"teacher {self.label!r}: replayed {self.replayed} of {self.replayed + self.calls} batches from "
                 f"{self.folder}, ran the teacher for {self.calls}")
        teacher, self._teacher, self.released = self._teacher, None, True
        release = getattr(teacher, "release", None)
        if release is not None:
            release()


def _layout(teacher: TeacherAdapter) -> dict[str, Any]:
    layers = [-1, *range(teacher.num_layers + 1)]
    return {"num_layers": teacher.num_layers, "logits_kind": getattr(teacher, "logits_kind", None),
            "widths": {str(layer): teacher.width(layer) for layer in layers}}


def _manifest_digest(content: Mapping[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(content, sort_keys=True).encode(), digest_size=16).hexdigest()


def _stored_layout(manifest: Path) -> dict[str, Any] | None:
    """The layout a manifest holds, or None when there is none or it is damaged (with a warning)."""
    if not manifest.is_file():
        return None
    try:
        content = json.loads(manifest.read_text())
        stored = content.pop(CHECKSUM, None)
        if stored != _manifest_digest(content):
            raise ValueError("no checksum (an older alignkit wrote it)" if stored is None else "checksum mismatch")
        return {key: content[key] for key in ("num_layers", "logits_kind", "widths")}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        warnings.warn(f"teacher cache: {manifest} is damaged ({err}); rebuilding it from the teacher", stacklevel=3)
        return None


def open_cached_teacher(root: Path, *, config: Mapping[str, Any], weight_files: Sequence[Path],
                        build: Callable[[], TeacherAdapter], dtype: str, device: torch.device,
                        label: str) -> CachedTeacher:
    """The cached teacher for ``config`` (a JSON-able description of the teacher) in ``root``.
    With ``weight_files`` the key is their identity, and a teacher whose manifest exists is not
    built until a batch misses; without, the teacher is built now and its weights hashed."""
    teacher = None
    if weight_files:
        weights: Any = [file_identity(Path(p)) for p in weight_files]
    else:
        teacher = build()
        weights = _weights_digest(teacher, label)
    key = {"format": FORMAT, "teacher": dict(config), "weights": weights, "cache_dtype": dtype,
           "device": torch.device(device).type, "torch": torch.__version__}
    text = json.dumps(key, sort_keys=True, default=str)
    folder = Path(root) / f"{config.get('kind', 'teacher')}-{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"
    manifest = folder / MANIFEST
    layout = _stored_layout(manifest)
    if layout is None:
        teacher = teacher or build()
        layout = _layout(teacher)
        content = {**layout, "key": json.loads(text)}
        temporary = folder / f".tmp-{os.getpid()}-{MANIFEST}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps({**content, CHECKSUM: _manifest_digest(content)}, indent=2))
            os.replace(temporary, manifest)  # concurrent writers write the same content
        except OSError as err:
            raise ConfigError(f"align.teacher_cache={root}: cannot write {folder} ({err.strerror})") from None
    return CachedTeacher(folder=folder, layout=layout, build=build, teacher=teacher, dtype=DTYPES[dtype],
                         device=device, label=label)
