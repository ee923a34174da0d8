"""Token pieces exactly as llama.cpp writes them: the one place llama_mtp turns token ids into bytes.

llama-cpp-python 0.3.36 hands ``llama_token_to_piece`` a fixed 32-byte buffer and ignores the
"buffer too small" answer (the negative of the size needed), so every piece longer than 32 bytes
comes back empty. Real vocabularies have such pieces: Qwen3.5's has 240 (runs of 64 and 128
spaces for code indentation, 50-byte ``=====`` rules, ``//------`` comment lines), Llama 3's 231.
:class:`Pieces` asks llama.cpp for each piece, retries with the size llama.cpp reports, and caches
the answer per token (a vocabulary never changes).

Everything else about detokenizing stays llama-cpp-python's: no ``lstrip``, special tokens
rendered only when asked, and a leading space dropped when the first token is BOS (its
``LlamaModel.detokenize`` does that for SentencePiece vocabularies).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import llama_cpp

from .errors import SessionClosedError

# most pieces fit; longer ones are retried at the size llama.cpp asks for
_FIRST_TRY = 64


class Pieces:
    """A vocabulary's token pieces at their real sizes, cached.

    ``vocab``: returns the native ``llama_vocab`` pointer, or None once its model is freed
    (the pointer dies with the model).
    """

    def __init__(self, vocab: Callable[[], Any]) -> None:
        self._vocab = vocab
        self._cache: Dict[Tuple[int, bool], bytes] = {}
        self._lock = threading.Lock()  # one ctypes buffer per call; the lock only guards the cache fill

    def _live_vocab(self) -> Any:
        vocab = self._vocab()
        if vocab is None:
            raise SessionClosedError("the model's vocabulary has been freed (was the Llama closed?)")
        return vocab

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes llama.cpp writes for one token (``special``: render control tokens' text)."""
        key = (int(token), bool(special))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        vocab = self._live_vocab()
        if not 0 <= key[0] < int(llama_cpp.llama_vocab_n_tokens(vocab)):
            raise ValueError(f"token {token} is outside the vocabulary")
        size = _FIRST_TRY
        while True:
            buf = ctypes.create_string_buffer(size)
            n = int(llama_cpp.llama_token_to_piece(vocab, key[0], buf, size, 0, key[1]))
            if n >= 0:
                out = buf.raw[:n]
                break
            size = -n  # too small: llama.cpp says how many bytes the piece needs
        with self._lock:
            self._cache[key] = out
        return out

    def cached(self, token: int, special: bool = False) -> bool:
        return (int(token), bool(special)) in self._cache

    def evict(self, token: int, special: bool = False) -> None:
        self._cache.pop((int(token), bool(special)), None)

    def detokenize(self, tokens: Sequence[int], special: bool = False, special_ids: FrozenSet[int] = frozenset()) -> bytes:
        """llama-cpp-python's ``LlamaModel.detokenize``, with every piece whole (``special_ids``:
        tokens rendered as if ``special`` were set, as llama-server renders preserved tokens)."""
        if special_ids and not special:
            out = b"".join(self.piece(t, t in special_ids) for t in tokens)
        else:
            out = b"".join(self.piece(t, special) for t in tokens)
        if tokens and out[:1] == b" " and int(tokens[0]) == self.bos():
            return out[1:]
        return out

    def bos(self) -> int:
        return int(llama_cpp.llama_vocab_bos(self._live_vocab()))


# (tokens, prev_tokens) -> bytes: the detokenizer every output path uses (see _compat.detokenizer)
Detokenizer = Callable[[List[int], Optional[List[int]]], bytes]


def as_detokenizer(pieces: Pieces, special_ids: FrozenSet[int] = frozenset()) -> Detokenizer:
    """``pieces`` as a (tokens, prev_tokens) detokenizer: llama.cpp's pieces need no context."""

    def detokenize(tokens: List[int], prev_tokens: Optional[List[int]] = None) -> bytes:
        return pieces.detokenize(tokens, special_ids=special_ids)

    return detokenize
