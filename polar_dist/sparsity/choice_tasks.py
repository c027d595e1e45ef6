"""Multiple-choice tasks on local files: the JSONL format, and a next-sentence task built from text.

One item per line: {"context": str, "choices": [str, ...], "label": int} (label indexes choices).
A choice is the continuation of its context, so it usually starts with a space.

`next_sentence_items` builds an offline task from any text: the context is a few consecutive
sentences of one paragraph, the right choice is the sentence that follows them, and the
distractors are sentences drawn from other paragraphs. Paragraphs are the text's non-empty lines
(news corpora such as gensim's lee_background.cor hold one article per line).

    items = next_sentence_items(read_text_files(["news.txt"]), num_items=200, seed=0)
    write_choice_items("next_sentence.jsonl", items)
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from polar_dist.errors import UserError

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before
# whitespace and a capital letter, digit or opening quote. Abbreviations ("Mr. Smith") split
# too; that only makes a few contexts shorter.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
# Sentences shorter than this are fragments ("He said."), longer ones are run-ons or lists;
# neither makes a fair choice.
MIN_SENTENCE_CHARS = 30
MAX_SENTENCE_CHARS = 300


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    label: int

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise UserError(f"a multiple-choice item needs at least 2 choices, got {len(self.choices)}")
        if not 0 <= self.label < len(self.choices):
            raise UserError(f"label {self.label} is outside the {len(self.choices)} choices")


def read_choice_items(path: str | os.PathLike[str]) -> list[ChoiceItem]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"multiple-choice file {path} does not exist")
    items = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            context, choices, label = row["context"], row["choices"], row["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{line_no}: expected a JSON object with context, choices and label ({e})") from e
        if not isinstance(context, str) or not isinstance(choices, list) or not all(
                isinstance(c, str) for c in choices) or not isinstance(label, int):
            raise UserError(f"{path}:{line_no}: context must be a string, choices a list of strings, label an int")
        try:
            items.append(ChoiceItem(context, tuple(choices), label))
        except UserError as e:
            raise UserError(f"{path}:{line_no}: {e}") from e
    if not items:
        raise UserError(f"{path} holds no multiple-choice items")
    return items


def write_choice_items(path: str | os.PathLike[str], items: list[ChoiceItem]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps({"context": item.context, "choices": list(item.choices), "label": item.label},
                               ensure_ascii=False) + "\n")


def split_sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph.strip()) if s.strip()]


def next_sentence_items(text: str, num_items: int, *, num_choices: int = 4, context_sentences: int = 3,
                        seed: int = 0) -> list[ChoiceItem]:
    """`num_items` items (fewer if the text has fewer usable positions, never zero): context =
    `context_sentences` consecutive sentences, choices = the next sentence and
    `num_choices - 1` sentences of other paragraphs, in a seeded random order."""
    if num_items < 1 or num_choices < 2 or context_sentences < 1:
        raise UserError(f"num_items ({num_items}) must be >= 1, num_choices ({num_choices}) >= 2 and "
                        f"context_sentences ({context_sentences}) >= 1")
    paragraphs = [split_sentences(p) for p in text.splitlines() if p.strip()]

    def usable(s: str) -> bool:
        return MIN_SENTENCE_CHARS <= len(s) <= MAX_SENTENCE_CHARS

    positions = [(p, i) for p, sents in enumerate(paragraphs) for i in range(context_sentences, len(sents))
                 if usable(sents[i])]
    pool = [(p, s) for p, sents in enumerate(paragraphs) for s in sents if usable(s)]
    if not positions or len({p for p, _ in pool}) < 2:
        raise UserError(f"the text has no paragraph with more than {context_sentences} sentences, or fewer than 2 "
                        "paragraphs (paragraphs are non-empty lines); give more text or fewer context sentences")
    rng = random.Random(seed)
    items = []
    for p, i in sorted(rng.sample(positions, min(num_items, len(positions)))):
        others = sorted({s for q, s in pool if q != p and s != paragraphs[p][i]})
        if len(others) < num_choices - 1:
            raise UserError(f"the text has {len(others)} usable sentences outside one of its paragraphs, too few "
                            f"for {num_choices - 1} distractors; give more text or fewer choices")
        distractors = rng.sample(others, num_choices - 1)
        label = rng.randrange(num_choices)
        choices = distractors[:label] + [paragraphs[p][i]] + distractors[label:]
        context = " ".join(paragraphs[p][i - context_sentences:i])
        items.append(ChoiceItem(context, tuple(" " + c for c in choices), label))
    return items
