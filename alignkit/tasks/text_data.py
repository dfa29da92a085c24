"""Text data for LLM pretraining: :func:`build_text_data` picks the path of ``task.text``'s source
(documents come from :mod:`alignkit.tasks.text_sources`, are packed by
:mod:`alignkit.tasks.text_packing` and served as batches by :mod:`alignkit.tasks.text_batches`).
This is the top of the text data modules: only the task (:mod:`alignkit.tasks.text_pretrain`)
imports it, and it imports the paths it chooses among.

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

Packing: :mod:`alignkit.tasks.text_packing`; batches and the tokenizer mismatch (the paper's
LET-dagger): :mod:`alignkit.tasks.text_batches`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator

from alignkit.core.errors import DataError
from alignkit.tasks.text_batches import PREFETCH, TextData
from alignkit.tasks.text_packing import Encoder, LazyEvalSplit, Packer, Split, TokenStream, match_teacher_positions, teacher_encoder
from alignkit.tasks.text_sources import (
    BUILTIN_MAX_BYTES,
    SOURCES,
    TextDataConfig,
    builtin_documents,
    holdout_stream,
    is_heldout,
    needs_holdout,
    read_documents,
    resolve_paths,
    source_documents,
)
from alignkit.tasks.text_stream import StreamingTextData
from alignkit.tasks.token_reader import build_token_data

_PROGRESS_MIN_CHARS = 2_000_000  # show a tqdm bar only when tokenization takes noticeable time


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


def eval_documents(cfg: TextDataConfig) -> Iterator[str]:
    """The held-out documents, streamed: the hash-selected ones of the train source, or the
    separate eval source (eval_path / hf_eval_split)."""
    if needs_holdout(cfg):
        return (t for held, _, t in holdout_stream(source_documents(cfg), cfg, True) if held)
    return (t for _, t in source_documents(cfg, "eval"))


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
        return build_token_data(cfg, tokenizer, teacher_tokenizer, seq_len, **common)

    if tokenizer is None:
        raise DataError(f"task.text.source={cfg.source!r} needs a tokenizer")
    student = Encoder(tokenizer, "student tokenizer")
    teacher = teacher_encoder(student, teacher_tokenizer)
    keep_spans = teacher is not None
    teacher_len = max(1, math.ceil(cfg.teacher_seq_ratio * seq_len)) if teacher is not None else 0
    where = {"builtin": "builtin corpus", "files": f"task.text.train_path={cfg.train_path!r}",
             "hf": f"{cfg.hf_name}[{cfg.hf_split}]"}[cfg.source]
    if cfg.streaming and cfg.source != "builtin":
        eval_split = None
        if cfg.eval_fraction > 0 or not needs_holdout(cfg):
            eval_split = LazyEvalSplit(eval_documents(cfg), Packer(student, keep_spans), seq_len)
        return StreamingTextData(cfg, where, eval_split, seq_len, student=student, teacher=teacher,
                                 teacher_seq_len=teacher_len, **common)

    # In memory: the train list is tokenized at once; the eval iterable lazily.
    need_holdout = needs_holdout(cfg)
    train_docs, heldout = _split_documents(source_documents(cfg), cfg, need_eval=need_holdout)
    eval_docs: Iterable[str] | None = (heldout or None) if need_holdout else eval_documents(cfg)
    if not train_docs:
        raise DataError(f"{where}: no training documents (all held out or empty)")

    packer = Packer(student, keep_spans)
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
    train_split = Split(TokenStream([ids]), seq_len, packer)
    eval_split = LazyEvalSplit(eval_docs, Packer(student, keep_spans), seq_len) if eval_docs is not None else None
    return TextData(
        train_split, eval_split, seq_len, student=student, teacher=teacher,
        teacher_seq_len=teacher_len, **common,
    )


__all__ = [
    "TextDataConfig",
    "TextData",
    "PREFETCH",
    "build_text_data",
    "eval_documents",
    "match_teacher_positions",
    "builtin_documents",
    "read_documents",
    "resolve_paths",
    "is_heldout",
    "BUILTIN_MAX_BYTES",
]
