"""Training straight from a streamed text source (``streaming: true`` with ``files`` or ``hf``) in
bounded memory: no split is ever materialised.

Sharding (``files``): each rank reads only its own pieces of the file list
(:func:`~alignkit.tasks.text_sources.split_files`): the files laid end to end are cut into
``world_size`` equal byte ranges and rank ``r`` reads the documents that start in range ``r`` --
whole files where there are more files than ranks, byte ranges of one ``.jsonl`` where there are
fewer (``.jsonl.zst``, ``.txt`` and ``.parquet`` files are never cut: a rank left without a file
stops with an error). The assignment is a pure function of the file list, the file sizes and the
world size. There are no DataLoader workers: one background thread per rank reads. ``hf`` has no
files to split: every rank streams the whole source and keeps every ``world_size``-th document.
The held-out documents are skipped; ``max_train_docs`` caps each rank at its share of it.

A background thread reads this rank's documents ``chunk_docs`` at a time, tokenizes them into
one packed EOS-separated stream and cuts it into micro-batches of consecutive ``seq_len``
sequences (with the teacher's fields when its tokenizer differs), staying at most ``prefetch``
batches ahead of the step. Memory is bounded by one chunk of documents plus ``prefetch + 1``
batches of tokens, whatever the corpus size. At the end of its pieces the rank starts the next
epoch (no shuffling: the source's order is the order; shuffle a corpus when preparing it, or use
``alignkit prepare`` and ``source: tokens``).

Position (``state_dict``, per rank): the epoch, the piece and the offset in its file of the
document holding the next unserved token (bytes; decompressed bytes for ``.zst``; rows for
``.parquet``; the document index for ``hf``), this rank's train documents before it in the epoch
and how many of its tokens were already served. Resume opens that file and seeks to the offset
(``.zst``: decompresses up to it without splitting or parsing lines; ``hf``: re-streams up to
it), then continues with exactly the batches an uninterrupted run would have produced.
"""
from __future__ import annotations

import atexit
import hashlib
import itertools
import queue
import threading
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from alignkit.core.errors import DataError
from alignkit.tasks.text_batches import TextData
from alignkit.tasks.text_packing import PackedBuffer, Split
from alignkit.tasks.text_sources import (
    TEXT_SUFFIXES,
    Piece,
    TextDataConfig,
    is_heldout,
    needs_holdout,
    piece_documents,
    resolve_paths,
    source_documents,
    split_files,
)

CHUNK_DOCS = 256
PREFETCH = 4
_KEY = ("epoch", "piece", "offset", "doc")  # a document's place; the position adds "skip"

Reader = Callable[[Piece], Iterator[tuple[int, int, str]]]  # (offset, offset after, text) per document


class StreamingTextData(TextData):
    """:class:`TextData` whose train stream is tokenized on the fly (see the module docstring);
    the held-out split is the lazily tokenized one of :class:`TextData`."""

    def __init__(
        self,
        cfg: TextDataConfig,
        where: str,
        eval_split: Split | None,
        seq_len: int,
        *,
        chunk_docs: int = CHUNK_DOCS,
        prefetch: int = PREFETCH,
        **kwargs: Any,
    ) -> None:
        super().__init__(None, eval_split, seq_len, **kwargs)  # type: ignore[arg-type]
        self.where = where
        self.pieces, self._read, self.plan = _rank_plan(cfg, where, self.rank, self.world_size)
        self.holdout = cfg.eval_fraction if needs_holdout(cfg) else 0.0
        share, extra = divmod(cfg.max_train_docs, self.world_size)
        self.cap = share + (self.rank < extra) if cfg.max_train_docs else None
        self.chunk_docs, self.prefetch = chunk_docs, prefetch
        self._pos = {"epoch": 0, "piece": 0, "offset": 0, "doc": 0, "skip": 0}
        self._stop: threading.Event | None = None

    @property
    def num_train_sequences(self) -> int:
        raise TypeError(f"{self.where}: a streamed source has no known length")

    # -- position ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {**self._pos, "seq_len": self.seq_len, "world_size": self.world_size, "plan": self.plan}

    def resharded_state(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        raise DataError(f"{self.where}: a streamed source keeps a position per process, in its own share of the "
                        f"files: resume on the run's {len(states)} processes (or use task.text.source=tokens)")

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "doc" in state and "piece" not in state:
            raise DataError("data state is an older alignkit's streamed position (a document index, not a "
                            "file offset): it cannot be resumed by this version; start the data anew")
        if "piece" not in state:
            raise DataError("data state is not a streamed position (was the run trained from another source?)")
        for key, what in (("seq_len", "seq_len"), ("world_size", "world_size"), ("plan", "file list or sizes")):
            if int(state[key]) != getattr(self, key):
                raise DataError(f"data state was saved with another {what} ({key}={state[key]}, now "
                                f"{getattr(self, key)}): the stream would not resume exactly")
        self._close()
        self._pos = {k: int(state[k]) for k in (*_KEY, "skip")}

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

    def _rank_documents(self, pos: dict[str, int]) -> Iterator[tuple[tuple[int, ...], int, str]]:
        """This rank's train documents from ``pos`` on, to the end of its pieces: (key, offset
        after the document, text); a resumed read seeks to the offset in its piece."""
        epoch, offset, doc = pos["epoch"], pos["offset"], pos["doc"]
        for p in range(pos["piece"], len(self.pieces)):
            piece = self.pieces[p]
            for start, end, text in self._read(replace(piece, start=max(piece.start, offset))):
                if self.cap is not None and doc >= self.cap:
                    return
                if not is_heldout(text, self.holdout):
                    yield (epoch, p, start, doc), end, text
                    doc += 1
            offset = 0

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
        after = {k: pos[k] for k in _KEY}  # where the document after the last one read starts
        docs = self._rank_documents(after)
        buffer = PackedBuffer(self.student.eos_id, spans, skip=pos["skip"])
        epoch_tokens, first = 0, pos["doc"]  # first: where this pass over the pieces started
        while True:
            while buffer.available() < need:
                chunk = list(itertools.islice(docs, self.chunk_docs))
                if not chunk:
                    if epoch_tokens == 0 and first == 0:
                        raise DataError(f"{self.where}: no training documents for rank {self.rank} "
                                         f"of {self.world_size} (all held out or empty)")
                    after, epoch_tokens, first = {"epoch": after["epoch"] + 1, "piece": 0, "offset": 0, "doc": 0}, 0, 0
                    docs = self._rank_documents(after)
                    continue
                for (key, end, text), (ids, offsets) in zip(chunk, self.student.encode([c[2] for c in chunk], spans)):
                    after = {"epoch": key[0], "piece": key[1], "offset": end, "doc": key[3] + 1}
                    epoch_tokens += buffer.add(key, ids, offsets, text)
            batch = self._make_batch(buffer.cut(need, self.seq_len), list(range(micro)))
            head = buffer.head()
            yield batch, {**dict(zip(_KEY, head[0])), "skip": head[1]} if head else {**after, "skip": 0}


def _rank_plan(cfg: TextDataConfig, where: str, rank: int, world_size: int) -> tuple[list[Piece], Reader, int]:
    """This rank's pieces, how to read one, and a fingerprint of the sources the plan came from
    (checked on resume: offsets into changed files would not resume exactly)."""
    if cfg.source == "files":
        paths = resolve_paths(cfg.train_path, "train_path", TEXT_SUFFIXES)
        sizes = [path.stat().st_size for path in paths]
        plan = split_files(paths, sizes, world_size)[rank]
        return plan, partial(piece_documents, text_field=cfg.text_field), _fingerprint([*map(str, paths), *sizes])

    def dealt(piece: Piece) -> Iterator[tuple[int, int, str]]:
        docs = enumerate(text for _, text in source_documents(cfg))
        return ((t, t + 1, text) for t, text in docs if t >= piece.start and t % world_size == rank)

    return [Piece(Path(where))], dealt, _fingerprint([where])


def _fingerprint(parts: list[Any]) -> int:
    """48 bits of a hash: an int that survives JSON and int64 checkpoints."""
    return int.from_bytes(hashlib.sha1(repr(parts).encode()).digest()[:6], "big")
