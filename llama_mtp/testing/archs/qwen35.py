"""qwen35 (Qwen3.5 dense): gated-delta-net layers with a full-attention layer every
``full_attention_interval`` layers, then ONE nextn/MTP block stored as block ``n_layer``
(``block_count = n_layer + 1``, ``qwen35.nextn_predict_layers = 1``) that shares
``token_embd`` and ``output`` with the trunk (no ``nextn.embed_tokens`` /
``nextn.shared_head_head``), like the converted Qwen3.5 checkpoints.

Mirrors src/models/qwen35.cpp (load_tensors: attention q = [query | gate] per head,
linear-attention qkv/gate/ssm_*; the MTP block is a full-attention layer) and
src/models/qwen35.cpp's LLM_GRAPH_TYPE_DECODER_MTP head (eh_proj over
[enorm(embd) ; hnorm(h)], one block, shared_head_norm, model.output).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from . import register
from .base import ArchLayout, Shape, SwitchHead, TensorList, uniform

if TYPE_CHECKING:
    from ..spec import TestModelSpec

_RMS_EPS = 1e-6

# ChatML with <think> tags, the shape of Qwen3.5/3.6's template (system, user/assistant turns,
# reasoning stripped from past assistant turns, generation prompt opening a <think> block;
# enable_thinking=false closes it empty).  Shortened: no tool-call branches.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message['content'] if message['content'] is string else '' %}"
    "{%- if message['role'] == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)


class Qwen35Layout(ArchLayout):
    name = "qwen35"
    tokenizer_pre = "qwen35"
    real_vocab = "qwen35"  # also qwen35moe's and qwen3next's (subclasses)
    real_template_file = "Qwen3.5-4B.jinja"
    chat_template = QWEN_CHAT_TEMPLATE
    residual_writers = {"attn_output.weight": 1.0, "ssm_out.weight": 1.0, "ffn_down.weight": 0.25}
    f32_leaves = frozenset({"ssm_conv1d.weight"})

    def validate(self, spec: TestModelSpec) -> None:
        if spec.n_layer < spec.full_attention_interval:
            # llama.cpp needs both recurrent and attention layers in a qwen35 trunk
            raise ValueError("n_layer must be >= full_attention_interval")
        if spec.ssm_dt_rank % spec.ssm_n_group:
            raise ValueError("ssm_dt_rank % ssm_n_group must be 0")
        if spec.head_dim % 8:
            raise ValueError("head_dim must be a multiple of 8 (rope dims = head_dim / 4)")

    def is_recurrent(self, spec: TestModelSpec, il: int) -> bool:
        # same rule as llama.cpp's qwen35 loader when only full_attention_interval is given
        return il < spec.n_layer and (il + 1) % spec.full_attention_interval != 0

    def switch_head(self, spec: TestModelSpec) -> SwitchHead | None:
        # the first full-attention layer; its q rows are [query | gate] per head: the gate rows of
        # head 0 cleared give sigmoid(0) = 0.5 on its output (RoPE turns the first head_dim / 4 dims)
        layer = next(il for il in range(spec.n_layer) if not self.is_recurrent(spec, il))
        hd = spec.head_dim
        return SwitchHead(layer, ("attn_q.weight", 0), ("attn_k.weight", 0), ("attn_v.weight", 0), hd, hd,
                          clear=(("attn_q.weight", hd, 2 * hd),), out_gain=0.5)

    # ---------------------------------------------------------------- tensors

    def attention(self, spec: TestModelSpec, p: str) -> TensorList:
        d, hd = spec.n_embd, spec.head_dim
        return [
            (f"{p}.attn_q.weight", (2 * spec.n_head * hd, d)),  # per head: [query | gate]
            (f"{p}.attn_k.weight", (spec.n_head_kv * hd, d)),
            (f"{p}.attn_v.weight", (spec.n_head_kv * hd, d)),
            (f"{p}.attn_output.weight", (d, spec.n_head * hd)),
            (f"{p}.attn_q_norm.weight", (hd,)),
            (f"{p}.attn_k_norm.weight", (hd,)),
        ]

    def recurrent(self, spec: TestModelSpec, p: str) -> TensorList:
        d = spec.n_embd
        key_dim = spec.ssm_d_state * spec.ssm_n_group
        value_dim = spec.ssm_d_state * spec.ssm_dt_rank
        conv_dim = 2 * key_dim + value_dim
        return [
            (f"{p}.attn_qkv.weight", (conv_dim, d)),
            (f"{p}.attn_gate.weight", (value_dim, d)),
            (f"{p}.ssm_conv1d.weight", (conv_dim, spec.ssm_d_conv)),
            (f"{p}.ssm_dt.bias", (spec.ssm_dt_rank,)),
            (f"{p}.ssm_a", (spec.ssm_dt_rank,)),
            (f"{p}.ssm_beta.weight", (spec.ssm_dt_rank, d)),
            (f"{p}.ssm_alpha.weight", (spec.ssm_dt_rank, d)),
            (f"{p}.ssm_norm.weight", (spec.ssm_d_state,)),
            (f"{p}.ssm_out.weight", (d, value_dim)),
        ]

    def tensor_shapes(self, spec: TestModelSpec) -> TensorList:
        d = spec.n_embd
        out: TensorList = [("token_embd.weight", (spec.n_vocab, d))]
        mtp = self.mtp_blocks(spec)
        for il in range(self.block_count(spec)):
            p = f"blk.{il}"
            out += [(f"{p}.attn_norm.weight", (d,)), (f"{p}.post_attention_norm.weight", (d,))]
            out += self.recurrent(spec, p) if self.is_recurrent(spec, il) else self.attention(spec, p)
            out += self.ffn(spec, p, il)
            if il in mtp:
                out += self.nextn(spec, p)
        out += [("output_norm.weight", (d,)), ("output.weight", (spec.n_vocab, d))]
        return out

    def special_data(self, spec: TestModelSpec, rng: np.random.Generator, leaf: str,
                     shape: Shape) -> np.ndarray | None:
        if leaf == "ssm_a":  # -exp(A_log), A_log ~ U(0, log 16) as in the HF init
            return -np.exp(rng.uniform(0.0, math.log(16.0), shape)).astype(np.float32)
        if leaf == "ssm_dt.bias":  # inverse softplus of dt ~ logU(1e-3, 1e-1): slow decay
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), shape))
            return np.log(np.expm1(dt)).astype(np.float32)
        if leaf == "ssm_conv1d.weight":
            return uniform(rng, shape, 1.0 / math.sqrt(spec.ssm_d_conv))
        return None

    # --------------------------------------------------------------- metadata

    def rope_sections(self, spec: TestModelSpec) -> list[int] | None:
        """``rope.dimension_sections`` (Qwen3.5's M-RoPE split of the rotated dims), or None for none."""
        half = spec.head_dim // 4 // 2
        s01 = max(1, round(half * 11 / 32))  # Qwen3.5 ratio [11, 11, 10, 0]
        return [s01, s01, half - 2 * s01, 0]

    def add_metadata(self, w: Any, spec: TestModelSpec) -> None:
        a = self.name
        n_rot = spec.head_dim // 4  # Qwen3.5 partial_rotary_factor = 0.25
        sections = self.rope_sections(spec)

        w.add_uint32(f"{a}.context_length", spec.n_ctx_train)
        w.add_uint32(f"{a}.embedding_length", spec.n_embd)
        w.add_uint32(f"{a}.block_count", self.block_count(spec))  # trunk + MTP block
        w.add_uint32(f"{a}.nextn_predict_layers", len(self.mtp_blocks(spec)))
        w.add_uint32(f"{a}.feed_forward_length", spec.n_ff)
        w.add_uint32(f"{a}.attention.head_count", spec.n_head)
        w.add_uint32(f"{a}.attention.head_count_kv", spec.n_head_kv)
        w.add_uint32(f"{a}.attention.key_length", spec.head_dim)
        w.add_uint32(f"{a}.attention.value_length", spec.head_dim)
        w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", _RMS_EPS)
        w.add_float32(f"{a}.rope.freq_base", spec.rope_freq_base)
        w.add_uint32(f"{a}.rope.dimension_count", n_rot)
        if sections is not None:
            w.add_array(f"{a}.rope.dimension_sections", sections)
        w.add_uint32(f"{a}.ssm.conv_kernel", spec.ssm_d_conv)
        w.add_uint32(f"{a}.ssm.state_size", spec.ssm_d_state)
        w.add_uint32(f"{a}.ssm.group_count", spec.ssm_n_group)
        w.add_uint32(f"{a}.ssm.time_step_rank", spec.ssm_dt_rank)
        w.add_uint32(f"{a}.ssm.inner_size", spec.ssm_d_state * spec.ssm_dt_rank)
        w.add_uint32(f"{a}.full_attention_interval", spec.full_attention_interval)


register(Qwen35Layout())
