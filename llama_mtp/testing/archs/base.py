"""The interface every generated arch implements (see archs/__init__.py for the registry)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ..vocab import Specials

if TYPE_CHECKING:
    from ..oracle import Oracle, TestModelInfo
    from ..spec import TestModelSpec

Shape = tuple[int, ...]
TensorList = list[tuple[str, Shape]]

QWEN_SPECIALS = Specials(
    tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>",
)


def uniform(rng: np.random.Generator, shape: Shape, std: float) -> np.ndarray:
    # uniform with the given std: ~2x cheaper than normal, which matters for the bench size
    x = rng.random(shape, dtype=np.float32)
    x -= 0.5
    x *= np.float32(std * math.sqrt(12.0))
    return x


def dense_ffn(p: str, d: int, n_ff: int) -> TensorList:
    return [(f"{p}.ffn_gate.weight", (n_ff, d)), (f"{p}.ffn_up.weight", (n_ff, d)), (f"{p}.ffn_down.weight", (d, n_ff))]


def moe_ffn(p: str, d: int, n_expert: int, n_ff_exp: int, n_ff_shexp: int = 0, *, probs_bias: bool = True,
            shared_gate: bool = False) -> TensorList:
    """Router, routed experts and (``n_ff_shexp`` > 0) a shared expert, as the converters name them:
    ``exp_probs_b`` is the selection-only score bias of sigmoid routers (DeepSeek-V3, GLM-4.5),
    ``ffn_gate_inp_shexp`` the shared expert's sigmoid gate (Qwen MoE)."""
    out: TensorList = [(f"{p}.ffn_gate_inp.weight", (n_expert, d))]
    if probs_bias:
        out.append((f"{p}.exp_probs_b.bias", (n_expert,)))
    out += [
        (f"{p}.ffn_gate_exps.weight", (n_expert, n_ff_exp, d)),
        (f"{p}.ffn_up_exps.weight", (n_expert, n_ff_exp, d)),
        (f"{p}.ffn_down_exps.weight", (n_expert, d, n_ff_exp)),
    ]
    if shared_gate:
        out.append((f"{p}.ffn_gate_inp_shexp.weight", (1, d)))
    if n_ff_shexp:
        out += dense_ffn(p, d, n_ff_shexp)
        out[-3:] = [(name.replace(".weight", "_shexp.weight"), shape) for name, shape in out[-3:]]
    return out


def nextn_tensors(p: str, d: int, n_vocab: int, *, own_tables: bool) -> TensorList:
    """A nextn (MTP) block's own tensors: eh_proj over [enorm(embd) ; hnorm(h)] and the head norm;
    ``own_tables``: its own embed_tokens / shared_head_head (else it shares the trunk's)."""
    out: TensorList = [
        (f"{p}.nextn.eh_proj.weight", (d, 2 * d)),
        (f"{p}.nextn.enorm.weight", (d,)),
        (f"{p}.nextn.hnorm.weight", (d,)),
        (f"{p}.nextn.shared_head_norm.weight", (d,)),
    ]
    if own_tables:
        out += [(f"{p}.nextn.embed_tokens.weight", (n_vocab, d)), (f"{p}.nextn.shared_head_head.weight", (n_vocab, d))]
    return out


@dataclass(frozen=True)
class SwitchHead:
    """Head 0 of a full-attention trunk layer, as the switch circuit of TestModelSpec.switch_marker
    uses it (ArchLayout.tensor_data): its query reads the trigger's switch dim, its key and value the
    marker's, and attn_output writes the value onto the Z dim the switched token's LM-head row reads
    (oracle.build_oracle), so greedy after the trigger takes the switched token once the marker is
    in the context.  Rows are those of the named leaf (a fused projection names one leaf thrice)."""

    layer: int
    q: tuple[str, int]      # (leaf, first row) of head 0's query
    k: tuple[str, int]      # of kv head 0's key
    v: tuple[str, int]      # of kv head 0's value
    head_dim: int           # of q and k: the circuit uses the last dim, which partial RoPE leaves alone
    v_head_dim: int
    clear: tuple[tuple[str, int, int], ...] = ()  # (leaf, start, stop): more rows the head reads (gate, biases)
    qk_norm: bool = True    # per-head RMSNorm of q and k, with attn_q_norm / attn_k_norm gains
    out_gain: float = 1.0   # what the arch multiplies the head's output by (a sigmoid gate of 0: 0.5)

    def patch(self, spec: TestModelSpec, leaf: str, w: np.ndarray) -> None:
        """Write the circuit into ``w``, the data of tensor ``blk.<layer>.<leaf>`` (in place)."""
        from ..oracle import SWITCH_SCORE, SWITCH_WRITE, switch_dims, switch_feature

        t_dim, m_dim, z_dim = switch_dims(spec.n_embd)
        feature = switch_feature(spec.n_embd)  # trigger / marker on their dim after attn_norm
        last = self.head_dim - 1
        root = math.sqrt(self.head_dim)  # the kq scale is 1 / root
        # q.k / root = SWITCH_SCORE between the trigger and the marker: with qk-norm, q and k are
        # unit pre-norm and their norm gains on the last dim set it; without, their weights do
        w_qk = 1.0 / feature if self.qk_norm else math.sqrt(SWITCH_SCORE * root) / feature
        rows = ((*self.q, self.head_dim), (*self.k, self.head_dim), (*self.v, self.v_head_dim))
        for name, start, stop in tuple((n, a, a + size) for n, a, size in rows) + self.clear:
            if name == leaf:
                w[start:stop] = 0.0  # every other input of the head: zero, so it reads nothing else
        if leaf == self.q[0]:
            w[self.q[1] + last, t_dim] = w_qk
        if leaf == self.k[0]:
            w[self.k[1] + last, m_dim] = w_qk
        if leaf == self.v[0]:
            w[self.v[1], m_dim] = 1.0 / feature  # value 1 at the marker, exactly 0 at any other token
        if leaf == "attn_output.weight":
            w[:, :self.v_head_dim] = 0.0
            w[z_dim, 0] = SWITCH_WRITE / self.out_gain
        if self.qk_norm and leaf in ("attn_q_norm.weight", "attn_k_norm.weight"):
            # shared by the layer's heads, whose outputs (oracle: zero attn_output) nobody reads
            w[last] = math.sqrt(SWITCH_SCORE / root)


class ArchLayout:
    """Tensor layout, per-tensor data rule and metadata of one llama.cpp architecture.

    Subclasses set the class attributes and implement ``tensor_shapes`` and
    ``add_metadata``; the generic ``tensor_data`` realises the oracle for any layout
    whose MTP path is eh_proj -> block -> shared_head_norm -> LM head, provided every
    tensor that writes the residual stream is listed in ``residual_writers``.
    """

    name: ClassVar[str]                       # general.architecture = metadata key prefix
    specials: ClassVar[Specials] = QWEN_SPECIALS
    tokenizer_pre: ClassVar[str] = "qwen2"    # tokenizer.ggml.pre
    chat_template: ClassVar[str | None] = None
    # the family's real template in llama.cpp's models/templates (TestModelSpec(chat_template="real"))
    real_template_file: ClassVar[str | None] = None
    # the real vocabulary (llama.cpp's models/ggml-vocab-<real_vocab>.gguf) closest to the arch's
    # own tokenizer: what tests pass as TestModelSpec(vocab=...) to build the arch on a real one
    real_vocab: ClassVar[str]
    # per size name: spec fields overriding spec.SIZES[size] (merged over it)
    sizes: ClassVar[dict[str, dict[str, Any]]] = {}
    # arch-specific knobs (TestModelSpec.arch_params) and their defaults
    param_defaults: ClassVar[dict[str, Any]] = {}
    # seed and noise of the "context" recipe for this arch (None: RECIPE_DEFAULTS["context"]'s);
    # chosen by a scan (tests/test_archs.py test_context_margins states what must hold)
    context_seed: ClassVar[int | None] = None
    context_noise: ClassVar[float | None] = None
    # tensor leaf names (after "blk.N.") that add to the residual stream: zero for the
    # oracle, small random for "context"; value = noise gain relative to attention output
    residual_writers: ClassVar[dict[str, float]] = {"attn_output.weight": 1.0, "ffn_down.weight": 0.25}
    # False for a target drafted by a separate assistant model (no nextn blocks of its own)
    has_mtp_heads: ClassVar[bool] = True
    # extra leaf names kept in f32 whatever the ftype (1-D tensors always are)
    f32_leaves: ClassVar[frozenset[str]] = frozenset()

    # ------------------------------------------------------------------ structure

    def validate(self, spec: TestModelSpec) -> None:
        """Raise ValueError for specs llama.cpp would reject for this arch."""

    def mtp_blocks(self, spec: TestModelSpec) -> range:
        """Block indices of the MTP (nextn) layers: after the trunk by default."""
        return range(spec.n_layer, spec.n_layer + 1)

    def block_count(self, spec: TestModelSpec) -> int:
        return spec.n_layer + len(self.mtp_blocks(spec))

    def is_recurrent(self, spec: TestModelSpec, il: int) -> bool:
        return False

    def switch_head(self, spec: TestModelSpec) -> SwitchHead | None:
        """The attention head that realises ``spec.switch_marker``, or None where the arch has none."""
        return None

    def draft_chain(self, spec: TestModelSpec, info: TestModelInfo, id_last: int, n: int) -> list[int]:
        """The ``n`` drafts upstream's drafter makes after the target emitted ``id_last``
        (oracle recipe, ``h_miss_fraction=0``): one head fed its own drafts by default."""
        return info.draft_chain(id_last, n)

    # the norms before a block's mixer and before its FFN (pre-norm decoder blocks)
    block_norms: ClassVar[tuple[str, str]] = ("attn_norm", "ffn_norm")

    def tensor_shapes(self, spec: TestModelSpec) -> TensorList:
        """(name, numpy shape) of every tensor, in file order.  numpy shape = reversed ggml ne.

        By default a pre-norm decoder: per block ``block_norms[0]``, ``mixer``,
        ``block_norms[1]``, ``ffn``, and ``nextn`` on the MTP blocks."""
        d = spec.n_embd
        out: TensorList = [("token_embd.weight", (spec.n_vocab, d))]
        mtp = self.mtp_blocks(spec)
        for il in range(self.block_count(spec)):
            p = f"blk.{il}"
            out += [(f"{p}.{self.block_norms[0]}.weight", (d,))]
            out += self.mixer(spec, p, il)
            out += [(f"{p}.{self.block_norms[1]}.weight", (d,))]
            out += self.ffn(spec, p, il)
            if il in mtp:
                out += self.nextn(spec, p)
        out += [("output_norm.weight", (d,)), ("output.weight", (spec.n_vocab, d))]
        return out

    def mixer(self, spec: TestModelSpec, p: str, il: int) -> TensorList:
        """Block il's attention (or recurrent) tensors (for the default tensor_shapes)."""
        raise NotImplementedError

    def ffn(self, spec: TestModelSpec, p: str, il: int) -> TensorList:
        return dense_ffn(p, spec.n_embd, spec.n_ff)

    def nextn(self, spec: TestModelSpec, p: str) -> TensorList:
        return nextn_tensors(p, spec.n_embd, spec.n_vocab, own_tables=False)

    def add_metadata(self, w: Any, spec: TestModelSpec) -> None:
        """Write the ``<arch>.*`` hparams (general.* and tokenizer.* are written for you)."""
        raise NotImplementedError

    def template_for(self, spec: TestModelSpec) -> str | None:
        """The chat template a model of ``spec`` carries (see TestModelSpec.chat_template)."""
        name = self.real_template_file if spec.chat_template == "real" else spec.chat_template
        if name and name.endswith(".jinja"):
            from ..real_vocab import vocab_dir

            return (vocab_dir() / "templates" / name).read_text()
        return self.chat_template

    # ----------------------------------------------------------------------- data

    def special_data(self, spec: TestModelSpec, rng: np.random.Generator, leaf: str,
                     shape: Shape) -> np.ndarray | None:
        """Hook: contents of arch-specific tensors (ssm_a, biases, ...), or None for the generic rule."""
        return None

    def tensor_data(self, spec: TestModelSpec, o: Oracle, name: str, shape: Shape) -> np.ndarray:
        """float32 contents of one tensor; each tensor has its own RNG stream (order-free)."""
        w = self.plain_tensor_data(spec, o, name, shape)
        head = self.switch_head(spec) if spec.switch_marker else None
        if head is not None and name.startswith(f"blk.{head.layer}."):
            w = np.array(w, dtype=np.float32)  # a copy: the generic rule may hand out the oracle's own arrays
            head.patch(spec, name.split(".", 2)[-1], w)
        return w

    def plain_tensor_data(self, spec: TestModelSpec, o: Oracle, name: str, shape: Shape) -> np.ndarray:
        """tensor_data without the switch head."""
        from ..oracle import flag_dims, rng_for

        rng = rng_for(spec.seed, "tensor", name)
        d = spec.n_embd
        flags = flag_dims(d)  # only the MTP's eh_proj may read or write these
        leaf = name.split(".", 2)[-1] if name.startswith("blk.") else name
        is_mtp = name.startswith("blk.") and int(name.split(".")[1]) in self.mtp_blocks(spec)

        if name == "token_embd.weight" or leaf == "nextn.embed_tokens.weight":
            return o.embd
        if name == "output.weight" or leaf == "nextn.shared_head_head.weight":
            return o.head
        if leaf == "nextn.eh_proj.weight":
            w = o.eh_proj.copy()
            if spec.noise:  # the MTP also reads the rest of the target hidden state
                w_h = uniform(rng, (d, d), spec.noise / d)
                w_h[flags, :] = 0.0
                w_h[:, flags] = 0.0
                w[:, d:] += w_h
            return w
        if leaf in self.residual_writers:
            w = np.zeros(shape, dtype=np.float32)
            if spec.noise:
                # "context": history-dependent perturbation relative to the unit-norm embedding;
                # the FFN mostly sees the current token only, so keep it weaker than the mixers
                std = spec.noise / (math.sqrt(d) * math.sqrt(shape[-1]))
                std *= self.residual_writers[leaf] * (2.0 if is_mtp else 1.0)
                w = uniform(rng, shape, std)
                w[..., flags, :] = 0.0
            return w
        special = self.special_data(spec, rng, leaf, shape)
        if special is not None:
            return special
        if len(shape) == 1:
            return np.ones(shape, dtype=np.float32)  # all norms
        # input projections (read the RMS-normed residual): unit-scale activations
        w = uniform(rng, shape, 1.0 / math.sqrt(shape[-1]))
        if shape[-1] == d:
            w[..., flags] = 0.0
        return w

    def keeps_f32(self, name: str, shape: Shape) -> bool:
        """llama.cpp keeps norms, biases (and whatever the arch lists) in f32."""
        leaf = name.split(".", 2)[-1] if name.startswith("blk.") else name
        return len(shape) == 1 or leaf in self.f32_leaves
