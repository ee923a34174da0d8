"""What a generation returns: its tokens, text, finish reason and per-sequence statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple


@dataclass
class GenerationStats:
    n_prompt_tokens: int = 0
    n_cached_tokens: int = 0          # prompt tokens a slot's memory already held (not decoded again)
    n_generated: int = 0
    steps: int = 0                    # target verify decodes after the prompt
    drafted: int = 0
    accepted: int = 0
    drafted_per_pos: List[int] = field(default_factory=list)
    accepted_per_pos: List[int] = field(default_factory=list)
    draft_len_hist: List[int] = field(default_factory=list)  # steps that drafted k tokens, k = index
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    # time of the steps this sequence took part in; with several sequences a step's times are
    # shared by everything batched in it
    t_decode: float = 0.0             # target decodes (prompt excluded)
    t_draft: float = 0.0
    t_process: float = 0.0
    t_sample: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def per_pos_acceptance(self) -> List[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_pos, self.drafted_per_pos)]

    @property
    def tokens_per_step(self) -> float:
        """Tokens committed per target verify decode (plain steps included)."""
        return self.n_generated / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.n_generated / self.generation_seconds if self.generation_seconds > 0 else 0.0

    @property
    def t_python(self) -> float:
        """Generation time spent outside llama.cpp calls."""
        return max(0.0, self.generation_seconds - self.t_decode - self.t_draft - self.t_process - self.t_sample)

    def record_step(self, *, n_drafted: int, n_accepted: int, n_kept: int, times: Tuple[float, float, float, float],
                    generation_seconds: float) -> None:
        """One verify step of this sequence: its draft, what was accepted and kept, and the step's
        (draft, decode, process, sample) times."""
        self.steps += 1
        self.n_generated += n_kept
        self.drafted += n_drafted
        self.accepted += n_accepted
        self.draft_len_hist[n_drafted] += 1
        for i in range(n_drafted):
            self.drafted_per_pos[i] += 1
        for i in range(n_accepted):
            self.accepted_per_pos[i] += 1
        t_draft, t_decode, t_process, t_sample = times
        self.t_draft += t_draft
        self.t_decode += t_decode
        self.t_process += t_process
        self.t_sample += t_sample
        self.generation_seconds = generation_seconds

    def as_dict(self) -> dict:
        keys = ("n_prompt_tokens", "n_generated", "steps", "drafted", "accepted", "drafted_per_pos",
                "accepted_per_pos", "draft_len_hist", "prompt_seconds", "generation_seconds", "t_decode",
                "t_draft", "t_process", "t_sample")
        out = {k: getattr(self, k) for k in keys}
        out.update(acceptance_rate=self.acceptance_rate, per_pos_acceptance=self.per_pos_acceptance,
                   tokens_per_step=self.tokens_per_step, tokens_per_second=self.tokens_per_second,
                   t_python=self.t_python)
        return out


@dataclass
class GenerationResult:
    tokens: List[int]
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    stats: GenerationStats
    # per generated token, when requested: {"token", "logprob", "top_logprobs": {id: logprob}}
    logprobs: Optional[List[Dict[str, Any]]] = None
