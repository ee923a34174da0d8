"""A small GPT-2-style byte-level BPE vocabulary: 256 byte tokens, a few merges, filler, specials."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    types: list[int]
    merges: list[str]
    special_ids: tuple[int, ...]
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def ordinary(self) -> np.ndarray:
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


def build_vocab(n_vocab: int, specials: Specials) -> Vocab:
    # ids 0..255 are the byte tokens in byte order, then merges, filler, specials last (as Qwen).
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges = list(MERGES)
    tokens += [m.replace(" ", "") for m in merges]
    n_filler = n_vocab - len(tokens) - len(specials.tokens)
    # Filler: readable words (decodable by the byte-level decoder), never produced by merges.
    tokens += filler_words(n_filler)
    first_special = len(tokens)
    tokens += list(specials.tokens)
    types = [TOKEN_NORMAL] * first_special + [
        TOKEN_USER_DEFINED if s in specials.user_defined else TOKEN_CONTROL for s in specials.tokens
    ]
    special_ids = tuple(range(first_special, n_vocab))
    ids = {s: first_special + i for i, s in enumerate(specials.tokens)}
    return Vocab(tokens, types, merges, special_ids, bos_id=ids[specials.bos], eos_id=ids[specials.eos],
                 pad_id=ids[specials.pad])
