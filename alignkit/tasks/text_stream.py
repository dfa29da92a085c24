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
                raise ValueError(
                    f"data state was saved with {key}={state[key]} but this stream has "
                    f"{key}={getattr(self, key)}: the stream would not resume exactly"
                )
        if "doc" not in state:
            raise ValueError("data state is not a streamed position (was the run trained from another source?)")
        self._close()
        self._pos = {k: int(state[k]) for k in ("epoch", "doc", "skip")}

    # -- stream ------------------------------------------------------------------------------
    def train_batches(self, micro_batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Infinite stream of this rank's micro-batches from the saved position on."""
        if int(micro_batch_size) < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
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
        epoch, next_doc, skip = pos["epoch"], pos["doc"], pos["skip"]
        first = next_doc  # where this pass over the source started (0 after a wrap)
        docs = self._rank_documents(next_doc)
        pieces: deque = deque()  # [doc index, ids, starts, ends, text] per buffered document
        buffered = -skip
        epoch_tokens = 0
        while True:
            while buffered < need:
                chunk = list(itertools.islice(docs, self.chunk_docs))
                if not chunk:
                    if epoch_tokens == 0 and first == 0:
                        raise ValueError(f"{self.where}: no training documents for rank {self.rank} "
                                         f"of {self.world_size} (all held out or empty)")
                    epoch, next_doc, epoch_tokens, first = epoch + 1, 0, 0, 0
                    docs = self._rank_documents(0)
                    continue
                for (t, text), (ids, offsets) in zip(chunk, self.student.encode([c[1] for c in chunk], spans)):
                    next_doc = t + 1
                    if ids:
                        span = np.asarray(offsets, dtype=np.int64).reshape(-1, 2) if spans else None
                        pieces.append((epoch, t, np.asarray(list(ids) + [self.student.eos_id], dtype=np.int64),
                                       span, text if spans else None))
                        buffered += len(ids) + 1
                        epoch_tokens += len(ids) + 1
            rows: list[tuple[int, int, int]] = []  # (piece, lo, hi) slices making up the batch
            taken = 0
            k = 0
            while taken < need:
                length = len(pieces[k][2])
                lo = skip if k == 0 else 0
                hi = min(length, lo + need - taken)
                rows.append((k, lo, hi))
                taken += hi - lo
                k += 1
            batch = self._assemble(micro, [(pieces[k], lo, hi) for k, lo, hi in rows])
            k, lo, hi = rows[-1]
            for _ in range(k):
                pieces.popleft()
            skip = hi
            if skip == len(pieces[0][2]):
                pieces.popleft()
                skip = 0
            buffered -= need
            head = (pieces[0][0], pieces[0][1]) if pieces else (epoch, next_doc)
            yield batch, {"epoch": head[0], "doc": head[1], "skip": skip}

    def _assemble(self, micro: int, parts: list[tuple[tuple, int, int]]) -> dict[str, torch.Tensor]:
        ids = np.concatenate([piece[2][lo:hi] for piece, lo, hi in parts])
        packer = None
        if self.teacher is not None:
            # What _teacher_fields reads from a packer: per token its document (-1: EOS) and span.
            doc, start, end = [], [], []
            for local, (piece, lo, hi) in enumerate(parts):
                span = np.vstack([piece[3], np.zeros((1, 2), dtype=np.int64)])[lo:hi]
                d = np.full(hi - lo, local, dtype=np.int32)
                if hi == len(piece[2]):
                    d[-1] = -1
                doc.append(d)
                start.append(span[:, 0])
                end.append(span[:, 1])
            arrays = (ids, np.concatenate(doc), np.concatenate(start), np.concatenate(end))
            packer = SimpleNamespace(arrays=lambda: arrays, texts=[piece[4] for piece, _, _ in parts])
        return self._make_batch(_Split(_Stream([ids]), self.seq_len, packer), list(range(micro)))  # type: ignore[arg-type]
