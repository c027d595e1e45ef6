"""Text from generated tokens as they arrive, and stop strings found in it.

    detok = IncrementalDetokenizer(tokenizer)
    stops = StopStrings(["\\n\\n"])
    for ids in arriving:                       # the new token ids of one step
        text, stopped = stops.push(detok.push(ids))
        ...                                    # send text; stop generating when stopped
    text = stops.flush(detok.flush())          # at the end: what was held back

Decoding token by token is wrong for byte-level BPE (a character may span tokens) and for
SentencePiece (a token's leading space depends on what precedes it), so each push decodes a
short window: the tokens from `prefix` (already emitted, kept as context) to the end, minus the
text of the context alone. Text that ends in U+FFFD (an incomplete UTF-8 sequence) waits for the
next token. Work per token is bounded by the window, not the length of the output.
"""

from __future__ import annotations

from polar_dist.models.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # tokens whose text has been emitted

    def push(self, new_ids: list[int]) -> str:
        """The text the new tokens add (possibly empty while a character is incomplete)."""
        self.ids += new_ids
        return self._advance(final=False)

    def flush(self) -> str:
        """What is still held back (an incomplete character decodes to U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        context = self.tokenizer.decode(self.ids[self._prefix:self._read])
        full = self.tokenizer.decode(self.ids[self._prefix:])
        if not final and (full.endswith(_INCOMPLETE) or len(full) < len(context)):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return full[len(context):]


class StopStrings:
    """Finds the first stop string in the text; holds back the text that could still begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found: then nothing after it counts)."""
        if self.stopped:
            return "", True
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return buf[:min(hits)], True
        keep = min(self._hold, len(buf))
        self._pending = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self, text: str = "") -> str:
        out, stopped = self.push(text)
        if stopped:
            return out
        out, self._pending = out + self._pending, ""
        return out
