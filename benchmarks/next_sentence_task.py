"""Build a next-sentence multiple-choice task (JSONL for benchmarks/accuracy.py --mc) from text.

    PYTHONPATH=. python benchmarks/next_sentence_task.py --text news.txt --items 200 --out next_sentence.jsonl

Each item: the context is --context-sentences consecutive sentences of one paragraph (a
non-empty line), the right choice is the sentence after them, and the other --choices - 1 are
sentences of other paragraphs; the order is seeded (see polar_dist/sparsity/choice_tasks.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polar_dist.cli import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", nargs="+", required=True, help="UTF-8 text file(s); paragraphs are non-empty lines")
    parser.add_argument("--out", required=True, help="JSONL to write")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--context-sentences", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from polar_dist.sparsity.choice_tasks import next_sentence_items, write_choice_items
    from polar_dist.sparsity.text import read_text_files

    items = next_sentence_items(read_text_files(args.text), args.items, num_choices=args.choices,
                                context_sentences=args.context_sentences, seed=args.seed)
    write_choice_items(args.out, items)
    print(f"wrote {len(items)} items to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
