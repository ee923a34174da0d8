"""Incremental detokenization with stop strings, as llama-cpp-python streams text
(bytes that are not valid UTF-8 are dropped, as llama-cpp-python drops them).

Text is released only once it can no longer change: a UTF-8 character split
across tokens waits for its last byte, and a tail that could still grow into a
stop string waits until it cannot. The stop string itself is never emitted.
"""

from __future__ import annotations

import codecs
from typing import Callable, List, Optional, Sequence


class TextAssembler:
    def __init__(self, detokenize: Callable[[List[int], List[int]], bytes], prompt_tokens: Sequence[int],
                 stop: Sequence[str] = ()) -> None:
        self._detokenize = detokenize
        self._history: List[int] = list(prompt_tokens)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._stop = [s for s in stop if s]
        self._text = ""       # all text decoded so far
        self._emitted = 0     # chars of _text already released
        self._end: Optional[int] = None  # where a stop string begins, once found

    @property
    def stopped(self) -> bool:
        return self._end is not None

    @property
    def text(self) -> str:
        return self._text if self._end is None else self._text[: self._end]

    def feed(self, token: int) -> str:
        """Add one committed token; return the text that became final."""
        piece = self._detokenize([token], self._history)
        self._history.append(token)
        before = len(self._text)
        self._text += self._decoder.decode(piece)
        if self._stop:
            # a stop string can start up to len(stop)-1 chars before the new text
            start = max(0, before - max(map(len, self._stop)) + 1)
            hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self._end = min(hits)
                return self._release(self._end)
        return self._release(len(self._text) - self._held_back())

    def finish(self) -> str:
        """Release everything still held (end of generation)."""
        if self._end is None:
            self._text += self._decoder.decode(b"", final=True)
            return self._release(len(self._text))
        return self._release(self._end)

    def _held_back(self) -> int:
        """Length of the longest tail that is a proper prefix of a stop string."""
        held = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._text)), held, -1):
                if self._text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _release(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        out = self._text[self._emitted: upto]
        self._emitted = upto
        return out
