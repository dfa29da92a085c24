"""Training straight from a streamed text source (``streaming: true`` with ``files`` or ``hf``) in
bounded memory: no split is ever materialised.

Train documents (the source in order, held-out ones skipped) are dealt to ranks by their index
(train document ``t`` goes to rank ``t % world_size``); a background thread reads this rank's
documents ``chunk_docs`` at a time, tokenizes them into one packed EOS-separated stream and cuts
it into micro-batches of consecutive ``seq_len`` sequences (with the teacher's fields when its
tokenizer differs), staying at most ``prefetch`` batches ahead of the step. Memory is bounded by
one chunk of documents plus ``prefetch + 1`` batches of tokens, whatever the corpus size. At the
end of the source the stream starts the next epoch (no shuffling: the source's order is the
order; shuffle a corpus when preparing it, or use ``alignkit prepare`` and ``source: tokens``).

Position (``state_dict``, per rank): the epoch, the train-document index of the next unserved
token and how many of that document's tokens were already served. Resume re-reads the source
up to that document (without tokenizing) and continues with exactly the batches an
uninterrupted run would have produced.
"""
from __future__ import annotations

import atexit
import itertools
import queue
import threading
from collections import deque
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import numpy as np
import torch

from alignkit.core.errors import DataError
from alignkit.tasks.text_data import TextData, TextDataConfig, _Split, _Stream, holdout_stream, needs_holdout
from alignkit.tasks.text_sources import source_documents

CHUNK_DOCS = 256
PREFETCH = 4


class StreamingTextData(TextData):
    """:class:`TextData` whose train stream is tokenized on the fly (see the module docstring);
    the held-out split is the lazily tokenized one of :class:`TextData`."""

    def __init__(
        self,
        cfg: TextDataConfig,
        where: str,
        eval_split: _Split | None,
        seq_len: int,
        *,
        documents: Callable[[], Iterator[str]] | None = None,
        chunk_docs: int = CHUNK_DOCS,
        prefetch: int = PREFETCH,
        **kwargs: Any,
    ) -> None:
        super().__init__(None, eval_split, seq_len, **kwargs)  # type: ignore[arg-type]
        self.where = where
        holdout = needs_holdout(cfg)
        self._documents = documents or (
            lambda: (t for held, _, t in holdout_stream(source_documents(cfg), cfg, holdout) if not held)
        )
        self.chunk_docs, self.prefetch = chunk_docs, prefetch
        self._pos = {"epoch": 0, "doc": 0, "skip": 0}
        self._stop: threading.Event | None = None

    @property
    def num_train_sequences(self) -> int:
        raise TypeError(f"{self.where}: a streamed source has no known length")

    # -- position ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {**self._pos, "seq_len": self.seq_len, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seq_len", "world_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise DataError(
                    f"data state was saved with {key}={state[key]} but this stream has "
                    f"{key}={getattr(self, key)}: the stream would not resume exactly"
                )
        if "doc" not in state:
            raise DataError("data state is not a streamed position (was the run trained from another source?)")
        self._close()
        self._pos = {k: int(state[k]) for k in ("epoch", "doc", "skip")}

    # -- stream ------------------------------------------------------------------------------
    def train_batches(self, micro_batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Infinite stream of this rank's micro-batches from the saved position on."""
        if int(micro_batch_size) < 1:
            raise DataError(f"micro_batch_size={micro_batch_size} must be >= 1")
        self._close()
        stop = self._stop = threading.Event()
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        producer = threading.Thread(
            target=self._produce, args=(int(micro_batch_size), dict(self._pos), ready, stop), daemon=True
        )
        producer.start()

        def close() -> None:  # also at exit, so the thread is not torn down mid-batch
            stop.set()
            producer.join()

        atexit.register(close)
        try:
            while True:
                batch, pos = ready.get()
                if isinstance(batch, BaseException):
                    raise batch
                self._pos = pos
                yield batch
        finally:
            close()
            atexit.unregister(close)

    def _close(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _rank_documents(self, start: int) -> Iterator[tuple[int, str]]:
        for t, text in enumerate(self._documents()):
            if t >= start and t % self.world_size == self.rank:
                yield t, text

    def _produce(self, micro: int, pos: dict[str, int], ready: queue.Queue, stop: threading.Event) -> None:
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for item in self._batches(micro, pos):
                if not put(item):
                    return
        except BaseException as err:  # handed to the training loop, which raises it
            put((err, None))

    def _batches(self, micro: int, pos: dict[str, int]) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, int]]]:
        need = micro * self.seq_len
        spans = self.teacher is not None
        epoch, next_doc = pos["epoch"], pos["doc"]
        first = next_doc  # where this pass over the source started (0 after a wrap)
        docs = self._rank_documents(next_doc)
        buffer = PackedBuffer(self.student.eos_id, spans, skip=pos["skip"])
        epoch_tokens = 0
        while True:
            while buffer.available() < need:
                chunk = list(itertools.islice(docs, self.chunk_docs))
                if not chunk:
                    if epoch_tokens == 0 and first == 0:
                        raise DataError(f"{self.where}: no training documents for rank {self.rank} "
                                         f"of {self.world_size} (all held out or empty)")
                    epoch, next_doc, epoch_tokens, first = epoch + 1, 0, 0, 0
                    docs = self._rank_documents(0)
                    continue
                for (t, text), (ids, offsets) in zip(chunk, self.student.encode([c[1] for c in chunk], spans)):
                    next_doc = t + 1
                    epoch_tokens += buffer.add((epoch, t), ids, offsets, text)
            batch = self._make_batch(buffer.cut(need, self.seq_len), list(range(micro)))
            head = buffer.head()
            yield batch, {"epoch": head[0][0], "doc": head[0][1], "skip": head[1]} if head else \
                {"epoch": epoch, "doc": next_doc, "skip": 0}


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

    def cut(self, n: int, seq_len: int) -> _Split:
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
        return _Split(_Stream([ids]), seq_len, packer)  # type: ignore[arg-type]
