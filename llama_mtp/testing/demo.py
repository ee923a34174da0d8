"""The demo model: what ``llama-mtp generate`` and ``llama-mtp serve`` run on without a model of their own."""

from __future__ import annotations

import sys
from typing import Any, Dict

from .cache import cached_test_model

# the fast size with 24 trunk layers (~200M parameters, most of a real model's depth, so the one
# MTP block and its LM head cost what they do next to a real trunk), MTP head right for 90% of
# tokens at every draft position (iid)
DEMO_SPEC: Dict[str, Any] = dict(size="fast", n_layer=24, recipe="oracle", accept=0.9, ftype="f16",
                                 accept_pattern="random")


def demo_model() -> str:
    """Path of the demo GGUF (qwen35 + 1 MTP head), generated on first use and then cached.

    Says so on stderr first: the first build takes a while, and a command run without a
    model should tell its user which model it is running on.
    """
    print("llama_mtp: using the generated demo model (qwen35 + 1 MTP head, ~200M params; "
          "built once, then cached)", file=sys.stderr, flush=True)
    spec = dict(DEMO_SPEC)
    return str(cached_test_model(size=spec.pop("size"), **spec))
