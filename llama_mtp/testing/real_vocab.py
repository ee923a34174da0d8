"""Real tokenizers for generated models: llama.cpp's ``models/ggml-vocab-<name>.gguf`` files.

The llama-cpp-python sdist ships llama.cpp's vocabulary-only GGUFs (Qwen, DeepSeek,
Gemma 4, Llama 3, GPT-2, ...).  A spec with ``vocab="<name>"`` writes that file's
``tokenizer.*`` keys verbatim, so tests meet what real models have and the synthetic
vocabulary lacks: pieces longer than 32 bytes (runs of spaces, ``=====`` rules),
multi-byte UTF-8 split across byte tokens, control and user-defined tokens.

Which tokens a generated model may emit is llama.cpp's call, read from a vocab-only
model: NORMAL or BYTE tokens that it does not treat as control or end-of-generation
(Qwen's vocabulary stores ``</s>`` as NORMAL, but llama.cpp makes it an EOG control
token).  Everything else is a special token of the oracle (an input alias, never output).

The files come from the llama.cpp tree the shim is built from (build_ffi.find_sources:
the cached sdist, or ``$LLAMA_MTP_LLAMA_CPP_SRC``), found once per process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence

import numpy as np

from .gguf_metadata import KeyValue, read_metadata
from .vocab import check_script

__all__ = ["RealVocab", "real_vocab", "real_vocab_names", "script_from_text", "vocab_dir"]

_PREFIX = "ggml-vocab-"
_CHAT_TEMPLATE = "tokenizer.chat_template"


@functools.lru_cache(maxsize=1)
def vocab_dir() -> pathlib.Path:
    """llama.cpp's ``models/`` folder (the vocabulary files), fetched with the shim's sources if needed.

    Cached for the process: tests that point LLAMA_MTP_CACHE elsewhere while building
    models must not trigger a second sdist download.
    """
    from .._loader import build_module

    builder = build_module()
    return builder.find_sources(builder.find_installed()) / "models"


def real_vocab_names() -> list[str]:
    """The available vocabularies (``vocab=`` values): the stems of ``ggml-vocab-*.gguf``."""
    return sorted(p.name[len(_PREFIX):-len(".gguf")] for p in vocab_dir().glob(f"{_PREFIX}*.gguf"))


class RealVocab:
    """One real vocabulary, through llama.cpp's own tokenizer (a vocab-only model)."""

    def __init__(self, name: str, path: pathlib.Path) -> None:
        import llama_cpp

        self.name, self.path = name, path
        with _stderr_silenced():
            self._llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self.n_vocab: int = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.bos_id: int = int(llama_cpp.llama_vocab_bos(self._vocab))  # -1 when the vocab has none
        self.eos_id: int = int(llama_cpp.llama_vocab_eos(self._vocab))
        self.pad_id: int = int(llama_cpp.llama_vocab_pad(self._vocab))
        # llama.cpp's attribute bits (LLAMA_TOKEN_ATTR_*) of every token, by id
        self.attrs: np.ndarray = np.array([llama_cpp.llama_vocab_get_attr(self._vocab, t) for t in range(self.n_vocab)])
        self.ordinary: np.ndarray = self._ordinary_ids()

    def __repr__(self) -> str:
        return f"RealVocab({self.name!r}, n_vocab={self.n_vocab}, ordinary={len(self.ordinary)})"

    def _ordinary_ids(self) -> np.ndarray:
        """Ids a generated model may emit: NORMAL / BYTE, not control, not end-of-generation."""
        import llama_cpp as L

        emit = (self.attrs & (L.LLAMA_TOKEN_ATTR_NORMAL | L.LLAMA_TOKEN_ATTR_BYTE) != 0)
        emit &= self.attrs & L.LLAMA_TOKEN_ATTR_CONTROL == 0
        ids = np.flatnonzero(emit)
        return ids[[not L.llama_vocab_is_eog(self._vocab, int(t)) for t in ids]].astype(np.int64)

    def _check_id(self, token_id: int) -> int:
        # llama.cpp indexes its token table with .at(): an out-of-range id would abort the process
        if not isinstance(token_id, (int, np.integer)) or not 0 <= token_id < self.n_vocab:
            raise ValueError(f"token id {token_id!r} is outside the {self.name} vocabulary [0, {self.n_vocab})")
        return int(token_id)

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """llama.cpp's tokens for ``text`` (no BOS); ``special``: parse control-token text such as ``<|im_end|>``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def piece(self, token_id: int) -> bytes:
        """llama.cpp's piece of one token (control tokens rendered), whatever its length."""
        import llama_cpp

        t = self._check_id(token_id)
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, t, buf, size, 0, True)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # too small: llama.cpp returns minus the size it needs

    def long_pieces(self, min_len: int = 33) -> list[int]:
        """Ordinary tokens (script material) whose piece is at least ``min_len`` bytes.

        The default 33 is one past llama-cpp-python 0.3.36's detokenizer buffer (32 bytes).
        """
        return self.ordinary[self._piece_lengths >= min_len].tolist()

    @functools.cached_property
    def _piece_lengths(self) -> np.ndarray:
        """len(piece) of every ordinary token (one pass over the vocabulary, ~1 s, kept)."""
        return np.array([len(self.piece(int(t))) for t in self.ordinary])

    @functools.cached_property
    def _pieces_by_bytes(self) -> dict[bytes, tuple[int, ...]]:
        """piece -> the ordinary tokens that write it (one pass over the vocabulary, kept)."""
        out: dict[bytes, list[int]] = {}
        for t in self.ordinary:
            out.setdefault(self.piece(int(t)), []).append(int(t))
        return {piece: tuple(ids) for piece, ids in out.items() if piece}

    def is_control(self, token_id: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_control(self._vocab, self._check_id(token_id)))

    def is_ordinary(self, token_id: int) -> bool:
        t = self._check_id(token_id)
        i = int(np.searchsorted(self.ordinary, t))
        return i < len(self.ordinary) and int(self.ordinary[i]) == t

    @functools.cached_property
    def token_texts(self) -> list[str]:
        """The file's token strings (as stored: GPT-2 byte-mapped or SentencePiece-escaped)."""
        (tokens,) = [kv.value for kv in _tokenizer_metadata(self.path) if kv.key == "tokenizer.ggml.tokens"]
        return [t.decode("utf-8", "replace") for t in tokens]

    def metadata(self, chat_template: str | None, *, replace: bool = False) -> list[KeyValue]:
        """The ``tokenizer.*`` entries a model on this vocabulary carries: the file's, verbatim,
        plus ``chat_template`` (the arch's) when the file has none, or in place of the file's
        (``replace``: the family's real template)."""
        kvs = list(_tokenizer_metadata(self.path))
        if chat_template and (replace or not any(kv.key == _CHAT_TEMPLATE for kv in kvs)):
            from gguf import GGUFValueType

            kvs = [kv for kv in kvs if kv.key != _CHAT_TEMPLATE]
            kvs.append(KeyValue(_CHAT_TEMPLATE, chat_template, GGUFValueType.STRING))
        return kvs


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Drop what is written to fd 2 meanwhile: llama.cpp warns that a vocab-only model's context
    outruns its (absent, 0) training length, and llama-cpp-python 0.3.36 prints llama.cpp's
    warnings even with verbose=False (its log-level table predates ggml's renumbering)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@functools.lru_cache(maxsize=4)
def _tokenizer_metadata(path: pathlib.Path) -> tuple[KeyValue, ...]:
    return tuple(read_metadata(path, "tokenizer."))


@functools.lru_cache(maxsize=None)
def real_vocab(name: str) -> RealVocab:
    """The real vocabulary ``name`` (e.g. "qwen35", "deepseek-llm", "gemma-4"), loaded once per process."""
    if not isinstance(name, str):
        raise TypeError(f"vocab must be a str, got {type(name).__name__}")
    names = real_vocab_names()
    if name not in names:
        raise ValueError(f"unknown vocab {name!r}: no {_PREFIX}{name}.gguf in {vocab_dir()} (available: {', '.join(names)})")
    return RealVocab(name, vocab_dir() / f"{_PREFIX}{name}.gguf")


def script_from_text(vocab_name: str, text: str) -> tuple[int, ...]:
    """``text``'s tokens in ``vocab_name``, checked to be a valid script (distinct ordinary tokens)."""
    vocab = real_vocab(vocab_name)
    script = tuple(vocab.tokenize(text))
    check_script(script, vocab.ordinary, vocab.token_texts)
    return script


def distinct_script(vocab_name: str, text: str, *, avoid: Sequence[int] = (), tries: int = 200,
                    budget: int = 20000) -> tuple[int, ...]:
    """Ordinary tokens of ``vocab_name`` whose pieces spell ``text``, all distinct and none in
    ``avoid``: a script for text that repeats itself (newlines, tags), which llama.cpp's own
    tokenization would spell with the same token twice.

    A depth-first search over spellings, longest pieces first; repeated markup makes some
    prefixes dead ends that plain backtracking revisits exponentially often, so each try has a
    node ``budget`` and later tries shuffle the pieces of equal length (seeded: deterministic).
    Raises ValueError when no try finds a spelling.
    """
    import random

    vocab = real_vocab(vocab_name)
    by_piece = vocab._pieces_by_bytes
    data = text.encode("utf-8")
    longest = max(map(len, by_piece))
    # the pieces that fit at each position: (length, token), longest first
    options = [[(n, tok) for n in range(min(longest, len(data) - pos), 0, -1)
                for tok in by_piece.get(data[pos:pos + n], ())] for pos in range(len(data))]
    rng = random.Random(0)
    for attempt in range(tries):
        order = options if attempt == 0 else [
            sorted(opts, key=lambda o: (-o[0] + rng.random() * 3)) for opts in options]
        used = set(int(t) for t in avoid)
        out: list[int] = []
        nodes = [0]

        def search(pos: int) -> bool:
            if pos == len(data):
                return True
            nodes[0] += 1
            if nodes[0] > budget:
                return False
            for n, tok in order[pos]:
                if tok in used:
                    continue
                used.add(tok)
                out.append(tok)
                if search(pos + n):
                    return True
                used.discard(tok)
                out.pop()
            return False

        if search(0):
            script = tuple(out)
            check_script(script, vocab.ordinary, vocab.token_texts)
            return script
    raise ValueError(f"{vocab_name} cannot spell {text!r} with distinct tokens (searched {tries} x {budget} nodes)")
