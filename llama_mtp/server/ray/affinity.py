"""The conversation key a request is routed by: what the replica holding its prefix has in common with it.

A chat's every turn resends the whole history, so its head (the messages up to and including the
first user message) is the same on every turn and names the conversation; a completion prompt that
grows by appending keeps its leading characters. The key is a hash of that head, computed from the
body alone (no tokenizer in the ingress), so every ingress replica computes the same key for the
same conversation. A client that knows its conversation id can send it as ``x-session-id`` (Ray
Serve's session header name), which wins over the body.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Optional, Tuple

SESSION_HEADER = b"x-session-id"
# characters of a completion prompt that name its conversation (~64 tokens of English text): long
# enough to tell templated prompts' contents apart only when they differ early, short enough that a
# prompt that grows by appending keeps it
PROMPT_HEAD_CHARS = 256
# token ids of a pre-tokenized completion prompt that name it
PROMPT_HEAD_TOKENS = 64
_ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/engines/copilot-codex/completions")


def conversation_key(path: str, headers: Iterable[Tuple[bytes, bytes]], body: bytes) -> Optional[str]:
    """The routing key of a request, or None where any replica serves it as well (no prompt, bad JSON:
    the replica answers those)."""
    for name, value in headers:
        if name.lower() == SESSION_HEADER and value.strip():
            return "session:" + _digest(value.strip())
    if path not in _ROUTED_PATHS:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    head = _chat_head(doc.get("messages")) if path == "/v1/chat/completions" else _prompt_head(doc.get("prompt"))
    if head is None:
        return None
    return _digest(json.dumps(head, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def _chat_head(messages: Any) -> Any:
    if not isinstance(messages, list) or not messages:
        return None
    head = []
    for m in messages:
        head.append(m)
        if isinstance(m, dict) and m.get("role") == "user":
            break
    return head


def _prompt_head(prompt: Any) -> Any:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # several prompts: the first one's replica
    if isinstance(prompt, str):
        return prompt[:PROMPT_HEAD_CHARS] if prompt else None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt[:PROMPT_HEAD_TOKENS]):
        return prompt[:PROMPT_HEAD_TOKENS]
    return None


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()
