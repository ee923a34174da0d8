"""Plain llama-cpp-python greedy decoding with top-1 margins: the reference for "context" models."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["reference_greedy"]


def reference_greedy(
    path: str | os.PathLike[str],
    prompt: Sequence[int] | str,
    n_tokens: int,
    **llama_kwargs: Any,
) -> tuple[list[int], np.ndarray]:
    """Plain llama-cpp-python greedy decoding: (tokens, top-1 logit margin of each step).

    ``prompt`` is a token list or text (tokenized without BOS).  Use it to check that a
    prompt of your own has no near-ties (margins well above ~1e-2) before comparing
    speculative and plain decoding token by token.
    """
    import llama_cpp

    kwargs: dict[str, Any] = dict(n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
    kwargs.update(llama_kwargs)
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, **kwargs)
    try:
        tokens = llm.tokenize(prompt.encode(), add_bos=False) if isinstance(prompt, str) else list(prompt)
        out: list[int] = []
        for tok in llm.generate(tokens, temp=0.0, top_k=1):
            out.append(int(tok))
            if len(out) == n_tokens:
                break
        # row i of scores = logits after token i; the steps are rows len(prompt)-1 ...
        scores = np.array(llm.scores[len(tokens) - 1:len(tokens) - 1 + n_tokens], dtype=np.float32)
        top2 = np.sort(scores, axis=1)[:, -2:]
        return out, top2[:, 1] - top2[:, 0]
    finally:
        llm.close()
