"""The demo model: what ``llama-mtp generate`` and ``llama-mtp serve`` run on without a model of their own."""

from __future__ import annotations

import sys
from typing import Any, Dict

from .cache import cached_test_model, resolve_spec
from .real_vocab import real_vocab, script_from_text
from .spec import TestModelSpec

DEMO_PROMPT = "Multi-token prediction lets a model draft several tokens and verify them in one batch."
# What the demo model recites, in a loop: greedy decoding follows its tokens (a "script", see
# llama_mtp.testing), which must therefore all be distinct (no word or punctuation mark twice).
# It opens with DEMO_PROMPT, so the default prompt continues word for word; a newline token closes
# the loop, so a prompt ending in one (a chat template's "assistant\n") starts the text afresh.
DEMO_TEXT = DEMO_PROMPT + (
    " When the guesses hold, each step yields multiple words; otherwise we simply keep whatever matched first:"
    " nothing is lost! Speed comes from reading all weights once per pass instead of separately for every new"
    " position.\n\nThis toy network (built with known answers) only recites scripted English — but its timings"
    " follow real costs..."
)
# qwen35 with one MTP head on Qwen's real vocabulary (152k tokens), the fast size with 48 trunk
# layers: ~620M parameters (f16 1.2 GB), 117M of them in the LM head that every draft also runs,
# so the trunk is twice the old demo's depth for drafting to pay as it does on real models. The MTP
# head is right for 90% of the script's tokens (spread along the loop)
DEMO_SPEC: Dict[str, Any] = dict(size="fast", n_layer=48, recipe="oracle", accept=0.9, ftype="f16", vocab="qwen35",
                                 script_loop=True)


def demo_spec(**overrides: Any) -> TestModelSpec:
    """DEMO_SPEC reciting DEMO_TEXT and a newline (``overrides``: e.g. a smaller model for tests)."""
    spec = dict(DEMO_SPEC, **overrides)
    vocab = spec["vocab"]
    script = script_from_text(vocab, DEMO_TEXT) + tuple(real_vocab(vocab).tokenize("\n"))
    return resolve_spec(None, spec.pop("size"), dict(spec, script=script))


def demo_model() -> str:
    """Path of the demo GGUF, generated on first use and then cached.

    Says so on stderr first: the first build takes a while, and a command run without a
    model should tell its user which model it is running on.
    """
    print("llama_mtp: using the generated demo model (qwen35 + 1 MTP head on Qwen's vocabulary, ~620M params; "
          "built once, then cached)", file=sys.stderr, flush=True)
    return str(cached_test_model(demo_spec()))
