"""The spec of a generated model (hashed into the cache key), its size presets and recipe defaults."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GENERATOR_VERSION", "SIZES", "RECIPE_DEFAULTS", "CONTEXT_TEST_PROMPT", "CONTEXT_TEST_N_TOKENS",
    "CONTEXT_MIN_MARGIN", "FTYPES", "DEFAULT_ARCH", "TestModelSpec",
]

# Bump whenever the bytes written for a given spec change: it is part of the cache key.
GENERATOR_VERSION = 3

DEFAULT_ARCH = "qwen35"

# Sizes of the default arch (qwen35); other archs may override per size (ArchLayout.sizes).
SIZES: dict[str, dict[str, int]] = {
    # ~1M params, builds in well under a second.
    "tiny": dict(
        n_embd=128, n_layer=4, n_vocab=384, n_head=4, n_head_kv=2, head_dim=32, n_ff=256,
        ssm_d_state=32, ssm_n_group=2, ssm_dt_rank=4,
    ),
    # ~120M params (most in token_embd + output), f16 ~240 MB.
    "fast": dict(
        n_embd=768, n_layer=8, n_vocab=32768, n_head=8, n_head_kv=2, head_dim=128, n_ff=2048,
        ssm_d_state=128, ssm_n_group=4, ssm_dt_rank=8,
    ),
    # Qwen3.5-2B-like shapes (smaller vocab, 16 layers): ~1.1B params, f16 ~2.2 GB, q8_0 ~1.2 GB.
    "bench": dict(
        n_embd=2048, n_layer=16, n_vocab=32768, n_head=8, n_head_kv=2, head_dim=256, n_ff=6144,
        ssm_d_state=128, ssm_n_group=16, ssm_dt_rank=16,
    ),
}

# Per-recipe defaults for fields left as None in TestModelSpec.
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    # h_miss_fraction 0: every draft depends on the fed token only, so a draft chain is
    # mtp_draft applied repeatedly (set it > 0 to make the drafts read the hidden state).
    "oracle": dict(seed=0, noise=0.0, logit_scale=16.0, h_miss_fraction=0.0),
    # Chosen by scanning (llama-cpp-python 0.3.36, CPU, tiny f32) noise {2.0, 2.5, 3.0} x
    # seeds 0..127: the greedy continuation of CONTEXT_TEST_PROMPT for 96 tokens has
    # min top-1 margin 0.264 (vs ~5e-4 logit change between 1-token and batched
    # decoding of the same tokens) and departs from pure pi at 22 of the 96 steps.
    # Margins are continuous in the noise, so more departures means more near-ties:
    # noise 3.0 averages ~19 departures but only 7/128 seeds keep margins >= 0.1;
    # noise 2.0 keeps margins but departs < 1 time on average.  logit_scale only
    # rescales margins (argmax is invariant); 32 is typical of real LLMs.  The trunk
    # ignores the MTP flag dims, so this holds for every accept / h_miss_fraction.
    # Other archs: ArchLayout.context_seed overrides the seed (same scan, per arch).
    "context": dict(seed=108, noise=3.0, logit_scale=32.0, h_miss_fraction=0.5),
}

# Fixed prompt and length used to validate the context recipe's margins.
CONTEXT_TEST_PROMPT = "The quick brown fox jumps over the lazy dog."
CONTEXT_TEST_N_TOKENS = 96
# Lower bound asserted by the tests for the default tiny context model (measured value
# in the RECIPE_DEFAULTS comment).  Decoding in batches instead of one token at a time
# moves logits by ~1e-2 at most in real models; use reference_greedy on other prompts.
CONTEXT_MIN_MARGIN = 0.1

# n_vocab of the synthetic vocabulary when a spec leaves it unset
_SYNTHETIC_N_VOCAB = 384
# fields left out of recorded_fields at these (default) values: see TestModelSpec.vocab
_LATE_FIELDS: dict[str, Any] = {"vocab": None, "script": (), "script_loop": False, "chat_template": "short",
                                "script_eos": False, "script_text": (), "more_scripts_text": (), "switch_marker": ""}

# value = llama_ftype (general.file_type); "q4_k_m" is written as f16, then quantized by llama.cpp
FTYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}


@dataclass(frozen=True)
class TestModelSpec:
    """Everything that determines the generated file (hashed into the cache key).

    The shape fields are shared by every arch where they mean the same thing; an arch's
    own knobs (expert counts, MLA ranks, ...) go in ``arch_params`` (a tuple of
    ``(name, value)`` pairs, defaults in ``ArchLayout.param_defaults``).
    """

    __test__ = False  # not a pytest test class

    recipe: str = "oracle"          # "oracle" | "context"
    accept: float = 1.0             # fraction of tokens the MTP head predicts correctly
    n_embd: int = 128
    n_layer: int = 4                # trunk layers (the MTP block comes on top)
    n_vocab: int | None = None      # None: 384 (synthetic vocab) or the real vocab's token count
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 32
    n_ff: int = 256
    ssm_d_state: int = 32           # gated-delta-net head dim (k and v)
    ssm_n_group: int = 2            # number of k heads
    ssm_dt_rank: int = 4            # number of v heads (multiple of ssm_n_group)
    ssm_d_conv: int = 4
    full_attention_interval: int = 4
    n_ctx_train: int = 4096
    rope_freq_base: float = 10_000_000.0
    ftype: str = "f32"              # "f32" | "f16" | "q8_0" | "q4_k_m"
    seed: int | None = None         # None -> RECIPE_DEFAULTS[recipe]["seed"] (or the arch's)
    noise: float | None = None      # output-projection scale of "context"; None -> recipe default
    logit_scale: float | None = None  # top-1 trunk logit of the oracle part; None -> recipe default
    accept_pattern: str = "spread"  # "spread": exact rate in every window; "random": iid
    h_miss_fraction: float | None = None  # share of wrong drafts caused by the fed hidden state
    arch: str = DEFAULT_ARCH        # a key of llama_mtp.testing.archs.ARCHS
    arch_params: tuple[tuple[str, Any], ...] = ()  # arch-specific knobs, see ArchLayout.param_defaults
    # Fields added after GENERATOR_VERSION 3: recorded (key, file) only when not at their default
    # (see recorded_fields), so the specs that existed before keep their cache keys and bytes.
    vocab: str | None = None        # a real vocabulary (ggml-vocab-<vocab>.gguf), None: synthetic
    script: tuple[int, ...] = ()    # ordinary tokens greedy follows: pi(script[i]) = script[i + 1]
    script_loop: bool = False       # pi(script[-1]) = script[0]: the script is its own cycle
    # "short": the arch's shortened chat template (no tool-call branches); "real": the family's
    # own template from llama.cpp's models/templates (ArchLayout.real_template_file); or the name
    # of another file there (e.g. "GLM-4.7-Flash.jinja")
    chat_template: str = "short"
    script_eos: bool = False        # pi(script[-1]) = EOS: greedy ends the script with end-of-generation
    # the script as text chunks, on the synthetic vocabulary: each chunk not already one of its tokens
    # becomes one (so text that repeats itself, like markup, is spelled with distinct tokens); sets script
    script_text: tuple[str, ...] = ()
    # further scripts, as text chunks, each a chain of its own that ends in EOS (needs script_eos): greedy
    # follows the one whose first chunk is the prompt's last token (e.g. an agent's next turn ending
    # differently from its first); all chunks of all scripts distinct
    more_scripts_text: tuple[tuple[str, ...], ...] = ()
    # a text that becomes one (user-defined) token of the synthetic vocabulary, matched whole in any
    # prompt (e.g. "<tool_response>", which only an agent's tool-result turn holds): with it,
    # more_scripts_text[0] is the script greedy follows once the marker occurs anywhere earlier in the
    # context (an agent's answer after a tool result whose prompt ends like the first one).  It may
    # start with chunks of the script (from its first, the prompt's last token: greedy follows them
    # and the two part after the last shared one) or share none (they part after the token before
    # the script, whose embedding every special token shares: a prompt ending in a control token);
    # its other chunks are distinct from all.  One attention head of a full-attention trunk layer
    # does it (ArchLayout.switch_head, oracle.SwitchTokens); oracle recipe only
    switch_marker: str = ""

    def __post_init__(self) -> None:
        from .archs import get_arch

        if self.recipe not in RECIPE_DEFAULTS:
            raise ValueError(f"recipe must be one of {sorted(RECIPE_DEFAULTS)}, got {self.recipe!r}")
        layout = get_arch(self.arch)  # ValueError for an unknown arch
        defaults = dict(RECIPE_DEFAULTS[self.recipe])
        if self.recipe == "context":
            for key, value in (("seed", layout.context_seed), ("noise", layout.context_noise)):
                if value is not None:
                    defaults[key] = value
        for key, value in defaults.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)  # frozen: resolve defaults once
        if isinstance(self.arch_params, dict):
            object.__setattr__(self, "arch_params", tuple(sorted(self.arch_params.items())))
        unknown = {k for k, _ in self.arch_params} - set(layout.param_defaults)
        if unknown:
            raise ValueError(f"unknown arch_params for {self.arch}: {sorted(unknown)}")
        if self.ftype not in FTYPES:
            raise ValueError(f"ftype must be one of {sorted(FTYPES)}, got {self.ftype!r}")
        if self.accept_pattern not in ("spread", "random"):
            raise ValueError(f"accept_pattern must be 'spread' or 'random', got {self.accept_pattern!r}")
        if not (0.0 <= self.accept <= 1.0 and 0.0 <= self.h_miss_fraction <= 1.0):
            raise ValueError("accept and h_miss_fraction must be in [0, 1]")
        if self.recipe == "oracle" and self.noise:
            raise ValueError("the oracle recipe has no noise (use recipe='context')")
        if self.n_head % self.n_head_kv:
            raise ValueError("n_head % n_head_kv must be 0")
        self._resolve_vocab()
        if self.n_embd < 32:
            raise ValueError("n_embd must be >= 32")
        if self.ftype == "q8_0" and self.n_embd % 32:
            raise ValueError("q8_0 needs n_embd % 32 == 0")
        layout.validate(self)

    def _resolve_vocab(self) -> None:
        """Set n_vocab (None: the vocabulary's own size) and check it and the script against the vocabulary."""
        from .archs import get_arch
        from .vocab import check_script, min_vocab, text_token, vocab_for

        if self.vocab is None:
            if self.n_vocab is None:
                object.__setattr__(self, "n_vocab", _SYNTHETIC_N_VOCAB)
            n_chunks = len(self.script_text) + sum(map(len, self.more_scripts_text)) + bool(self.switch_marker)
            if self.n_vocab < min_vocab(get_arch(self.arch).specials) + n_chunks:
                raise ValueError("n_vocab must leave room for 256 byte tokens, specials and merges")
        else:
            from .real_vocab import real_vocab

            n_real = real_vocab(self.vocab).n_vocab  # ValueError for an unknown vocab
            if self.n_vocab not in (None, n_real):
                raise ValueError(f"vocab {self.vocab!r} has {n_real} tokens, got n_vocab={self.n_vocab} "
                                 "(leave n_vocab unset with a real vocab)")
            object.__setattr__(self, "n_vocab", n_real)
        if self.more_scripts_text:
            object.__setattr__(self, "more_scripts_text", tuple(tuple(str(c) for c in m) for m in self.more_scripts_text))
            every = list(self.script_text) + [c for m in self.more_script_chains() for c in m]
            if not self.script_text or not self.script_eos or len(set(every)) != len(every) or not all(
                    self.more_script_chains()):
                raise ValueError("more_scripts_text needs script_text and script_eos, and distinct chunks in all "
                                 "(with switch_marker, the first one may start with chunks of the script)")
        if self.switch_marker:
            self._check_switch()
        if self.script_text:
            if self.vocab is not None:
                raise ValueError("script_text spells the script on the synthetic vocabulary: leave vocab unset")
            if len(set(self.script_text)) != len(self.script_text) or not all(self.script_text):
                raise ValueError("script_text chunks must be distinct non-empty strings")
            object.__setattr__(self, "script_text", tuple(str(c) for c in self.script_text))
            tokens = vocab_for(self).tokens
            spelled = tuple(tokens.index(text_token(c)) for c in self.script_text)
            if self.script and tuple(self.script) != spelled:  # dataclasses.replace() passes both
                raise ValueError("script_text sets the script: pass one or the other")
            object.__setattr__(self, "script", spelled)
        if self.script:
            vocab = vocab_for(self)
            check_script(self.script, vocab.ordinary, vocab.tokens)
            if len(self.script) >= len(vocab.ordinary) - 1:
                raise ValueError("the script must leave at least two ordinary tokens out (a second cycle)")
            # frozen: a tuple of plain ints (hashable, JSON for the key) whatever sequence was given
            object.__setattr__(self, "script", tuple(int(t) for t in self.script))
        elif self.script_loop:
            raise ValueError("script_loop needs a script")
        if self.script_eos and (self.script_loop or not self.script):
            raise ValueError("script_eos needs a script that is not a loop")
        if self.chat_template not in ("short", "real") and not self.chat_template.endswith(".jinja"):
            raise ValueError(f"chat_template must be 'short', 'real' or a file of llama.cpp's models/templates, "
                             f"got {self.chat_template!r}")
        if self.chat_template == "real" and get_arch(self.arch).real_template_file is None:
            raise ValueError(f"{self.arch} has no real chat template in llama.cpp's models/templates")

    def switch_shared(self) -> int:
        """How many leading chunks the switched script (more_scripts_text[0]) shares with the script
        (0 without switch_marker): greedy follows them, then parts at the last one."""
        if not (self.switch_marker and self.more_scripts_text and self.script_text):
            return 0
        return len(os.path.commonprefix([self.more_scripts_text[0], self.script_text]))

    def more_script_chains(self) -> tuple[tuple[str, ...], ...]:
        """more_scripts_text as the chains of chunks of their own, each ending in EOS: the switched
        script without the chunks it shares with the script."""
        shared = self.switch_shared()
        return tuple(m[shared:] if i == 0 else m for i, m in enumerate(self.more_scripts_text))

    def more_scripts(self) -> tuple[tuple[int, ...], ...]:
        """The token ids of ``more_script_chains()`` on this spec's (synthetic) vocabulary."""
        from .vocab import text_token, vocab_for

        tokens = vocab_for(self).tokens
        return tuple(tuple(tokens.index(text_token(c)) for c in m) for m in self.more_script_chains())

    def _check_switch(self) -> None:
        from .archs import get_arch

        if self.recipe != "oracle":
            # "context" has random attention outputs everywhere: the one head's margins are not designed for them
            raise ValueError("switch_marker needs recipe='oracle'")
        if not self.more_scripts_text:
            raise ValueError("switch_marker needs more_scripts_text (its first script is the switched one)")
        if get_arch(self.arch).switch_head(self) is None:
            raise ValueError(f"{self.arch} has no switch circuit (switch_marker)")

    def param(self, name: str) -> Any:
        """An arch-specific knob: ``arch_params`` or the arch's default."""
        from .archs import get_arch

        return dict(self.arch_params).get(name, get_arch(self.arch).param_defaults[name])

    def recorded_fields(self) -> dict[str, Any]:
        """The fields hashed into the key and recorded in the file: all, except the late
        fields (vocab, script, script_loop) while they keep their defaults."""
        fields = dataclasses.asdict(self)
        for name, default in _LATE_FIELDS.items():
            if fields[name] == default:
                del fields[name]
        return fields

    def key(self) -> str:
        """Stable hash of the spec and generator version (cache file name)."""
        payload = json.dumps({"v": GENERATOR_VERSION, "spec": self.recorded_fields()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def n_params(self) -> int:
        from .archs import get_arch

        return sum(math.prod(shape) for _, shape in get_arch(self.arch).tensor_shapes(self))
