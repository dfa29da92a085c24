"""The batches of a text split (:class:`TextData`): the packed train stream shuffled per epoch,
sharded over ranks and resumable, the held-out batches, and under a tokenizer mismatch (the
paper's LET-dagger) the teacher's side of each batch.

Tokenizer mismatch: when a teacher tokenizer different from the student's is given, the packed
stream keeps each token's character span, each student sequence's text is re-tokenized with the
teacher tokenizer (teacher EOS at the same document boundaries), padded/truncated to
``ceil(teacher_seq_ratio * seq_len)``, and ``teacher_index`` pairs every student position with
the teacher token whose span ends last at or before the student token's end (-1 if none) -- see
:func:`~alignkit.tasks.text_packing.match_teacher_positions`.

Batches: ``input_ids`` [B, S] long and ``labels`` = ``input_ids`` (the student shifts); no
``attention_mask``: every position of a packed sequence is real, and an all-ones mask would make
the models check it on the host at every forward.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch

from alignkit.core.errors import DataError
from alignkit.tasks.text_packing import Encoder, LazyEvalSplit, Split, match_teacher_positions

PREFETCH = 2  # teacher-side batches built ahead of the step under a tokenizer mismatch


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
        train: Split,
        eval_split: Split | None,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        max_eval_batches: int = 20,
        student: Encoder | None = None,
        teacher: Encoder | None = None,
        teacher_seq_len: int = 0,
        manifest_digest: str = "",
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
        self.manifest_digest = manifest_digest  # of a prepared token folder: a resume must find the same
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

    def state_dict(self) -> dict[str, int | str]:
        state: dict[str, int | str] = {
            "epoch": self._epoch,
            "offset": self._offset,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_train_sequences": self.num_train_sequences,
            "layout_world_size": self._layout_world_size,
        }
        if self.manifest_digest:
            state["manifest"] = self.manifest_digest
        return state

    def resharded_state(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """The position for this rank of a new process count, from every saved rank's state:
        the position is global, so the ranks saved the same one (a state older than its
        ``layout_world_size`` was written by the run's first process count)."""
        if any(state != states[0] for state in states):
            raise DataError("the saved ranks' data positions differ: resume on the run's own number of processes")
        return {"layout_world_size": len(states), **states[0]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "manifest" in state and state["manifest"] != self.manifest_digest:
            raise DataError(
                f"data state was saved on prepared token shards with manifest digest {state['manifest']}, but this "
                f"data's is {self.manifest_digest or 'none'} (re-prepared or replaced shards): resume on the folder "
                "the run started with, or start a new run"
            )
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
        if isinstance(self.eval_split, LazyEvalSplit):
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
    def _make_batch(self, split: Split, indices: list[int]) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.stack([split.tokens(i) for i in indices]).astype(np.int64))
        batch = {"input_ids": ids, "labels": ids.clone()}  # packed: no padding, no mask
        if self.teacher is not None and self.teacher_needed:
            stored = getattr(split, "teacher_fields", None)  # prepared shards carry them precomputed
            batch.update(stored(indices) if stored is not None else self._teacher_fields(split, indices))
        return batch

    def _teacher_fields(self, split: Split, indices: list[int]) -> dict[str, torch.Tensor]:
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
