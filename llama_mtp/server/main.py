"""``python -m llama_mtp.server`` / ``llama-mtp serve``: parse settings, load, serve with uvicorn.

Usage errors and settings the engine cannot apply print one line and exit 2;
a model that fails to load prints one line and exits 1 (``--verbose true``
keeps llama.cpp's own logs, which say more).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:
    from .settings import ServeConfig

log = logging.getLogger("llama_mtp.server")


def main(argv: Optional[List[str]] = None) -> int:
    try:
        import uvicorn

        from .settings import SettingsError, parse_config
    except ImportError as e:  # the server extra is missing
        print(f"llama_mtp.server: {e.name or e} is not installed: pip install 'llama-mtp[server]'", file=sys.stderr)
        return 2
    from llama_mtp.testing import demo_model

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_config(argv, demo_model)
    except SettingsError as e:
        print(f"llama_mtp.server: error: {e}", file=sys.stderr)
        return 2

    if cfg.ray.enabled:
        return _serve_on_ray(cfg)

    from llama_mtp.errors import MtpError

    from .app import create_app
    from .backend import load_backend

    m = cfg.mtp
    log.info("loading %s: %d slots of %d tokens, n_draft=%s, n_draft_max=%d, max_waiting=%d, drafter: %s",
             cfg.model.model, m.n_parallel, cfg.model.n_ctx // m.n_parallel if cfg.model.n_ctx else 0, m.n_draft,
             m.n_draft_max, m.max_waiting, m.draft_model_path or "the model's MTP heads")
    try:
        backend = load_backend(cfg)
    except SettingsError as e:
        print(f"llama_mtp.server: error: {e}", file=sys.stderr)
        return 2
    except (MtpError, ValueError, OSError) as e:
        print(f"llama_mtp.server: error: could not load {cfg.model.model}: {e}", file=sys.stderr)
        return 1
    app = create_app(backend, cfg.server)
    s = cfg.server
    try:
        uvicorn.run(app, host=os.getenv("HOST", s.host), port=int(os.getenv("PORT", s.port)),
                    ssl_keyfile=s.ssl_keyfile, ssl_certfile=s.ssl_certfile, log_level="info",
                    # on SIGTERM, streams still open after this long are cut; the engine then cancels them
                    timeout_graceful_shutdown=10)
    finally:
        backend.close()  # if uvicorn never ran the lifespan (e.g. the port was taken)
    return 0


def _serve_on_ray(cfg: "ServeConfig") -> int:
    """--replicas / --ray_address: the same app on Ray Serve (the ``ray`` extra)."""
    try:
        from .ray.launch import serve_forever
    except ImportError as e:
        print(f"llama_mtp.server: --replicas/--ray_address need Ray Serve ({e.name or e} is not installed): "
              "pip install 'llama-mtp[ray]'", file=sys.stderr)
        return 2
    from .settings import SettingsError

    try:
        return serve_forever(cfg)
    except SettingsError as e:
        print(f"llama_mtp.server: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
