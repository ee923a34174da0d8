"""OpenAI-compatible HTTP server over the multi-sequence MTP engine (``python -m llama_mtp.server``).

Needs the ``server`` extra (``pip install 'llama-mtp[server]'``): FastAPI, uvicorn,
sse-starlette, pydantic-settings and prometheus_client, as llama_cpp.server's own
extra plus the metrics client.
"""

from __future__ import annotations

from .main import main

__all__ = ["main"]
