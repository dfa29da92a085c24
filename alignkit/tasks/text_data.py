"""Text data for LLM pretraining: tokenize, pack, shard, resume (documents come from
:mod:`alignkit.tasks.text_sources`).

Sources (``TextDataConfig.source``): ``builtin`` (the stdlib's ``.py`` sources, offline),
``files`` (local ``.txt`` / ``.jsonl`` / ``.jsonl.zst`` / ``.parquet``), ``hf`` (Hugging Face
``datasets``) and ``tokens`` (a folder written by ``alignkit prepare``, or ``.npy`` / ``.bin``
shards: :mod:`alignkit.tasks.token_shards`); formats, path rules and bad-data handling (missing
paths, empty files, non-UTF-8 bytes, corrupt lines) are described in
:mod:`alignkit.tasks.text_sources`. ``files`` / ``hf`` with ``streaming: true`` are tokenized on
the fly in bounded memory by :mod:`alignkit.tasks.text_stream`; otherwise (and for ``builtin``)
the train split is tokenized in memory here.

Held-out split: ``eval_path`` if given (``hf_eval_split`` for hf), else a deterministic
``eval_fraction`` of the documents chosen by a hash of the document's text (of its path for
builtin) -- independent of ``seed`` and of document order, so eval sets stay comparable across
runs and duplicates never straddle the split. For token shards the last ``eval_fraction`` of the
sequences is held out.

Packing: documents are tokenized without special tokens, each followed by the tokenizer's EOS,
concatenated into one stream and cut into ``seq_len`` chunks; the tail that does not fill a
chunk is dropped. Batches: ``input_ids`` [B, S] long and ``labels`` = ``input_ids`` (the
student shifts); no ``attention_mask``: every position of a packed sequence is real, and an
all-ones mask would make the models check it on the host at every forward.

Tokenizer mismatch (the paper's LET-dagger): when a teacher
tokenizer different from the student's is given, the packed stream keeps each token's character
span, each student sequence's text is re-tokenized with the teacher tokenizer (teacher EOS at
the same document boundaries), padded/truncated to ``ceil(teacher_seq_ratio * seq_len)``, and
``teacher_index`` pairs every student position with the teacher token whose span ends last at
or before the student token's end (-1 if none) -- see :func:`match_teacher_positions`.
"""
from __future__ import annotations

import bisect
import json
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from alignkit.core.config import above, at_least, between, checked, one_of
from alignkit.core.errors import DataError
from alignkit.tasks.text_sources import (
    BUILTIN_MAX_BYTES,
    _doc_hash,
    builtin_documents,
    is_heldout,
    read_documents,
    resolve_paths,
    source_documents,
)

SOURCES = ("builtin", "files", "hf", "tokens")
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")
_PROGRESS_MIN_CHARS = 2_000_000  # show a tqdm bar only when tokenization takes noticeable time
_ENCODE_CHUNK_CHARS = 1_000_000
_ENCODE_CHUNK_DOCS = 1024
PREFETCH = 2  # teacher-side batches built ahead of the step under a tokenizer mismatch


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
    streaming: bool = False  # files / hf: tokenize on the fly in bounded memory (text_stream)
    token_dtype: str = checked("uint16", one_of("uint8", "uint16", "int16", "uint32", "int32", "int64"))  # dtype of raw .bin shards
    eval_batches: int = checked(20, at_least(1))  # max eval batches (per rank, = global eval batches)
    max_train_docs: int = checked(0, at_least(0))  # 0 = all
    seed: int = 0
    teacher_seq_ratio: float = checked(1.5, above(0))  # teacher length = ceil(ratio * seq_len) under tokenizer mismatch


# --------------------------------------------------------------------------------------------
# Tokenizer-mismatch mapping
# --------------------------------------------------------------------------------------------


def match_teacher_positions(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> list[int]:
    """For each student token (character end offset), the index of the teacher token whose span
    ends last at or before it; -1 where no teacher token has ended yet.

    Both lists are end offsets in the same character coordinates; ``teacher_ends`` must be
    sorted (non-decreasing). Ties pick the last such teacher token (e.g. the final byte-piece of
    a multi-byte character). A teacher token never "reads ahead" of its student token.
    """
    for a, b in zip(teacher_ends, teacher_ends[1:]):
        if b < a:
            raise ValueError("teacher_ends must be sorted (non-decreasing)")
    return [bisect.bisect_right(teacher_ends, e) - 1 for e in student_ends]


# --------------------------------------------------------------------------------------------
# Tokenizer wrapper: HF tokenizers (fast or slow) and raw `tokenizers.Tokenizer` objects
# --------------------------------------------------------------------------------------------


class _Encoder:
    """Uniform batched encoding (ids, optional char offsets) without special tokens."""

    def __init__(self, tok: Any, role: str = "tokenizer") -> None:
        self.tok = tok
        self.role = role
        backend = None
        try:
            import tokenizers

            if isinstance(tok, tokenizers.Tokenizer):
                backend = tok
        except ImportError:  # pragma: no cover - tokenizers is a dependency
            pass
        if backend is None:
            backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None and (backend.truncation is not None or backend.padding is not None):
            # A tokenizer.json may carry truncation/padding; packing needs whole documents.
            import tokenizers

            backend = tokenizers.Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        self.backend = backend
        self.is_raw = backend is tok
        self.eos_id = self._eos_id()
        pad = None if self.is_raw else getattr(tok, "pad_token_id", None)
        if pad is None and self.is_raw:
            pad = next((tok.token_to_id(n) for n in _PAD_CANDIDATES if tok.token_to_id(n) is not None), None)
        self.pad_id = int(pad) if pad is not None else self.eos_id
        if self.is_raw:
            self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        else:
            self.vocab_size = len(tok)

    def _eos_id(self) -> int:
        if not self.is_raw:
            for attr in ("eos_token_id", "sep_token_id"):
                value = getattr(self.tok, attr, None)
                if value is not None:
                    return int(value)
        else:
            for name in _EOS_CANDIDATES:
                value = self.tok.token_to_id(name)
                if value is not None:
                    return int(value)
        raise DataError(
            f"the {self.role} has no EOS token (needed to separate packed documents); set "
            f"tokenizer.eos_token, or for a raw tokenizers.Tokenizer add one of {list(_EOS_CANDIDATES)}"
        )

    def fingerprint(self) -> str:
        if self.backend is not None:
            body = self.backend.to_str()
        else:
            body = json.dumps(sorted(self.tok.get_vocab().items()))
        return f"{body}|eos={self.eos_id}"

    def encode(self, texts: list[str], offsets: bool) -> list[tuple[list[int], list[tuple[int, int]] | None]]:
        if self.backend is not None:
            encs = self.backend.encode_batch(texts, add_special_tokens=False)
            return [(e.ids, e.offsets if offsets else None) for e in encs]
        if offsets:
            raise DataError(
                f"the {self.role} is a slow (Python) tokenizer; tokenizer-mismatch alignment needs "
                "character offsets: load a fast tokenizer (use_fast=True)"
            )
        out = self.tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [(list(ids), None) for ids in out]


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


def _split_documents(
    keyed: Iterable[tuple[str, str]], cfg: TextDataConfig, need_eval: bool
) -> tuple[list[str], list[str]]:
    """Hash-split (key, text) pairs into train / eval lists (the in-memory path)."""
    train: list[tuple[float, str]] = []
    heldout: list[tuple[float, str]] = []
    for held, h, text in holdout_stream(keyed, cfg, need_eval):
        (heldout if held else train).append((h, text))
    if need_eval and cfg.eval_fraction > 0 and not heldout and len(train) >= 2:
        # A tiny corpus where no hash fell under the fraction: hold out the lowest-hash doc.
        i = min(range(len(train)), key=lambda k: train[k][0])
        heldout.append(train.pop(i))
    return [t for _, t in train], [t for _, t in heldout]


# --------------------------------------------------------------------------------------------
# Token streams
# --------------------------------------------------------------------------------------------


class _Stream:
    """A read-only 1-D token stream over one or more arrays (memmaps allowed), sliceable
    across array boundaries without loading everything."""

    def __init__(self, arrays: list[np.ndarray], start: int = 0, stop: int | None = None) -> None:
        self.arrays = arrays
        self.bounds = np.cumsum([0] + [len(a) for a in arrays])
        self.start = start
        self.stop = int(self.bounds[-1]) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def view(self, start: int, stop: int) -> "_Stream":
        return _Stream(self.arrays, self.start + start, self.start + stop)

    def get(self, a: int, b: int) -> np.ndarray:
        a, b = a + self.start, b + self.start
        parts = []
        k = int(np.searchsorted(self.bounds, a, side="right")) - 1
        while a < b:
            lo = a - int(self.bounds[k])
            take = min(b, int(self.bounds[k + 1])) - a
            parts.append(np.asarray(self.arrays[k][lo : lo + take]))
            a += take
            k += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class _Packer:
    """Tokenizes documents into one EOS-separated stream; optionally keeps char spans."""

    def __init__(self, encoder: _Encoder, keep_spans: bool) -> None:
        self.encoder = encoder
        self.keep_spans = keep_spans
        self.dtype = np.uint16 if encoder.vocab_size <= 65536 else np.int32
        self._ids: list[np.ndarray] = []
        self._doc: list[np.ndarray] = []
        self._start: list[np.ndarray] = []
        self._end: list[np.ndarray] = []
        self.texts: list[str] = []
        self.num_tokens = 0
        self._frozen: tuple[np.ndarray, ...] | None = None

    def add(self, docs: list[str], progress: Any = None) -> None:
        eos = self.encoder.eos_id
        for chunk in _chunks(docs):
            for text, (ids, offsets) in zip(chunk, self.encoder.encode(chunk, self.keep_spans)):
                if not ids:
                    continue
                self._ids.append(np.asarray(list(ids) + [eos], dtype=self.dtype))
                if self.keep_spans:
                    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
                    self._doc.append(np.full(len(ids) + 1, len(self.texts), dtype=np.int32))
                    self._doc[-1][-1] = -1  # the EOS belongs to no document
                    self._start.append(np.append(spans[:, 0], 0))
                    self._end.append(np.append(spans[:, 1], 0))
                    self.texts.append(text)
                self.num_tokens += len(ids) + 1
            if progress is not None:
                progress.update(len(chunk))
        self._frozen = None

    def arrays(self) -> tuple[np.ndarray, ...]:
        if self._frozen is None:
            cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dtype=dt)  # noqa: E731
            self._frozen = (
                cat(self._ids, self.dtype),
                cat(self._doc, np.int32),
                cat(self._start, np.int64),
                cat(self._end, np.int64),
            )
            # Keep one concatenated copy instead of the per-document pieces.
            self._ids = [self._frozen[0]]
            if self.keep_spans:
                self._doc, self._start, self._end = [self._frozen[1]], [self._frozen[2]], [self._frozen[3]]
        return self._frozen


def _chunks(docs: list[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= _ENCODE_CHUNK_CHARS or len(chunk) >= _ENCODE_CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _Split:
    """One split as fixed-length sequences: token stream (+ char spans when aligning)."""

    def __init__(self, stream: _Stream, seq_len: int, packer: _Packer | None = None) -> None:
        self.stream = stream
        self.seq_len = seq_len
        self.packer = packer

    @property
    def num_sequences(self) -> int:
        return len(self.stream) // self.seq_len

    def tokens(self, i: int) -> np.ndarray:
        return self.stream.get(i * self.seq_len, (i + 1) * self.seq_len)


class _LazyEvalSplit(_Split):
    """Held-out text tokenized only as far as eval needs (eval_batches x global batch)."""

    def __init__(self, docs: Iterable[str], packer: _Packer, seq_len: int) -> None:
        self._docs = iter(docs)
        self._exhausted = False
        super().__init__(_Stream([np.zeros(0, dtype=packer.dtype)]), seq_len, packer)

    def ensure(self, num_sequences: int) -> None:
        assert self.packer is not None
        need = num_sequences * self.seq_len
        grew = False
        while self.packer.num_tokens < need and not self._exhausted:
            batch = []
            for doc in self._docs:
                batch.append(doc)
                if len(batch) >= 256:
                    break
            if not batch:
                self._exhausted = True
                break
            self.packer.add(batch)
            grew = True
        if grew or len(self.stream) != self.packer.num_tokens:
            self.stream = _Stream([self.packer.arrays()[0]])


# --------------------------------------------------------------------------------------------
# TextData
# --------------------------------------------------------------------------------------------


class TextData:
    """Packed, sharded, resumable train stream and a deterministic held-out split.

    Sharding: within each global batch ``g`` of ``B * world_size`` sequences (in this epoch's
    shuffled global order), rank ``r`` takes items ``[g*B*W + r*B, g*B*W + (r+1)*B)``, so W
    processes with micro batch B see exactly what one process with batch ``B*W`` sees. Each
    epoch's order is a permutation seeded by ``(seed, epoch)``; the incomplete last global batch
    of an epoch is skipped so every rank steps together.

    The position lives on this object (shared by every iterator it hands out) and advances when
    a batch is yielded: ``state_dict()`` after k batches resumes at batch k+1. It is global (the
    same on every rank). The epoch length and the held-out set follow the process count of the
    run's first start, saved with the position (``layout_world_size``): a run resumed on another
    number of processes reads the same sequences in the same steps (a pass may then span two
    epochs) and evaluates the same ones.
    """

    def __init__(
        self,
        train: _Split,
        eval_split: _Split | None,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        max_eval_batches: int = 20,
        student: _Encoder | None = None,
        teacher: _Encoder | None = None,
        teacher_seq_len: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in [0, world_size={world_size})")
        self.train = train
        self.eval_split = eval_split
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.max_eval_batches = max_eval_batches
        self.student = student
        self.teacher = teacher
        self.teacher_needed = True  # False once the teacher is freed
        self.teacher_seq_len = teacher_seq_len
        self._epoch = 0
        self._offset = 0  # sequences of this epoch's global order already consumed
        self._layout_world_size = world_size  # the run's first start's (load_state_dict)
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._eval_cache: dict[int, list[dict[str, torch.Tensor]]] = {}

    # -- sizes -------------------------------------------------------------------------------
    @property
    def num_train_sequences(self) -> int:
        return self.train.num_sequences

    @property
    def num_train_tokens(self) -> int:
        """Tokens served per epoch before the global-batch remainder (num_sequences x seq_len)."""
        return self.num_train_sequences * self.seq_len

    def release_teacher(self) -> None:
        """The teacher was freed (``align.stop_step``): stop building its side of the batches."""
        self.teacher_needed = False

    @property
    def aligns_teacher(self) -> bool:
        """True when batches carry teacher_input_ids / teacher_index (tokenizer mismatch)."""
        return self.teacher is not None

    def train_sequence(self, i: int) -> np.ndarray:
        """The i-th packed train sequence in stream (unshuffled) order."""
        return np.asarray(self.train.tokens(i))

    # -- training stream -----------------------------------------------------------------------
    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order_cache = (epoch, rng.permutation(self.num_train_sequences))
        return self._order_cache[1]

    def _epoch_length(self, micro_batch_size: int) -> int:
        """Sequences read per epoch: whole passes of the run's first start (the rest is skipped)."""
        layout_pass = micro_batch_size * self._layout_world_size
        return self.num_train_sequences // layout_pass * layout_pass

    def train_batches(self, micro_batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Infinite stream of this rank's micro-batches, resuming at the saved position."""
        b = int(micro_batch_size)
        g = b * self.world_size
        n = self.num_train_sequences
        if b < 1:
            raise DataError(f"micro_batch_size={micro_batch_size} must be >= 1")
        if n < max(g, b * self._layout_world_size):
            raise DataError(
                f"train split has {n} sequences of {self.seq_len} tokens; one global batch needs "
                f"{g} (micro batch {b} x world size {self.world_size}): use more data or smaller batches"
            )
        return self._train_batches(b)

    def _train_batches(self, b: int) -> Iterator[dict[str, torch.Tensor]]:
        g, length = b * self.world_size, self._epoch_length(b)

        def upcoming(epoch: int, offset: int) -> Iterator[tuple[list[int], tuple[int, int]]]:
            """Batch indices with the position after each (self's position = what was served);
            positions run over the epochs back to back."""
            position = epoch * length + offset
            while True:
                first = position + self.rank * b
                indices = [int(self._order(p // length)[p % length]) for p in range(first, first + b)]
                position += g
                yield indices, divmod(position, length)

        if self.teacher is None:
            for idx, (self._epoch, self._offset) in upcoming(self._epoch, self._offset):
                yield self._make_batch(self.train, idx)
            return
        # under a tokenizer mismatch the teacher's re-tokenization of each batch runs in a
        # worker thread, PREFETCH batches ahead, so the training step does not wait for it
        with ThreadPoolExecutor(1, thread_name_prefix="teacher-tokens") as pool:
            ahead: deque[tuple[Future, tuple[int, int]]] = deque()
            for idx, position in upcoming(self._epoch, self._offset):
                ahead.append((pool.submit(self._make_batch, self.train, idx), position))
                if len(ahead) > PREFETCH:
                    future, (self._epoch, self._offset) = ahead.popleft()
                    yield future.result()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self._epoch,
            "offset": self._offset,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_train_sequences": self.num_train_sequences,
            "layout_world_size": self._layout_world_size,
        }

    def resharded_state(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """The position for this rank of a new process count, from every saved rank's state:
        the position is global, so the ranks saved the same one (a state older than its
        ``layout_world_size`` was written by the run's first process count)."""
        if any(state != states[0] for state in states):
            raise DataError("the saved ranks' data positions differ: resume on the run's own number of processes")
        return {"layout_world_size": len(states), **states[0]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "seq_len", "num_train_sequences"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DataError(
                    f"data state was saved with {key}={state[key]} but this data has "
                    f"{key}={getattr(self, key)}: the stream would not resume exactly"
                )
        self._epoch = int(state["epoch"])
        self._offset = int(state["offset"])
        # an older state has none: it is resumed on the process count it was written with
        self._layout_world_size = int(state.get("layout_world_size", self.world_size))

    # -- eval ----------------------------------------------------------------------------------
    def eval_batches(self, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
        """This rank's held-out micro-batches: sequences in stream order, at most
        ``max_eval_batches`` global batches of the run's first start, sharded like training; [] when
        there is no held-out split. Resumed on a process count that does not divide them, the
        ranks left one micro-batch short get a padding batch without labels (every rank runs as
        many forwards, as FSDP needs), so the evaluated sequences are always the same."""
        b = int(micro_batch_size)
        if b in self._eval_cache:
            return self._eval_cache[b]
        if self.eval_split is None or self.max_eval_batches <= 0:
            return []
        g = b * self._layout_world_size
        if isinstance(self.eval_split, _LazyEvalSplit):
            self.eval_split.ensure(self.max_eval_batches * g)
        m = self.eval_split.num_sequences
        n_batches = min(self.max_eval_batches, m // g)
        if n_batches == 0:
            raise DataError(
                f"eval split has {m} sequences of {self.seq_len} tokens; one global eval batch "
                f"needs {g} (micro batch {b} x world size {self._layout_world_size}): raise "
                "task.text.eval_fraction, give task.text.eval_path, or set task.text.eval_fraction=0 to disable eval"
            )
        micro_batches = n_batches * g // b
        batches = [self._make_batch(self.eval_split, list(range(j * b, (j + 1) * b)))
                   for j in range(self.rank, micro_batches, self.world_size)]
        if len(batches) < -(-micro_batches // self.world_size):
            padding = self._make_batch(self.eval_split, list(range(b)))
            padding["labels"].fill_(-100)
            batches.append(padding)
        self._eval_cache[b] = batches
        return batches

    # -- batch assembly ------------------------------------------------------------------------
    def _make_batch(self, split: _Split, indices: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.stack([split.tokens(i) for i in indices]).astype(np.int64))
        batch = {"input_ids": ids, "labels": ids.clone()}  # packed: no padding, no mask
        if self.teacher is not None and self.teacher_needed:
            stored = getattr(split, "teacher_fields", None)  # prepared shards carry them precomputed
            batch.update(stored(indices) if stored is not None else self._teacher_fields(split, indices))
        return batch

    def _teacher_fields(self, split: _Split, indices: list[int]) -> dict[str, torch.Tensor]:
        assert split.packer is not None and self.teacher is not None
        _, docs, starts, ends = split.packer.arrays()
        texts = split.packer.texts
        s = self.seq_len
        # Per sequence: segments of consecutive same-document tokens, and EOS tokens. Both
        # tokenizers are laid on one "virtual" character axis: the segment texts back to back,
        # each EOS one character wide, so student and teacher end offsets are comparable.
        seg_texts: list[str] = []
        plans: list[list[tuple[str, int, int]]] = []  # (kind, base, seg_id) per segment
        student_ends: list[list[int]] = []
        for i in indices:
            d, st, en = docs[i * s : (i + 1) * s], starts[i * s : (i + 1) * s], ends[i * s : (i + 1) * s]
            cursor, plan, s_ends = 0, [], []
            p = 0
            while p < s:
                if d[p] < 0:
                    plan.append(("eos", cursor, -1))
                    cursor += 1
                    s_ends.append(cursor)
                    p += 1
                    continue
                q = p
                while q < s and d[q] == d[p]:
                    q += 1
                lo, hi = int(st[p]), int(en[q - 1])
                hi = max(hi, lo)
                plan.append(("text", cursor, len(seg_texts)))
                seg_texts.append(texts[int(d[p])][lo:hi])
                s_ends.extend(cursor + int(e) - lo for e in en[p:q])
                cursor += hi - lo
                p = q
            plans.append(plan)
            student_ends.append(s_ends)
        encoded = self.teacher.encode(seg_texts, offsets=True) if seg_texts else []
        st_len = self.teacher_seq_len
        t_ids = torch.full((len(indices), st_len), self.teacher.pad_id, dtype=torch.long)
        t_mask = torch.zeros((len(indices), st_len), dtype=torch.long)
        t_index = torch.empty((len(indices), s), dtype=torch.long)
        for row, (plan, s_ends) in enumerate(zip(plans, student_ends)):
            ids_row: list[int] = []
            ends_row: list[int] = []
            for kind, base, seg in plan:
                if kind == "eos":
                    ids_row.append(self.teacher.eos_id)
                    ends_row.append(base + 1)
                else:
                    seg_ids, seg_offsets = encoded[seg]
                    ids_row.extend(seg_ids)
                    ends_row.extend(base + e for _, e in seg_offsets)  # type: ignore[union-attr]
            # Offsets of a normalizing tokenizer can (rarely) step back; keep the axis monotone.
            ends_row = list(np.maximum.accumulate(ends_row)) if ends_row else []
            match = match_teacher_positions(s_ends, ends_row)
            kept = min(len(ids_row), st_len)
            t_ids[row, :kept] = torch.tensor(ids_row[:kept], dtype=torch.long)
            t_mask[row, :kept] = 1
            # A match beyond the truncated teacher length is unmatched, not re-pointed earlier.
            t_index[row] = torch.tensor([j if j < st_len else -1 for j in match], dtype=torch.long)
        return {"teacher_input_ids": t_ids, "teacher_attention_mask": t_mask, "teacher_index": t_index}


# --------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------


def _same_tokenizer(a: _Encoder, b: _Encoder) -> bool:
    return a.tok is b.tok or a.fingerprint() == b.fingerprint()


def needs_holdout(cfg: TextDataConfig) -> bool:
    """True when the eval split is carved from the train source by document hash."""
    return not cfg.eval_path and not (cfg.source == "hf" and cfg.hf_eval_split)


def eval_documents(cfg: TextDataConfig) -> Iterator[str]:
    """The held-out documents, streamed: the hash-selected ones of the train source, or the
    separate eval source (eval_path / hf_eval_split)."""
    if needs_holdout(cfg):
        return (t for held, _, t in holdout_stream(source_documents(cfg), cfg, True) if held)
    return (t for _, t in source_documents(cfg, "eval"))


def teacher_encoder(student: _Encoder, teacher_tokenizer: Any) -> _Encoder | None:
    """The teacher's encoder when its tokenizer differs from the student's, else None."""
    if teacher_tokenizer is None:
        return None
    candidate = _Encoder(teacher_tokenizer, "teacher tokenizer")
    if _same_tokenizer(student, candidate):
        return None
    if student.backend is None:
        student.encode(["x"], offsets=True)  # raises the clear "needs a fast tokenizer"
    return candidate


def build_text_data(
    cfg: TextDataConfig,
    tokenizer: Any,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    teacher_tokenizer: Any = None,
) -> TextData:
    """Load, split, tokenize and pack ``cfg``'s data for ``seq_len``-token sequences.

    ``tokenizer``: a Hugging Face tokenizer or a raw ``tokenizers.Tokenizer`` (may be None for
    ``source='tokens'``). ``teacher_tokenizer``: when given and different from ``tokenizer``,
    batches also carry ``teacher_input_ids``, ``teacher_attention_mask`` and ``teacher_index``.
    ``streaming`` files / hf sources go to :mod:`alignkit.tasks.text_stream` (bounded memory).
    """
    if cfg.source not in SOURCES:
        raise DataError(f"task.text.source={cfg.source!r} must be one of {SOURCES}")
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len} must be >= 1")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise DataError(f"task.text.eval_fraction={cfg.eval_fraction} must be in [0, 1)")
    common = dict(rank=rank, world_size=world_size, seed=cfg.seed, max_eval_batches=cfg.eval_batches)

    if cfg.source == "tokens":
        from alignkit.tasks.token_shards import build_token_data

        return build_token_data(cfg, tokenizer, teacher_tokenizer, seq_len, **common)

    if tokenizer is None:
        raise DataError(f"task.text.source={cfg.source!r} needs a tokenizer")
    student = _Encoder(tokenizer, "student tokenizer")
    teacher = teacher_encoder(student, teacher_tokenizer)
    keep_spans = teacher is not None
    teacher_len = max(1, math.ceil(cfg.teacher_seq_ratio * seq_len)) if teacher is not None else 0
    where = {"builtin": "builtin corpus", "files": f"task.text.train_path={cfg.train_path!r}",
             "hf": f"{cfg.hf_name}[{cfg.hf_split}]"}[cfg.source]
    if cfg.streaming and cfg.source != "builtin":
        from alignkit.tasks.text_stream import StreamingTextData

        eval_split = None
        if cfg.eval_fraction > 0 or not needs_holdout(cfg):
            eval_split = _LazyEvalSplit(eval_documents(cfg), _Packer(student, keep_spans), seq_len)
        return StreamingTextData(cfg, where, eval_split, seq_len, student=student, teacher=teacher,
                                 teacher_seq_len=teacher_len, **common)

    # In memory: the train list is tokenized at once; the eval iterable lazily.
    need_holdout = needs_holdout(cfg)
    train_docs, heldout = _split_documents(source_documents(cfg), cfg, need_eval=need_holdout)
    eval_docs: Iterable[str] | None = (heldout or None) if need_holdout else eval_documents(cfg)
    if not train_docs:
        raise DataError(f"{where}: no training documents (all held out or empty)")

    packer = _Packer(student, keep_spans)
    total_chars = sum(len(d) for d in train_docs)
    progress = None
    if rank == 0 and total_chars >= _PROGRESS_MIN_CHARS:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(train_docs), desc="tokenizing train docs", unit="doc")
    try:
        packer.add(train_docs, progress)
    finally:
        if progress is not None:
            progress.close()
    ids = packer.arrays()[0]
    if len(ids) < seq_len:
        raise DataError(
            f"{where}: the train corpus gives {len(ids)} tokens (with EOS separators), fewer than "
            f"one sequence of seq_len={seq_len}: add data or lower seq_len"
        )
    if not keep_spans:
        del train_docs
    train_split = _Split(_Stream([ids]), seq_len, packer)
    eval_split = _LazyEvalSplit(eval_docs, _Packer(student, keep_spans), seq_len) if eval_docs is not None else None
    return TextData(
        train_split, eval_split, seq_len, student=student, teacher=teacher,
        teacher_seq_len=teacher_len, **common,
    )


__all__ = [
    "TextDataConfig",
    "TextData",
    "build_text_data",
    "match_teacher_positions",
    "builtin_documents",
    "read_documents",
    "resolve_paths",
    "is_heldout",
    "BUILTIN_MAX_BYTES",
]
