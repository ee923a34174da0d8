"""The vocabulary of a generated model: the synthetic one (a small GPT-2-style byte-level BPE
vocabulary: 256 byte tokens, a few merges, filler, specials) or a real one (real_vocab.py),
which tokens are ordinary (pi permutes them) and special, and the tokenizer metadata written."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .gguf_metadata import KeyValue

if TYPE_CHECKING:
    from .archs.base import ArchLayout
    from .spec import TestModelSpec

MERGES = ("Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "r e")
# gguf token types (llama_token_type)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte -> printable unicode char map (what llama.cpp's BPE decoder inverts)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@dataclass(frozen=True)
class Specials:
    """The special tokens of an arch's vocabulary (stored last, as Qwen does) and their roles."""

    tokens: tuple[str, ...]
    bos: str
    eos: str
    pad: str
    # tokens among ``tokens`` that are USER_DEFINED (e.g. <think>) rather than CONTROL
    user_defined: tuple[str, ...] = ()


@dataclass
class Vocab:
    tokens: list[str]
    special_ids: tuple[int, ...]    # never output: inputs that alias an ordinary token
    bos_id: int
    eos_id: int
    pad_id: int
    real: str | None = None         # the real vocabulary's name; None: synthetic
    types: list[int] = field(default_factory=list)   # synthetic only (a real one is copied verbatim)
    merges: list[str] = field(default_factory=list)  # synthetic only

    @property
    def ordinary(self) -> np.ndarray:
        """The tokens pi permutes (sorted ids)."""
        mask = np.ones(len(self.tokens), dtype=bool)
        mask[list(self.special_ids)] = False
        return np.flatnonzero(mask)


_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")  # 70 pronounceable syllables


def filler_words(n: int) -> list[str]:
    """``n`` distinct readable filler tokens: "Ġ" (a space) + a 2- or 3-syllable nonsense word.

    Deterministic; a fixed stride coprime to each range scatters consecutive ids over the
    syllables, so generated text reads like nonsense sentences instead of "baba babe babi".
    BPE never produces them from text (no merge builds them), so tokenizing a prompt still
    gives byte tokens and the few merges.
    """
    s = len(_SYLLABLES)
    words: list[str] = []
    for n_syl in (2, 3, 4):
        total = s**n_syl
        stride = 7919  # prime, coprime to 70**k
        for i in range(min(n - len(words), total)):
            j = (i * stride) % total
            parts = []
            for _ in range(n_syl):
                j, r = divmod(j, s)
                parts.append(_SYLLABLES[r])
            words.append("Ġ" + "".join(parts))
        if len(words) == n:
            break
    return words


def min_vocab(specials: Specials) -> int:
    return 256 + len(MERGES) + len(specials.tokens) + 4


def text_token(text: str) -> str:
    """The byte-level BPE token string whose piece is ``text``."""
    b2u = bytes_to_unicode()
    return "".join(b2u[b] for b in text.encode("utf-8"))


def build_vocab(n_vocab: int, specials: Specials, chunks: Sequence[str] = (), user_defined: Sequence[str] = ()) -> Vocab:
    """The synthetic vocabulary of ``n_vocab`` tokens with ``specials`` stored last; ``chunks``:
    texts that get a token of their own (after the merges) unless one already spells them;
    ``user_defined``: texts that get a USER_DEFINED token after the chunks, which llama.cpp's
    tokenizer matches whole in any text (as real vocabularies' added tokens, e.g. <tool_response>)."""
    # ids 0..255 are the byte tokens in byte order, then merges, chunks, filler, specials last (as Qwen).
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges = list(MERGES)
    tokens += [m.replace(" ", "") for m in merges]
    clash = [c for c in chunks if text_token(c) in specials.tokens]
    if clash:  # llama.cpp refuses a vocabulary with a token text twice
        raise ValueError(f"chunk {clash[0]!r} is a special token's text: spell it with that token instead")
    tokens += [t for t in dict.fromkeys(map(text_token, chunks)) if t not in tokens]
    taken = [u for u in user_defined if u in tokens or u in specials.tokens or text_token(u) in tokens]
    if taken:  # one text, two tokens: llama.cpp refuses it, or the tokenizer would pick either
        raise ValueError(f"user-defined token {taken[0]!r} is already a token of the vocabulary")
    first_user = len(tokens)
    tokens += list(dict.fromkeys(user_defined))  # stored raw: llama.cpp copies a user-defined token's text as is
    user_ids = range(first_user, len(tokens))
    n_filler = n_vocab - len(tokens) - len(specials.tokens)
    # Filler: readable words (decodable by the byte-level decoder), never produced by merges.
    tokens += filler_words(n_filler)
    first_special = len(tokens)
    tokens += list(specials.tokens)
    types = [TOKEN_USER_DEFINED if i in user_ids else TOKEN_NORMAL for i in range(first_special)] + [
        TOKEN_USER_DEFINED if s in specials.user_defined else TOKEN_CONTROL for s in specials.tokens
    ]
    special_ids = tuple(range(first_special, n_vocab))
    ids = {s: first_special + i for i, s in enumerate(specials.tokens)}
    return Vocab(tokens, special_ids, bos_id=ids[specials.bos], eos_id=ids[specials.eos], pad_id=ids[specials.pad],
                 types=types, merges=merges)


def vocab_for(spec: TestModelSpec) -> Vocab:
    """The vocabulary of ``spec``: ``spec.vocab``'s real one, else the arch's synthetic one."""
    from .archs import get_arch

    if spec.vocab is None:
        chunks = spec.script_text + tuple(c for m in spec.more_scripts_text for c in m)
        marker = (spec.switch_marker,) if spec.switch_marker else ()
        return build_vocab(spec.n_vocab, get_arch(spec.arch).specials, chunks, marker)
    from .real_vocab import real_vocab

    real = real_vocab(spec.vocab)
    mask = np.ones(real.n_vocab, dtype=bool)
    mask[real.ordinary] = False
    return Vocab(real.token_texts, tuple(np.flatnonzero(mask).tolist()), bos_id=real.bos_id, eos_id=real.eos_id,
                 pad_id=real.pad_id, real=real.name)


def tokenizer_metadata(vocab: Vocab, layout: ArchLayout, spec: TestModelSpec) -> list[KeyValue]:
    """The ``tokenizer.*`` entries of a model file written with ``layout``, in file order, with
    the chat template of :meth:`ArchLayout.template_for`.

    A real vocabulary's are its file's, verbatim, except the chat template: the arch's real one
    replaces the file's, a short one goes in only where the file has none; the synthetic one
    uses the arch's pre-tokenizer.
    """
    from gguf import GGUFValueType as V

    chat_template = layout.template_for(spec)
    if vocab.real is not None:
        from .real_vocab import real_vocab

        return real_vocab(vocab.real).metadata(chat_template, replace=spec.chat_template != "short")
    kvs = [
        KeyValue("tokenizer.ggml.model", "gpt2", V.STRING),
        KeyValue("tokenizer.ggml.pre", layout.tokenizer_pre, V.STRING),
        KeyValue("tokenizer.ggml.tokens", vocab.tokens, V.ARRAY, V.STRING),
        KeyValue("tokenizer.ggml.token_type", vocab.types, V.ARRAY, V.INT32),
        KeyValue("tokenizer.ggml.merges", vocab.merges, V.ARRAY, V.STRING),
        KeyValue("tokenizer.ggml.bos_token_id", vocab.bos_id, V.UINT32),
        KeyValue("tokenizer.ggml.eos_token_id", vocab.eos_id, V.UINT32),
        KeyValue("tokenizer.ggml.padding_token_id", vocab.pad_id, V.UINT32),
        KeyValue("tokenizer.ggml.add_bos_token", False, V.BOOL),
    ]
    if chat_template:
        kvs.append(KeyValue("tokenizer.chat_template", chat_template, V.STRING))
    return kvs


def check_script(script: Sequence[int], ordinary: np.ndarray, names: Sequence[str]) -> None:
    """ValueError unless ``script`` holds distinct tokens of ``ordinary`` (sorted ids);
    ``names[t]`` (the token's text) names an offending token in the message."""

    def name(t: int) -> str:
        return f"{t} ({names[t]!r})" if 0 <= t < len(names) else str(t)

    seen: set[int] = set()
    for t in script:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"script holds {t!r}: token ids must be ints")
        if t in seen:
            raise ValueError(f"script repeats token {name(int(t))}: greedy decoding follows a permutation, "
                             "so every script token must be distinct")
        seen.add(int(t))
    ids = np.asarray(script, dtype=np.int64)
    pos = np.minimum(np.searchsorted(ordinary, ids), len(ordinary) - 1)
    bad = ids[ordinary[pos] != ids]
    if len(bad):
        raise ValueError(f"script token {name(int(bad[0]))} is not an ordinary token: control, user-defined, "
                         "unused, end-of-generation and out-of-range ids are never output")
