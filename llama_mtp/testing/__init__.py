"""Synthetic GGUF models with an MTP head (qwen35 and other archs), for tests and benchmarks.

No real checkpoint can be downloaded in CI, so this module writes small (or
benchmark-sized) GGUFs whose behaviour is known in closed form:

* ``recipe="oracle"``: every output projection of the trunk (attention out, ssm out,
  ffn down) is zero, so the residual stream at every position is exactly the token
  embedding and greedy decoding follows a known single-cycle permutation ``pi`` of
  the ordinary tokens.  The MTP head predicts ``pi(t)`` for the token ``t`` it is fed
  for a chosen fraction ``accept`` of tokens and a different, known token otherwise,
  which gives an exact per-position draft acceptance rate.  Optionally
  (``h_miss_fraction``) part of the misses are triggered by the fed target hidden
  state instead, so pairing a token with the wrong hidden state changes the drafts
  in a known way (TestModelInfo.mtp_draft).
* ``recipe="context"``: the oracle plus scaled random attention / recurrent / FFN
  output projections and an MTP head that also reads the rest of the hidden state,
  so the output depends on history: a wrong KV / recurrent-state rollback or a stale
  hidden state changes the logits and tokens.  Margins along a fixed prompt were
  checked to stay far above batch-size float noise (``CONTEXT_MIN_MARGIN``).

The layout mirrors llama.cpp's ``src/models/qwen35.cpp``: gated-delta-net layers with
a full-attention layer every ``full_attention_interval`` layers, then ONE nextn/MTP
block stored as block ``n_layer`` (``block_count = n_layer + 1``,
``qwen35.nextn_predict_layers = 1``) that shares ``token_embd`` and ``output`` with
the trunk (no ``nextn.embed_tokens`` / ``nextn.shared_head_head``), like the
converted Qwen3.5 checkpoints.

Vocabularies: by default a small synthetic byte-level BPE vocabulary (vocab.py).  With
``vocab="<name>"`` a model is built on one of llama.cpp's real tokenizers
(``models/ggml-vocab-<name>.gguf``, e.g. "qwen35", "deepseek-llm", "gemma-4"; each arch
names its closest in ``ArchLayout.real_vocab``), its ``tokenizer.*`` keys copied verbatim:
long pieces, UTF-8 split across byte tokens and real control tokens included
(real_vocab.py: ``real_vocab(name)`` tokenizes and renders pieces through llama.cpp).
``script`` makes greedy decoding follow given (distinct, ordinary) tokens:
``pi(script[i]) = script[i + 1]``; ``script_loop=True`` closes the script into a cycle of
its own, so a prompt ending in a script token continues with the script forever
(``script_from_text(vocab, text)`` checks a text can be one).

Package layout: spec.py (TestModelSpec, SIZES, RECIPE_DEFAULTS), vocab.py (synthetic
vocabulary, tokenizer metadata, scripts), real_vocab.py, gguf_metadata.py (GGUF metadata
I/O at vocabulary scale), oracle.py (pi, drafts, TestModelInfo), archs/ (one ArchLayout
per llama.cpp arch, registry ``archs.ARCHS``), gguf_writer.py (write_test_model, q4_k_m via
llama.cpp's quantizer), cache.py (cached_test_model), demo.py (demo_model: the CLI's and
server's default model), reference.py (reference_greedy).

Requires ``numpy`` and ``gguf`` (the pure-python package from PyPI).
"""

from __future__ import annotations

from .archs import ARCHS, ArchLayout, get_arch
from .cache import cache_dir, cached_test_model, cached_test_model_info
from .demo import DEMO_PROMPT, DEMO_SPEC, DEMO_TEXT, demo_model, demo_spec
from .gguf_writer import quantize, write_test_model
from .oracle import TestModelInfo, describe_test_model
from .real_vocab import RealVocab, real_vocab, real_vocab_names, script_from_text
from .reference import reference_greedy
from .spec import (
    CONTEXT_MIN_MARGIN,
    CONTEXT_TEST_N_TOKENS,
    CONTEXT_TEST_PROMPT,
    GENERATOR_VERSION,
    RECIPE_DEFAULTS,
    SIZES,
    TestModelSpec,
)

__all__ = [
    "GENERATOR_VERSION",
    "SIZES",
    "RECIPE_DEFAULTS",
    "CONTEXT_TEST_PROMPT",
    "CONTEXT_TEST_N_TOKENS",
    "CONTEXT_MIN_MARGIN",
    "TestModelSpec",
    "TestModelInfo",
    "write_test_model",
    "describe_test_model",
    "cached_test_model",
    "cache_dir",
    "cached_test_model_info",
    "DEMO_PROMPT",
    "DEMO_SPEC",
    "DEMO_TEXT",
    "demo_spec",
    "demo_model",
    "reference_greedy",
    "ARCHS",
    "ArchLayout",
    "get_arch",
    "quantize",
    "RealVocab",
    "real_vocab",
    "real_vocab_names",
    "script_from_text",
]
