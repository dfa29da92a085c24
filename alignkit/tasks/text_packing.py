"""The packing pieces the text data paths share (:mod:`alignkit.tasks.text_data` in memory,
:mod:`alignkit.tasks.text_stream` streamed, :mod:`alignkit.tasks.token_shards` prepared): the
tokenizer wrapper, the token stream and its fixed-length splits, the document packer, the
streamed packing buffer and the student-to-teacher position matching of a tokenizer mismatch.

Packing: documents are tokenized without special tokens, each followed by the tokenizer's EOS,
concatenated into one stream and cut into ``seq_len`` chunks; the tail that does not fill a
chunk is dropped.
"""
from __future__ import annotations

import bisect
import json
from collections import deque
from types import SimpleNamespace
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from alignkit.core.errors import DataError

_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")
ENCODE_CHUNK_CHARS = 1_000_000  # documents are encoded in chunks of this many characters
ENCODE_CHUNK_DOCS = 1024  # ... or this many documents, whichever comes first


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


class Encoder:
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


def _same_tokenizer(a: Encoder, b: Encoder) -> bool:
    return a.tok is b.tok or a.fingerprint() == b.fingerprint()



def teacher_encoder(student: Encoder, teacher_tokenizer: Any) -> Encoder | None:
    """The teacher's encoder when its tokenizer differs from the student's, else None."""
    if teacher_tokenizer is None:
        return None
    candidate = Encoder(teacher_tokenizer, "teacher tokenizer")
    if _same_tokenizer(student, candidate):
        return None
    if student.backend is None:
        student.encode(["x"], offsets=True)  # raises the clear "needs a fast tokenizer"
    return candidate



# --------------------------------------------------------------------------------------------
# Token streams
# --------------------------------------------------------------------------------------------


class TokenStream:
    """A read-only 1-D token stream over one or more arrays (memmaps allowed), sliceable
    across array boundaries without loading everything."""

    def __init__(self, arrays: list[np.ndarray], start: int = 0, stop: int | None = None) -> None:
        self.arrays = arrays
        self.bounds = np.cumsum([0] + [len(a) for a in arrays])
        self.start = start
        self.stop = int(self.bounds[-1]) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def view(self, start: int, stop: int) -> "TokenStream":
        return TokenStream(self.arrays, self.start + start, self.start + stop)

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


class Packer:
    """Tokenizes documents into one EOS-separated stream; optionally keeps char spans."""

    def __init__(self, encoder: Encoder, keep_spans: bool) -> None:
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
        if size >= ENCODE_CHUNK_CHARS or len(chunk) >= ENCODE_CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class Split:
    """One split as fixed-length sequences: token stream (+ char spans when aligning)."""

    def __init__(self, stream: TokenStream, seq_len: int, packer: Packer | None = None) -> None:
        self.stream = stream
        self.seq_len = seq_len
        self.packer = packer

    @property
    def num_sequences(self) -> int:
        return len(self.stream) // self.seq_len

    def tokens(self, i: int) -> np.ndarray:
        return self.stream.get(i * self.seq_len, (i + 1) * self.seq_len)


class LazyEvalSplit(Split):
    """Held-out text tokenized only as far as eval needs (eval_batches x global batch)."""

    def __init__(self, docs: Iterable[str], packer: Packer, seq_len: int) -> None:
        self._docs = iter(docs)
        self._exhausted = False
        super().__init__(TokenStream([np.zeros(0, dtype=packer.dtype)]), seq_len, packer)

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
            self.stream = TokenStream([self.packer.arrays()[0]])



class PackedBuffer:
    """Documents packed into one EOS-separated token stream and cut from the front. With
    ``spans``, each token keeps its character span and its document's text, which is what
    :meth:`TextData._teacher_fields` needs to build the teacher's side of a batch."""

    def __init__(self, eos_id: int, spans: bool, skip: int = 0) -> None:
        self.eos_id, self.spans = eos_id, spans
        self.pieces: deque = deque()  # (key, ids + EOS, spans [n, 2] or None, text or None)
        self.skip = skip  # tokens of the first piece already cut
        self.buffered = -skip

    def available(self) -> int:
        """Tokens not yet cut (negative until the document holding a resumed position arrives)."""
        return self.buffered

    def add(self, key: Any, ids: list[int], offsets: Any, text: str) -> int:
        """Append one document (``key`` identifies it in :meth:`head`); returns its token count."""
        if not ids:
            return 0
        span = np.asarray(offsets, dtype=np.int64).reshape(-1, 2) if self.spans else None
        self.pieces.append((key, np.asarray(list(ids) + [self.eos_id], dtype=np.int64), span,
                            text if self.spans else None))
        self.buffered += len(ids) + 1
        return len(ids) + 1

    def head(self) -> tuple[Any, int] | None:
        """(key of the document holding the next token, tokens of it already cut), or None."""
        return (self.pieces[0][0], self.skip) if self.pieces else None

    def cut(self, n: int, seq_len: int) -> Split:
        """The next ``n`` tokens (a multiple of ``seq_len``) as a split of ``n / seq_len`` rows."""
        parts: list[tuple[tuple, int, int]] = []
        taken = 0
        while taken < n:
            piece = self.pieces[0]
            hi = min(len(piece[1]), self.skip + n - taken)
            parts.append((piece, self.skip, hi))
            taken += hi - self.skip
            self.skip = hi
            if hi == len(piece[1]):
                self.pieces.popleft()
                self.skip = 0
        self.buffered -= n
        ids = np.concatenate([piece[1][lo:hi] for piece, lo, hi in parts])
        packer = None
        if self.spans:
            # What _teacher_fields reads from a packer: per token its document (-1: EOS) and span.
            doc, start, end = [], [], []
            for local, (piece, lo, hi) in enumerate(parts):
                span = np.vstack([piece[2], np.zeros((1, 2), dtype=np.int64)])[lo:hi]
                d = np.full(hi - lo, local, dtype=np.int32)
                if hi == len(piece[1]):
                    d[-1] = -1
                doc.append(d)
                start.append(span[:, 0])
                end.append(span[:, 1])
            arrays = (ids, np.concatenate(doc), np.concatenate(start), np.concatenate(end))
            packer = SimpleNamespace(arrays=lambda: arrays, texts=[piece[3] for piece, _, _ in parts])
        return Split(TokenStream([ids]), seq_len, packer)  # type: ignore[arg-type]
