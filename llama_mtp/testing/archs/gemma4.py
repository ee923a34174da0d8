"""Gemma 4 (``gemma4``) target and its external MTP drafter (``gemma4-assistant``).

Gemma 4 ships no nextn blocks of its own: its MTP drafter is a separate checkpoint
(``Gemma4AssistantForCausalLM``) that upstream runs in the ``is_mem_shared`` mode of
common/speculative.cpp: the assistant's context is created with ``ctx_other`` = the
target's context, reads the target's token embeddings, and its Q-only attention layers
attend over the target's KV cache (SWA layers over target layer ``n_layer - 2``, full
layers over ``n_layer - 1``; src/llama-model.cpp ``share``).  Every draft step is fed
one token at the same position ``pos0`` plus a hidden row (step 1: the target's; later
steps: the assistant's own ``h_nextn``).

Target (mirrors src/models/gemma4.cpp and conversion/gemma.py ``Gemma4Model``):
sliding-window layers with a full-attention layer every ``sliding_window_period``
layers (the last layer is always full), post-attention / post-FFN norms, a
``layer_output_scale`` per layer, V = RMSNorm(V) without weights, full layers with
``rope_freqs`` (proportional rope: 1 for the rotated quarter, 1e30 for the rest) and no
``attn_v`` (K = V, as the large Gemma 4 checkpoints), optional per-layer token
embeddings (E2B/E4B, ``n_embd_per_layer``) and KV-shared trailing layers
(``shared_kv_layers``), final logit softcapping.  Unlike the converted checkpoints
(tied embeddings), ``output.weight`` is written: the oracle's LM head is a permutation
of the embedding, which a tied head cannot express (llama.cpp loads it when present).

Assistant (mirrors src/models/gemma4-assistant.cpp and ``Gemma4AssistantModel``):
``block_count = nextn_predict_layers`` = its layers (``blk.0..``, Q / O only),
``embedding_length_out`` = the target width, ``nextn.pre_projection`` over
[sqrt(D) * target embedding ; target h], ``nextn.post_projection`` back to the target
width (the next step's h), LM head tied to its own ``token_embd``.  Oracle: the
pre-projection is the oracle's ``eh_proj`` (its e half divided by the common embedding
norm, since the assistant sees sqrt(D) * e instead of RMSNorm(e)) written into the first
``d_u`` assistant dims, the LM head is the oracle's head in those dims, and the
post-projection copies them back into the target's u-dims (no h flags): so the drafts
are exactly ``TestModelInfo.draft_chain``.  The assistant must be narrower or wider
than the target (llama.cpp rejects ``embedding_length_out == embedding_length``) and
hold the ``d_u`` token directions: its width defaults to ``d_u``.

Files: the assistant of a target spec is a second GGUF next to the target in the model
cache, keyed by the same spec (``cached_gemma4_pair``).  It is written with this
module's ``write_assistant`` because gguf_writer picks the layout by ``spec.arch``; the
assistant is not registered in ``ARCHS`` (it cannot be loaded without a target context,
so the registry's per-arch tests would fail on it).
"""

from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING, Any

import numpy as np

from . import register
from .base import ArchLayout, Shape, TensorList
from ..vocab import Specials

if TYPE_CHECKING:
    from ..oracle import Oracle, TestModelInfo
    from ..spec import TestModelSpec

__all__ = ["Gemma4", "Gemma4Assistant", "ASSISTANT", "GEMMA4_SPECIALS", "GEMMA4_CHAT_TEMPLATE",
           "assistant_width", "write_assistant", "cached_assistant", "cached_gemma4_pair"]

_RMS_EPS = 1e-6
_PARTIAL_ROTARY_FULL = 0.25  # Gemma 4 full layers: rope_parameters.full_attention.partial_rotary_factor

# The Gemma 4 turn and thinking-channel tokens (stored last, as the generator stores specials).
# The converter makes the channel / tool tokens USER_DEFINED so the chat parser sees them.
GEMMA4_SPECIALS = Specials(
    tokens=("<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>"),
    bos="<bos>", eos="<eos>", pad="<pad>", user_defined=("<|channel>", "<channel|>"),
)

# The shape of Gemma 4's template: an optional system turn (opened with <|think|> when
# thinking is on), "<|turn>{role}\n...<turn|>\n" turns with assistant -> model, thinking
# channels stripped from past model turns, and a generation prompt that closes an empty
# thought channel unless enable_thinking.  Shortened: no tools, no media; no leading
# bos_token (the generator writes add_bos_token=false, and plain jinja2 renders of the
# template must tokenize the same as llama-cpp-python's).
GEMMA4_CHAT_TEMPLATE = (
    "{%- set thinking = enable_thinking is defined and enable_thinking %}"
    "{%- set loop_messages = messages %}"
    "{%- if thinking or (messages and messages[0]['role'] == 'system') %}"
    "{{- '<|turn>system\\n' }}{%- if thinking %}{{- '<|think|>' }}{%- endif %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] | trim }}{%- set loop_messages = messages[1:] %}"
    "{%- endif %}"
    "{{- '<turn|>\\n' }}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{%- set content = message['content'] if message['content'] is string else '' %}"
    "{%- if role == 'model' and '<channel|>' in content %}"
    "{%- set content = content.split('<channel|>')[-1] %}"
    "{%- endif %}"
    "{{- '<|turn>' + role + '\\n' + content | trim + '<turn|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|turn>model\\n' }}"
    "{%- if not thinking %}{{- '<|channel>thought\\n<channel|>' }}{%- endif %}"
    "{%- endif %}"
)

# post-norms rescale what a mixer / FFN adds to the residual: their weights, not the
# projection's scale, set the size of the "context" perturbation (leaf -> the writer it norms)
_POST_NORMS = {
    "post_attention_norm.weight": "attn_output.weight",
    "post_ffw_norm.weight": "ffn_down.weight",
    "post_norm.weight": "proj.weight",
}


class Gemma4(ArchLayout):
    name = "gemma4"
    specials = GEMMA4_SPECIALS
    # the generator's byte-level BPE vocabulary (Gemma's own "gemma4" tokenizer model needs
    # SentencePiece-style escaped tokens), with the default pre-tokenizer
    tokenizer_pre = "default"
    real_vocab = "gemma-4"  # also the assistant's (it carries its target's tokenizer)
    real_template_file = "google-gemma-4-31B-it.jinja"
    chat_template = GEMMA4_CHAT_TEMPLATE
    has_mtp_heads = False  # drafted by the separate gemma4-assistant model
    # "context": post-norms make every writer's output RMS 1 per dim (as loud as the sqrt(D)-scaled
    # embedding), so qwen35's noise 3.0 departs from pi at ~84/96 steps with min margins < 0.04.
    # Scanned (tiny f32, greedy continuation of CONTEXT_TEST_PROMPT, 96 tokens) noise 0.5 (no
    # departure), 1.0 (0-6 departures), 1.5 (21-37, margins < 0.03) and 1.25 (7-19): at 1.25 the
    # first seed keeping a top-1 margin >= 0.2 is 48 (min margin 0.319, 13 departures; seeds
    # 0..47 stay below 0.19)
    context_seed = 48
    context_noise = 1.25
    # blk.N.proj (per-layer embeddings) adds to the residual like the FFN
    residual_writers = {"attn_output.weight": 1.0, "ffn_down.weight": 0.25, "proj.weight": 0.25}
    param_defaults = {
        "sliding_window": 512,
        "sliding_window_period": 6,     # 5 sliding + 1 full (26B-A4B / 31B; E2B/E4B: 5)
        "global_head_dim": 0,           # 0 -> 2 * head_dim (Gemma 4: 512 vs 256)
        "n_head_kv_global": 0,          # 0 -> max(1, n_head_kv // 2) (num_global_key_value_heads)
        "final_logit_softcapping": 30.0,
        "rope_freq_base_swa": 10_000.0,
        "n_embd_per_layer": 0,          # hidden_size_per_layer_input (E2B/E4B: 256)
        "shared_kv_layers": 0,          # num_kv_shared_layers (E2B: 20 of 35)
        # the assistant (gemma4-assistant) of this target
        "assistant_n_layer": 4,
        "assistant_n_embd": 0,          # 0 -> d_u, the narrowest width holding the oracle exactly
        "assistant_n_head": 0,          # 0 -> n_head
        "assistant_n_ff": 0,            # 0 -> n_ff
    }

    # ---------------------------------------------------------------- structure

    def validate(self, spec: TestModelSpec) -> None:
        period = int(spec.param("sliding_window_period"))
        if period < 2:
            raise ValueError("sliding_window_period must be >= 2")
        if spec.n_layer < 2 or not any(self.is_swa(spec, il) for il in range(spec.n_layer)):
            raise ValueError("gemma4 needs >= 2 layers with a sliding-window one")
        if not self.is_swa(spec, spec.n_layer - 2):
            # the assistant's SWA layers share target layer n_layer-2, its full ones n_layer-1
            raise ValueError("layer n_layer-2 must be a sliding-window layer (assistant KV sharing)")
        n_kv = self.n_layer_kv(spec)
        if n_kv < spec.n_layer and (n_kv < 2 or self.is_swa(spec, n_kv - 1) or not self.is_swa(spec, n_kv - 2)):
            # llama.cpp's reuse rule: shared layers read layer n_kv-2 (SWA) or n_kv-1 (full)
            raise ValueError("shared_kv_layers must leave a sliding and then a full layer before the shared ones")
        if spec.head_dim % 8 or self.head_dim_full(spec) % 8:
            raise ValueError("head dims must be multiples of 8 (the full layers rotate a quarter)")
        if spec.n_head % self.n_head_kv(spec, spec.n_layer - 1):
            raise ValueError("n_head must be a multiple of n_head_kv_global")
        ASSISTANT.validate_for(spec)

    def mtp_blocks(self, spec: TestModelSpec) -> range:
        return range(0)  # no nextn blocks in the target

    def is_swa(self, spec: TestModelSpec, il: int, n_layer: int | None = None) -> bool:
        # layer_types: full every `period` layers and always last (the converter's pattern)
        n = spec.n_layer if n_layer is None else n_layer
        return (il + 1) % int(spec.param("sliding_window_period")) != 0 and il != n - 1

    def head_dim_full(self, spec: TestModelSpec) -> int:
        return int(spec.param("global_head_dim")) or 2 * spec.head_dim

    def head_dim(self, spec: TestModelSpec, swa: bool) -> int:
        return spec.head_dim if swa else self.head_dim_full(spec)

    def n_head_kv(self, spec: TestModelSpec, il: int, n_layer: int | None = None) -> int:
        if self.is_swa(spec, il, n_layer):
            return spec.n_head_kv
        return int(spec.param("n_head_kv_global")) or max(1, spec.n_head_kv // 2)

    def n_layer_kv(self, spec: TestModelSpec) -> int:
        """Layers with a KV cache of their own (the rest reuse earlier layers')."""
        return spec.n_layer - int(spec.param("shared_kv_layers"))

    # ---------------------------------------------------------------- tensors

    def block(self, spec: TestModelSpec, p: str, *, d: int, n_head: int, hd: int, n_ff: int,
              kv: tuple[int, bool] | None) -> TensorList:
        """One decoder layer; ``kv``: (n_head_kv, has attn_v) or None for a Q-only layer."""
        out: TensorList = [
            (f"{p}.attn_norm.weight", (d,)),
            (f"{p}.attn_q.weight", (n_head * hd, d)),
        ]
        if kv is not None:
            n_kv, has_v = kv
            out.append((f"{p}.attn_k.weight", (n_kv * hd, d)))
            if has_v:
                out.append((f"{p}.attn_v.weight", (n_kv * hd, d)))
        out += [
            (f"{p}.attn_output.weight", (d, n_head * hd)),
            (f"{p}.attn_q_norm.weight", (hd,)),
        ]
        if kv is not None:
            out.append((f"{p}.attn_k_norm.weight", (hd,)))
        out += [
            (f"{p}.post_attention_norm.weight", (d,)),
            (f"{p}.layer_output_scale.weight", (1,)),
            (f"{p}.ffn_norm.weight", (d,)),
            (f"{p}.ffn_gate.weight", (n_ff, d)),
            (f"{p}.ffn_up.weight", (n_ff, d)),
            (f"{p}.ffn_down.weight", (d, n_ff)),
            (f"{p}.post_ffw_norm.weight", (d,)),
        ]
        return out

    def rope_freqs(self, spec: TestModelSpec) -> TensorList:
        return [("rope_freqs.weight", (self.head_dim_full(spec) // 2,))]  # full layers only

    def tensor_shapes(self, spec: TestModelSpec) -> TensorList:
        d, n_ple = spec.n_embd, int(spec.param("n_embd_per_layer"))
        # converter order: generated rope_freqs first, then the checkpoint's tensors
        out: TensorList = [*self.rope_freqs(spec), ("token_embd.weight", (spec.n_vocab, d))]
        if n_ple:
            out += [
                ("per_layer_token_embd.weight", (spec.n_vocab, n_ple * spec.n_layer)),
                ("per_layer_model_proj.weight", (n_ple * spec.n_layer, d)),
                ("per_layer_proj_norm.weight", (n_ple,)),
            ]
        for il in range(spec.n_layer):
            swa = self.is_swa(spec, il)
            kv = (self.n_head_kv(spec, il), swa) if il < self.n_layer_kv(spec) else None
            p = f"blk.{il}"
            out += self.block(spec, p, d=d, n_head=spec.n_head, hd=self.head_dim(spec, swa), n_ff=spec.n_ff, kv=kv)
            if n_ple:
                out += [
                    (f"{p}.inp_gate.weight", (n_ple, d)),
                    (f"{p}.proj.weight", (d, n_ple)),
                    (f"{p}.post_norm.weight", (d,)),
                ]
        out += [("output_norm.weight", (d,)), ("output.weight", (spec.n_vocab, d))]
        return out

    def special_data(self, spec: TestModelSpec, rng: np.random.Generator, leaf: str,
                     shape: Shape) -> np.ndarray | None:
        if leaf == "rope_freqs.weight":
            # proportional rope (generate_extra_tensors): the rotated quarter keeps its
            # frequencies, the rest are divided by 1e30, i.e. not rotated
            n_rot = int(2 * shape[0] * _PARTIAL_ROTARY_FULL / 2)
            return np.array([1.0] * n_rot + [1e30] * (shape[0] - n_rot), dtype=np.float32)
        if leaf in _POST_NORMS and spec.noise:
            # "context": a post-norm makes what its writer adds RMS-1 per dim, i.e. as large as
            # the sqrt(D)-scaled embedding; its weight sets the perturbation instead
            return np.full(shape, spec.noise * self.residual_writers[_POST_NORMS[leaf]], dtype=np.float32)
        return None

    # --------------------------------------------------------------- metadata

    def add_attention_metadata(self, w: Any, spec: TestModelSpec, n_layer: int) -> None:
        """The hparams a target and its assistant share (the assistant's queries meet the target's keys)."""
        a = self.name
        hd_full = self.head_dim_full(spec)
        w.add_uint32(f"{a}.context_length", spec.n_ctx_train)
        w.add_array(f"{a}.attention.head_count_kv", [self.n_head_kv(spec, il, n_layer) for il in range(n_layer)])
        w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", _RMS_EPS)
        w.add_uint32(f"{a}.attention.key_length", hd_full)
        w.add_uint32(f"{a}.attention.value_length", hd_full)
        w.add_uint32(f"{a}.attention.key_length_swa", spec.head_dim)
        w.add_uint32(f"{a}.attention.value_length_swa", spec.head_dim)
        w.add_float32(f"{a}.rope.freq_base", spec.rope_freq_base)
        w.add_float32(f"{a}.rope.freq_base_swa", float(spec.param("rope_freq_base_swa")))
        w.add_uint32(f"{a}.rope.dimension_count", hd_full)  # proportional: rope_freqs masks 3/4
        w.add_uint32(f"{a}.rope.dimension_count_swa", spec.head_dim)
        w.add_uint32(f"{a}.attention.sliding_window", int(spec.param("sliding_window")))
        w.add_array(f"{a}.attention.sliding_window_pattern", [self.is_swa(spec, il, n_layer) for il in range(n_layer)])

    def add_metadata(self, w: Any, spec: TestModelSpec) -> None:
        a = self.name
        w.add_uint32(f"{a}.embedding_length", spec.n_embd)
        w.add_uint32(f"{a}.block_count", spec.n_layer)
        w.add_uint32(f"{a}.feed_forward_length", spec.n_ff)
        w.add_uint32(f"{a}.attention.head_count", spec.n_head)
        self.add_attention_metadata(w, spec, spec.n_layer)
        w.add_float32(f"{a}.final_logit_softcapping", float(spec.param("final_logit_softcapping")))
        w.add_uint32(f"{a}.attention.shared_kv_layers", int(spec.param("shared_kv_layers")))
        w.add_uint32(f"{a}.embedding_length_per_layer_input", int(spec.param("n_embd_per_layer")))


register(Gemma4())


def assistant_width(spec: TestModelSpec) -> int:
    """The assistant's n_embd: ``assistant_n_embd``, or d_u (the oracle's token-direction dims)."""
    return int(spec.param("assistant_n_embd")) or _u_dims(spec)


class Gemma4Assistant(Gemma4):
    """The gemma4-assistant GGUF of a gemma4 target spec (not registered: see the module doc).

    Every method takes the *target's* spec: the pair shares vocabulary, oracle, head dims,
    rope and sliding window; the assistant's own shape comes from its ``assistant_*`` params.
    """

    name = "gemma4-assistant"
    has_mtp_heads = True
    chat_template = None  # converted assistants carry the target's tokenizer, not its chat template
    # the assistant adds nothing to its residual in the oracle either (Q/O attention, FFN)
    residual_writers = {"attn_output.weight": 1.0, "ffn_down.weight": 0.25}

    def validate_for(self, spec: TestModelSpec) -> None:
        d_a, n_a = assistant_width(spec), int(spec.param("assistant_n_layer"))
        if d_a == spec.n_embd:
            raise ValueError("assistant_n_embd must differ from n_embd (llama.cpp reads the target width "
                             "from embedding_length_out)")
        if d_a < _u_dims(spec):
            raise ValueError(f"assistant_n_embd must be >= {_u_dims(spec)} to hold the oracle's token directions")
        if n_a < 1:
            raise ValueError("assistant_n_layer must be >= 1")
        for il in range(n_a):
            if self.n_head(spec) % self.n_head_kv(spec, il, n_a):
                raise ValueError("assistant_n_head must be a multiple of the target's KV heads")

    def n_layer(self, spec: TestModelSpec) -> int:
        return int(spec.param("assistant_n_layer"))

    def n_head(self, spec: TestModelSpec) -> int:
        return int(spec.param("assistant_n_head")) or spec.n_head

    def tensor_shapes(self, spec: TestModelSpec) -> TensorList:
        d, d_a, n_a = spec.n_embd, assistant_width(spec), self.n_layer(spec)
        n_ff = int(spec.param("assistant_n_ff")) or spec.n_ff
        out: TensorList = [
            *(self.rope_freqs(spec) if not all(self.is_swa(spec, il, n_a) for il in range(n_a)) else []),
            ("token_embd.weight", (spec.n_vocab, d_a)),  # also the (tied) LM head
            ("nextn.pre_projection.weight", (d_a, 2 * d)),
            ("nextn.post_projection.weight", (d, d_a)),
        ]
        for il in range(n_a):
            out += self.block(spec, f"blk.{il}", d=d_a, n_head=self.n_head(spec),
                              hd=self.head_dim(spec, self.is_swa(spec, il, n_a)), n_ff=n_ff, kv=None)
        out.append(("output_norm.weight", (d_a,)))
        return out

    def tensor_data(self, spec: TestModelSpec, o: Oracle, name: str, shape: Shape) -> np.ndarray:
        d, d_u = spec.n_embd, _u_dims(spec)
        if name == "token_embd.weight":
            w = np.zeros(shape, dtype=np.float32)
            w[:, :d_u] = o.head[:, :d_u]  # the oracle's head, in the assistant's first d_u dims
            return w
        if name == "nextn.pre_projection.weight":
            eh = super().tensor_data(spec, o, "nextn.eh_proj.weight", (d, 2 * d))  # oracle (+ context noise)
            w = np.zeros(shape, dtype=np.float32)
            w[:d_u] = eh[:d_u]
            # the assistant is fed sqrt(D) * e = |e| * RMSNorm(e), not enorm(e): every embedding has norm |e|
            w[:, :d] /= np.float32(_embedding_norm(o))
            return w
        if name == "nextn.post_projection.weight":
            w = np.zeros(shape, dtype=np.float32)
            w[np.arange(d_u), np.arange(d_u)] = 1.0  # back into the target's u-dims: no h flags
            return w
        return super().tensor_data(spec, o, name, shape)

    def add_metadata(self, w: Any, spec: TestModelSpec) -> None:
        a, n_a = self.name, self.n_layer(spec)
        w.add_uint32(f"{a}.embedding_length", assistant_width(spec))
        w.add_uint32(f"{a}.embedding_length_out", spec.n_embd)  # backbone_hidden_size
        w.add_uint32(f"{a}.block_count", n_a)
        w.add_uint32(f"{a}.nextn_predict_layers", n_a)  # every layer is a drafter layer
        w.add_uint32(f"{a}.feed_forward_length", int(spec.param("assistant_n_ff")) or spec.n_ff)
        w.add_uint32(f"{a}.attention.head_count", self.n_head(spec))
        self.add_attention_metadata(w, spec, n_a)
        w.add_uint32(f"{a}.attention.shared_kv_layers", 0)
        w.add_uint32(f"{a}.embedding_length_per_layer_input", 0)


ASSISTANT = Gemma4Assistant()


def _u_dims(spec: TestModelSpec) -> int:
    """d_u: the residual dims before the MTP flag dims (where the oracle's token directions live)."""
    from ..oracle import flag_dims

    return flag_dims(spec.n_embd).start


def _embedding_norm(o: Oracle) -> float:
    norms = np.linalg.norm(o.embd, axis=1)
    assert np.allclose(norms, norms[0], rtol=1e-5), "oracle embeddings must share one norm"
    return float(norms[0])


# --------------------------------------------------------------------------- files


def write_assistant(path: str | os.PathLike[str], spec: TestModelSpec) -> pathlib.Path:
    """Write the gemma4-assistant GGUF of the gemma4 target ``spec`` to ``path``
    (``q4_k_m``: written as f16, then quantized by llama.cpp)."""
    from ..gguf_writer import write_test_model

    if spec.arch != Gemma4.name:
        raise ValueError(f"an assistant belongs to a gemma4 target spec, got arch={spec.arch!r}")
    write_test_model(path, spec, layout=ASSISTANT, extra_kv={"llama_mtp.role": "assistant"})
    return pathlib.Path(path)


def cached_assistant(spec: TestModelSpec | None = None, *, size: str = "tiny", **overrides: Any) -> pathlib.Path:
    """Path of the assistant GGUF of a gemma4 target spec, in the model cache next to the
    target (same spec key), built on first use (temporary file + rename, as the target)."""
    from ..cache import cached_file, resolve_spec

    overrides.setdefault("arch", Gemma4.name)
    spec = resolve_spec(spec, size, overrides)
    name = (f"{ASSISTANT.name}-mtp-{spec.recipe}-{assistant_width(spec)}x"
            f"{ASSISTANT.n_layer(spec)}-{spec.ftype}-{spec.key()}.gguf")
    return cached_file(name, lambda tmp: write_assistant(tmp, spec))


def cached_gemma4_pair(spec: TestModelSpec | None = None, *, size: str = "tiny",
                       **overrides: Any) -> tuple[pathlib.Path, pathlib.Path, TestModelInfo]:
    """(target path, assistant path, TestModelInfo) of a gemma4 spec: the pair drafts
    ``info.draft_chain`` (step 1 fed the target's hidden state, later steps the assistant's)."""
    from ..cache import cached_test_model_info, resolve_spec

    overrides.setdefault("arch", Gemma4.name)
    spec = resolve_spec(spec, size, overrides)
    target, info = cached_test_model_info(spec)
    return target, cached_assistant(spec), info
