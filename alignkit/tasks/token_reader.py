"""``task.text.source=tokens``: a folder written by ``alignkit prepare`` (its manifest validated
and every shard verified before first use: :mod:`alignkit.tasks.token_manifest`), or plain
``.npy`` / ``.bin`` shards.

A folder that ``alignkit prepare`` left unfinished (``progress.json``, tails or shards of its
naming, and no ``manifest.json``) is refused: read as plain shards it would train on the
held-out split and on a partial stream.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.core.errors import DataError
from alignkit.tasks.text_batches import TextData
from alignkit.tasks.text_packing import Encoder, Split, TokenStream, teacher_encoder
from alignkit.tasks.text_sources import TextDataConfig, load_token_shards
from alignkit.tasks.token_manifest import read_manifest, stream_shards, tokenizer_fingerprint

# what alignkit prepare writes besides manifest.json: shards, tails and progress of a checkpoint, temporaries
PREPARE_FILES = re.compile(r"(train|eval)(-teacher_(ids|index|count))?(_\d{5}\.npy|\.tail\.\d+\.npy|_\d{5}\.tmp)"
                           r"|progress\.(json|tmp)|manifest\.tmp")


def unfinished_preparation(folder: Path) -> bool:
    """True when ``folder`` holds files of an ``alignkit prepare`` but no manifest."""
    return (folder.is_dir() and not (folder / "manifest.json").exists()
            and any(PREPARE_FILES.fullmatch(p.name) for p in folder.iterdir()))


class _StoredTeacherSplit(Split):
    """A prepared split whose sequences carry the teacher's fields precomputed (LET-dagger)."""

    def __init__(self, stream: TokenStream, seq_len: int, rows: dict[str, TokenStream], teacher_seq_len: int, pad_id: int) -> None:
        super().__init__(stream, seq_len)
        self.rows, self.teacher_seq_len, self.pad_id = rows, teacher_seq_len, pad_id

    def teacher_fields(self, indices: list[int]) -> dict[str, torch.Tensor]:
        t, s = self.teacher_seq_len, self.seq_len
        get = lambda key, i, n: self.rows[key].get(i * n, (i + 1) * n).astype(np.int64)  # noqa: E731
        ids = torch.from_numpy(np.stack([get("ids", i, t) for i in indices]))
        count = torch.from_numpy(np.concatenate([get("count", i, 1) for i in indices]))
        return {"teacher_input_ids": ids,
                "teacher_attention_mask": (torch.arange(t)[None, :] < count[:, None]).long(),
                "teacher_index": torch.from_numpy(np.stack([get("index", i, s) for i in indices]))}


def _prepared_splits(path: Path, student: Encoder | None, teacher: Encoder | None,
                     seq_len: int) -> tuple[Split, Split | None, int, str]:
    """Train and eval splits of a prepared dir (with the teacher's fields when ``teacher``), the
    teacher sequence length and the manifest's digest."""
    manifest, digest = read_manifest(path / "manifest.json")
    settings = manifest["settings"]
    where = f"task.text.train_path={str(path)!r}"
    for role, encoder, stored in (("student", student, settings["tokenizer"]), ("teacher", teacher, settings["teacher"])):
        if encoder is None:
            continue
        if stored is None:
            raise DataError(f"{where} holds no teacher fields, and the teacher's tokenizer differs from the student's: "
                             "run alignkit prepare with this recipe (it stores them)")
        if tokenizer_fingerprint(encoder) != stored["fingerprint"]:
            raise DataError(
                f"{where} was prepared with {role} tokenizer {stored['name'] or '?'} (fingerprint {stored['fingerprint']}), "
                f"not this {role}'s (fingerprint {tokenizer_fingerprint(encoder)}): run alignkit prepare again with this recipe"
            )
    if teacher is not None and settings["teacher"]["seq_len"] != seq_len:
        raise DataError(f"{where} holds teacher fields for task.seq_len={settings['teacher']['seq_len']}, not {seq_len}")

    def stream(name: str) -> TokenStream | None:
        shards = stream_shards(path, manifest, name)
        return TokenStream(shards) if shards else None  # type: ignore[arg-type]

    def split(name: str) -> Split | None:
        ids = stream(name)
        if ids is None or teacher is None:
            return Split(ids, seq_len) if ids is not None else None
        rows = {k: stream(f"{name}-teacher_{k}") for k in ("ids", "index", "count")}
        return _StoredTeacherSplit(ids, seq_len, rows, settings["teacher"]["teacher_seq_len"], teacher.pad_id)  # type: ignore[arg-type]

    train = split("train")
    assert train is not None
    return train, split("eval"), settings["teacher"]["teacher_seq_len"] if teacher is not None else 0, digest


def build_token_data(cfg: TextDataConfig, tokenizer: Any, teacher_tokenizer: Any, seq_len: int, **common: Any) -> TextData:
    """``source: tokens``: a prepared directory (its own eval split; the teacher's fields when
    its tokenizer differs) or ``.npy`` / ``.bin`` shards (the last ``eval_fraction`` of the
    sequences held out unless ``eval_path`` is given)."""
    student = Encoder(tokenizer, "student tokenizer") if tokenizer is not None else None
    teacher = teacher_encoder(student, teacher_tokenizer) if student is not None else None
    prepared = Path(cfg.train_path).expanduser()
    teacher_len, digest = 0, ""
    if unfinished_preparation(prepared):
        raise DataError(f"task.text.train_path={cfg.train_path!r}: an unfinished alignkit prepare (no manifest.json): "
                        f"rerun alignkit prepare --out {prepared} with the same recipe to finish it")
    if (prepared / "manifest.json").is_file():
        train_split, eval_split, teacher_len, digest = _prepared_splits(prepared, student, teacher, seq_len)
        if cfg.eval_path:
            eval_split = Split(TokenStream(load_token_shards(cfg.eval_path, "eval_path", cfg.token_dtype)), seq_len)
    else:
        if teacher is not None:
            raise DataError(
                "task.text.source='tokens' with plain shards has no text, so a teacher with a different tokenizer "
                "cannot be aligned: prepare the data with alignkit prepare (it stores the teacher's side) or use a text source"
            )
        stream = TokenStream(load_token_shards(cfg.train_path, "train_path", cfg.token_dtype))
        if cfg.eval_path:
            train_split = Split(stream, seq_len)
            eval_split = Split(TokenStream(load_token_shards(cfg.eval_path, "eval_path", cfg.token_dtype)), seq_len)
        else:
            n_total = len(stream) // seq_len
            n_eval = math.ceil(cfg.eval_fraction * n_total) if cfg.eval_fraction > 0 and n_total >= 2 else 0
            cut = (n_total - n_eval) * seq_len
            train_split = Split(stream.view(0, cut) if n_eval else stream, seq_len)
            eval_split = Split(stream.view(cut, n_total * seq_len), seq_len) if n_eval else None
    if student is not None:
        probe = train_split.stream.get(0, min(len(train_split.stream), 1_000_000))
        if probe.size and int(probe.max()) >= student.vocab_size:
            raise DataError(
                f"task.text.train_path={cfg.train_path!r}: token id {int(probe.max())} >= tokenizer "
                f"vocab size {student.vocab_size} (wrong task.text.token_dtype or tokenizer?)"
            )
    if train_split.num_sequences == 0:
        raise DataError(
            f"task.text.train_path={cfg.train_path!r}: found {len(train_split.stream)} tokens, but one "
            f"sequence needs seq_len={seq_len}"
        )
    return TextData(train_split, eval_split, seq_len, student=student, teacher=teacher, teacher_seq_len=teacher_len,
                    manifest_digest=digest, **common)
