"""Prometheus metrics (``/metrics``), named after vLLM's with the ``llama_mtp:`` prefix.

Speculative counters follow vLLM's spec-decode metrics: ``num_drafts`` counts
steps that drafted at least one token, ``num_draft_tokens`` the tokens drafted,
``num_accepted_tokens`` those accepted, and ``..._per_pos{position="i"}`` the
accepted tokens at draft position i. They are added when a request finishes
(from its GenerationStats), cancelled requests included. Each app gets its own
CollectorRegistry, so several apps in one process (tests) never share counts.
"""

from __future__ import annotations

import logging
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llama_mtp.results import GenerationResult

log = logging.getLogger("llama_mtp.server")

PREFIX = "llama_mtp:"
# vLLM's buckets for time per output token
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """The server's metrics; ``observe`` takes one finished request."""

    def __init__(self, model_name: str, n_draft_max: int, n_running: Callable[[], float],
                 n_waiting: Callable[[], float], cache_bytes: Callable[[], float] = lambda: 0.0) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry

        def counter(name: str, doc: str, extra: tuple = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels + list(extra), registry=r)

        self.num_drafts = counter("spec_decode_num_drafts", "Verify steps that drafted at least one token.")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Tokens drafted by the MTP head.")
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Drafted tokens accepted.")
        self.accepted_per_pos = counter("spec_decode_num_accepted_tokens_per_pos",
                                        "Drafted tokens accepted, by draft position.", ("position",))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.prompt_tokens_cached = counter("prompt_tokens_cached", "Prompt tokens a slot already held (not decoded).")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Requests that reused a prefix a slot held.")
        self.prefix_cache_misses = counter("prefix_cache_misses", "Requests that decoded their whole prompt.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.request_success = counter("request_success", "Requests finished, by finish reason.",
                                       ("finished_reason",))
        self.request_failure = counter("request_failure", "Requests that ended with an error.")
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Generation time per output token.",
                              labels, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Submission to last token, per request.",
                             labels, buckets=_LATENCY_BUCKETS, registry=r)
        running = Gauge(PREFIX + "num_requests_running", "Requests decoding in an engine slot.", labels,
                        registry=r)
        waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting for a free slot.", labels, registry=r)
        cached = Gauge(PREFIX + "prefix_cache_bytes", "Bytes of recurrent-state checkpoints the slots keep.",
                       labels, registry=r)
        cached.labels(model_name).set_function(cache_bytes)
        running.labels(model_name).set_function(n_running)
        waiting.labels(model_name).set_function(n_waiting)
        # every position exists from the start, so a scrape shows zeros rather than nothing
        for pos in range(n_draft_max):
            self.accepted_per_pos.labels(model_name, str(pos))
        for c in (self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens, self.prompt_tokens,
                  self.prompt_tokens_cached, self.prefix_cache_hits, self.prefix_cache_misses,
                  self.generation_tokens, self.request_failure):
            c.labels(model_name)

    def observe(self, res: GenerationResult, seconds: float) -> None:
        """Add one finished request (a GenerationResult) that took ``seconds`` from submission."""
        m = self.model_name
        st = res.stats
        hist = list(getattr(st, "draft_len_hist", []) or [])
        self.num_drafts.labels(m).inc(sum(hist[1:]))
        self.num_draft_tokens.labels(m).inc(st.drafted)
        self.num_accepted_tokens.labels(m).inc(st.accepted)
        for pos, n in enumerate(st.accepted_per_pos or []):
            self.accepted_per_pos.labels(m, str(pos)).inc(n)
        self.prompt_tokens.labels(m).inc(st.n_prompt_tokens)
        self.prompt_tokens_cached.labels(m).inc(st.n_cached_tokens)
        (self.prefix_cache_hits if st.n_cached_tokens else self.prefix_cache_misses).labels(m).inc()
        self.generation_tokens.labels(m).inc(st.n_generated)
        self.request_success.labels(m, res.finish_reason).inc()
        if st.n_generated > 0 and st.generation_seconds > 0:
            self.tpot.labels(m).observe(st.generation_seconds / st.n_generated)
        self.e2e.labels(m).observe(seconds)

    def failed(self) -> None:
        self.request_failure.labels(self.model_name).inc()

    def render(self) -> tuple:
        """(body, content type) of a scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
